from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OK: _ClassVar[KeyStatus]
    NEW: _ClassVar[KeyStatus]
    PRESENT: _ClassVar[KeyStatus]
    IN_PROGRESS: _ClassVar[KeyStatus]
    NOT_FOUND: _ClassVar[KeyStatus]
    NOT_OWNER: _ClassVar[KeyStatus]
    ALREADY_COMMITTED: _ClassVar[KeyStatus]
    NO_SPACE: _ClassVar[KeyStatus]
    PINNED: _ClassVar[KeyStatus]
    HAS_CHILDREN: _ClassVar[KeyStatus]
    CHECKSUM_MISMATCH: _ClassVar[KeyStatus]
    BAD_SIZE: _ClassVar[KeyStatus]

class TierKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_NONE: _ClassVar[TierKind]
    TIER_GPU: _ClassVar[TierKind]
    TIER_DRAM: _ClassVar[TierKind]
    TIER_CXL: _ClassVar[TierKind]
    TIER_NVME: _ClassVar[TierKind]
    TIER_OTHER: _ClassVar[TierKind]
OK: KeyStatus
NEW: KeyStatus
PRESENT: KeyStatus
IN_PROGRESS: KeyStatus
NOT_FOUND: KeyStatus
NOT_OWNER: KeyStatus
ALREADY_COMMITTED: KeyStatus
NO_SPACE: KeyStatus
PINNED: KeyStatus
HAS_CHILDREN: KeyStatus
CHECKSUM_MISMATCH: KeyStatus
BAD_SIZE: KeyStatus
TIER_NONE: TierKind
TIER_GPU: TierKind
TIER_DRAM: TierKind
TIER_CXL: TierKind
TIER_NVME: TierKind
TIER_OTHER: TierKind

class OpenSessionRequest(_message.Message):
    __slots__ = ("client_name", "client_pid", "previous_session_id")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PID_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    client_pid: int
    previous_session_id: int
    def __init__(self, client_name: _Optional[str] = ..., client_pid: _Optional[int] = ..., previous_session_id: _Optional[int] = ...) -> None: ...

class ArenaInfo(_message.Message):
    __slots__ = ("path", "size")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "arena", "lease_timeout_ms", "adopted_models")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ARENA_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_MODELS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    arena: ArenaInfo
    lease_timeout_ms: int
    adopted_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[int] = ..., arena: _Optional[_Union[ArenaInfo, _Mapping]] = ..., lease_timeout_ms: _Optional[int] = ..., adopted_models: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    def __init__(self, session_id: _Optional[int] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    def __init__(self, session_id: _Optional[int] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("released_pins", "aborted_allocations")
    RELEASED_PINS_FIELD_NUMBER: _ClassVar[int]
    ABORTED_ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    released_pins: int
    aborted_allocations: int
    def __init__(self, released_pins: _Optional[int] = ..., aborted_allocations: _Optional[int] = ...) -> None: ...

class NamespaceSpec(_message.Message):
    __slots__ = ("model_id", "num_layers", "num_kv_heads", "head_dim", "block_tokens", "kv_dtype", "layout", "tp_rank", "tp_size", "tenant_salt", "hash_algo")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TENANT_SALT_FIELD_NUMBER: _ClassVar[int]
    HASH_ALGO_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int
    kv_dtype: str
    layout: str
    tp_rank: int
    tp_size: int
    tenant_salt: bytes
    hash_algo: str
    def __init__(self, model_id: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_tokens: _Optional[int] = ..., kv_dtype: _Optional[str] = ..., layout: _Optional[str] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., tenant_salt: _Optional[bytes] = ..., hash_algo: _Optional[str] = ...) -> None: ...

class RegisterNamespaceRequest(_message.Message):
    __slots__ = ("session_id", "spec")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    spec: NamespaceSpec
    def __init__(self, session_id: _Optional[int] = ..., spec: _Optional[_Union[NamespaceSpec, _Mapping]] = ...) -> None: ...

class RegisterNamespaceResponse(_message.Message):
    __slots__ = ("namespace_id", "block_nbytes")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NBYTES_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    block_nbytes: int
    def __init__(self, namespace_id: _Optional[bytes] = ..., block_nbytes: _Optional[int] = ...) -> None: ...

class Slot(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("session_id", "keys", "namespace_id", "token_ids", "packed_keys")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PACKED_KEYS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    namespace_id: bytes
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    packed_keys: bytes
    def __init__(self, session_id: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ..., namespace_id: _Optional[bytes] = ..., token_ids: _Optional[_Iterable[int]] = ..., packed_keys: _Optional[bytes] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("num_cached", "tier_index", "keys", "tier_names", "tier_bytes")
    NUM_CACHED_FIELD_NUMBER: _ClassVar[int]
    TIER_INDEX_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TIER_NAMES_FIELD_NUMBER: _ClassVar[int]
    TIER_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_cached: int
    tier_index: _containers.RepeatedScalarFieldContainer[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    tier_names: _containers.RepeatedScalarFieldContainer[str]
    tier_bytes: bytes
    def __init__(self, num_cached: _Optional[int] = ..., tier_index: _Optional[_Iterable[int]] = ..., keys: _Optional[_Iterable[bytes]] = ..., tier_names: _Optional[_Iterable[str]] = ..., tier_bytes: _Optional[bytes] = ...) -> None: ...

class AllocateRequest(_message.Message):
    __slots__ = ("session_id", "namespace_id", "block_nbytes", "parent_key", "keys", "first_depth")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NBYTES_FIELD_NUMBER: _ClassVar[int]
    PARENT_KEY_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    FIRST_DEPTH_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    namespace_id: bytes
    block_nbytes: int
    parent_key: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    first_depth: int
    def __init__(self, session_id: _Optional[int] = ..., namespace_id: _Optional[bytes] = ..., block_nbytes: _Optional[int] = ..., parent_key: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., first_depth: _Optional[int] = ...) -> None: ...

class AllocateResponse(_message.Message):
    __slots__ = ("status", "slots")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    status: _containers.RepeatedScalarFieldContainer[KeyStatus]
    slots: _containers.RepeatedCompositeFieldContainer[Slot]
    def __init__(self, status: _Optional[_Iterable[_Union[KeyStatus, str]]] = ..., slots: _Optional[_Iterable[_Union[Slot, _Mapping]]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("session_id", "keys", "checksums")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: _containers.RepeatedScalarFieldContainer[KeyStatus]
    def __init__(self, status: _Optional[_Iterable[_Union[KeyStatus, str]]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("session_id", "keys")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session_id: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: int
    def __init__(self, aborted: _Optional[int] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("session_id", "keys")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session_id: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("status", "slots")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    status: _containers.RepeatedScalarFieldContainer[KeyStatus]
    slots: _containers.RepeatedCompositeFieldContainer[Slot]
    def __init__(self, status: _Optional[_Iterable[_Union[KeyStatus, str]]] = ..., slots: _Optional[_Iterable[_Union[Slot, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id", "keys")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session_id: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: _containers.RepeatedScalarFieldContainer[KeyStatus]
    def __init__(self, status: _Optional[_Iterable[_Union[KeyStatus, str]]] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("session_id", "keys")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session_id: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("scheduled",)
    SCHEDULED_FIELD_NUMBER: _ClassVar[int]
    scheduled: int
    def __init__(self, scheduled: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("session_id", "keys")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session_id: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: _containers.RepeatedScalarFieldContainer[KeyStatus]
    def __init__(self, status: _Optional[_Iterable[_Union[KeyStatus, str]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class ModelTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "nbytes", "checksum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    checksum: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("session_id", "name", "no_pin", "no_wait", "wait_load_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NO_PIN_FIELD_NUMBER: _ClassVar[int]
    NO_WAIT_FIELD_NUMBER: _ClassVar[int]
    WAIT_LOAD_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    name: str
    no_pin: bool
    no_wait: bool
    wait_load_id: int
    def __init__(self, session_id: _Optional[int] = ..., name: _Optional[str] = ..., no_pin: _Optional[bool] = ..., no_wait: _Optional[bool] = ..., wait_load_id: _Optional[int] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("name", "uid", "shm_path", "shm_offset", "nbytes", "tensors", "was_resident", "load_seconds", "direct_io", "state", "load_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    SHM_PATH_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    WAS_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DIRECT_IO_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    uid: str
    shm_path: str
    shm_offset: int
    nbytes: int
    tensors: _containers.RepeatedCompositeFieldContainer[ModelTensor]
    was_resident: bool
    load_seconds: float
    direct_io: bool
    state: str
    load_id: int
    def __init__(self, name: _Optional[str] = ..., uid: _Optional[str] = ..., shm_path: _Optional[str] = ..., shm_offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[ModelTensor, _Mapping]]] = ..., was_resident: _Optional[bool] = ..., load_seconds: _Optional[float] = ..., direct_io: _Optional[bool] = ..., state: _Optional[str] = ..., load_id: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "nbytes", "tensor_bytes", "num_tensors", "state", "pins", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    nbytes: int
    tensor_bytes: int
    num_tensors: int
    state: str
    pins: int
    source: str
    def __init__(self, name: _Optional[str] = ..., nbytes: _Optional[int] = ..., tensor_bytes: _Optional[int] = ..., num_tensors: _Optional[int] = ..., state: _Optional[str] = ..., pins: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "dram_budget", "dram_used")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DRAM_BUDGET_FIELD_NUMBER: _ClassVar[int]
    DRAM_USED_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    dram_budget: int
    dram_used: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., dram_budget: _Optional[int] = ..., dram_used: _Optional[int] = ...) -> None: ...

class SwapModelsRequest(_message.Message):
    __slots__ = ("session_id", "old_name", "new_name")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OLD_NAME_FIELD_NUMBER: _ClassVar[int]
    NEW_NAME_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    old_name: str
    new_name: str
    def __init__(self, session_id: _Optional[int] = ..., old_name: _Optional[str] = ..., new_name: _Optional[str] = ...) -> None: ...

class SwapModelsResponse(_message.Message):
    __slots__ = ("model", "released_pins")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RELEASED_PINS_FIELD_NUMBER: _ClassVar[int]
    model: LoadModelResponse
    released_pins: int
    def __init__(self, model: _Optional[_Union[LoadModelResponse, _Mapping]] = ..., released_pins: _Optional[int] = ...) -> None: ...

class PrefetchModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PrefetchModelResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class ReleaseModelRequest(_message.Message):
    __slots__ = ("session_id", "name", "evict")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EVICT_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    name: str
    evict: bool
    def __init__(self, session_id: _Optional[int] = ..., name: _Optional[str] = ..., evict: _Optional[bool] = ...) -> None: ...

class ReleaseModelResponse(_message.Message):
    __slots__ = ("released_pins", "evicted")
    RELEASED_PINS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    released_pins: int
    evicted: bool
    def __init__(self, released_pins: _Optional[int] = ..., evicted: _Optional[bool] = ...) -> None: ...
