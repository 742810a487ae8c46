"""Request building and response parsing shared by the sync and async clients."""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import xxhash

from kvstore._proto import kvstore_pb2 as pb
from kvstore.errors import DaemonUnavailable, InvalidArgument
from kvstore.hierarchy import Status
from kvstore.keys import Namespace, key_length_error

_log = logging.getLogger("kvstore.client")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    # A reconnect's new channel gets connection state of its own: from grpc's shared
    # pool it could inherit the backoff of the attempts made while the daemon was down
    # and wait that out (0.3-0.5 s idle, over 1 s loaded) with the daemon back up.
    ("grpc.use_local_subchannel_pool", 1),
]


@dataclass(slots=True, frozen=True)
class LookupResult:
    num_cached: int
    tiers: list[str]


def lookup_req(sid: int, keys: Sequence[bytes]) -> Any:
    """A Lookup in the packed form (one bytes field: no per-key protobuf element)."""
    if why := key_length_error(keys):
        raise InvalidArgument(why)
    return pb.LookupRequest(session_id=sid, packed_keys=b"".join(keys))


def lookup_result(resp: Any) -> LookupResult:
    names = list(resp.tier_names)
    tiers = resp.tier_bytes or resp.tier_index  # iterating bytes yields ints
    return LookupResult(resp.num_cached, list(map(names.__getitem__, tiers)))


@dataclass(slots=True)
class Allocation:
    key: bytes
    status: str
    view: memoryview | None


@dataclass(slots=True, frozen=True)
class StoreResult:
    new: int
    present: int


def default_socket() -> str:
    from kvstore.config import default_runtime_dir

    return os.environ.get("KVSTORE_SOCKET") or str(default_runtime_dir() / "kvstore.sock")


def target(socket: str | None, address: str | None) -> str:
    if address:
        return address
    return f"unix:{socket or default_socket()}"


def missing_unix_socket(target: str) -> bool:
    """Whether ``target`` is a ``unix:`` gRPC target whose socket path does not exist
    (nothing can answer there: a first connect says so at once instead of waiting)."""
    if not target.startswith("unix:"):
        return False
    path = target[len("unix:") :]
    path = path[2:] if path.startswith("///") else path  # unix:///abs/path
    return not os.path.exists(path)


def unavailable_msg(tgt: str) -> str:
    return (
        f"no kvstore daemon answers at {tgt}: start one with `kvstore serve` (or `make serve`), "
        "or point the client at its socket (KVSTORE_SOCKET)"
    )


POPULATE_AT_CONNECT_MAX = 16 << 30
"""Arenas up to this size are populated when a client maps them (~0.1 s and 2 MiB of
page tables per GiB, in every client process); larger ones chunk by chunk, as used."""
POPULATE_CHUNK = 2 << 20
# Linux >= 5.14; not exported by Python 3.11's mmap module.  Read-populating a shared
# shmem mapping maps its pages writable: writes then take no fault either (measured).
MADV_POPULATE_READ = 22


class ArenaMap:
    """A client's mapping of the daemon's arena; :meth:`slot` hands out views on it.

    A page touched for the first time in a process takes a page fault (first touch runs
    at ~0.4 GB/s instead of memcpy speed), so the mapping is populated ahead of use: all
    at once for an arena up to :data:`POPULATE_AT_CONNECT_MAX`, else each 2 MiB chunk
    in one call the first time a slot in it is handed out, so connecting to a daemon
    with hundreds of GiB of DRAM stays fast and page tables grow only with what is used.
    """

    def __init__(self, mm: mmap.mmap, lazy: bool) -> None:
        self._mm = mm
        self.view = memoryview(mm)
        n = (len(mm) + POPULATE_CHUNK - 1) // POPULATE_CHUNK
        self._todo: bytearray | None = bytearray(b"\x01") * n if lazy else None

    @property
    def lazy(self) -> bool:
        return self._todo is not None

    def slot(self, offset: int, length: int) -> memoryview:
        """The arena's bytes ``[offset, offset + length)``, populated."""
        todo = self._todo
        if todo is not None and length > 0:
            first, last = offset // POPULATE_CHUNK, (offset + length - 1) // POPULATE_CHUNK
            if any(todo[first : last + 1]):
                self._populate(first, last)
        return self.view[offset : offset + length]

    def _populate(self, first: int, last: int) -> None:
        assert self._todo is not None
        for c in range(first, min(last, len(self._todo) - 1) + 1):
            if self._todo[c]:
                start = c * POPULATE_CHUNK
                try:
                    self._mm.madvise(
                        MADV_POPULATE_READ, start, min(POPULATE_CHUNK, len(self._mm) - start)
                    )
                except OSError:
                    pass  # kernel < 5.14: the pages fault in on first touch instead
                self._todo[c] = 0

    def close(self) -> None:
        self.view.release()
        try:
            self._mm.close()
        except BufferError:
            pass  # caller still holds views; the mapping goes with the last of them


def map_arena(path: str, size: int) -> ArenaMap:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise DaemonUnavailable(f"cannot open the daemon's arena {path}: {exc}") from None
    lazy = size > POPULATE_AT_CONNECT_MAX
    try:
        # MAP_POPULATE fills this process's page tables now (see ArenaMap).
        flags = mmap.MAP_SHARED | (0 if lazy else getattr(mmap, "MAP_POPULATE", 0))
        mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return ArenaMap(mm, lazy)


def is_session_lost(exc: grpc.RpcError) -> bool:
    """Whether the daemon went away (or restarted) with the client's session.

    A CANCELLED call counts: the clients never cancel the calls they wait on, so the
    server did, as it does with calls still running when it stops.
    """
    code = exc.code() if hasattr(exc, "code") else None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return True
    details = exc.details() if hasattr(exc, "details") else ""
    return code == grpc.StatusCode.NOT_FOUND and "unknown session" in (details or "")


def is_unknown_session(exc: grpc.RpcError) -> bool:
    """Whether the daemon answered that it does not know the call's session (it ended:
    expired, closed, or the daemon restarted), as opposed to the daemon not answering."""
    code = exc.code() if hasattr(exc, "code") else None
    return code == grpc.StatusCode.NOT_FOUND and is_session_lost(exc)


def take_pin(pins: Counter[bytes], key: bytes) -> bool:
    """Removes one pin of ``key`` from ``pins``; whether there was one."""
    n = pins.get(key, 0)
    if n <= 0:
        return False
    if n == 1:
        del pins[key]
    else:
        pins[key] = n - 1
    return True


def split_release(
    pins: Counter[bytes], ended: Counter[bytes], keys: Sequence[bytes]
) -> tuple[Counter[bytes], list[bytes] | None, int]:
    """How a client's ``release(keys)`` splits between the pins of its current session
    (``pins``) and those of sessions that ended (``ended``, released by the daemon then).

    One pin per key listed: the current session's first, else one that ended.  Both
    counters are updated.  Returns ``(taken, send, lost)``: ``taken``, the current
    session's pins removed (add them back to ``pins`` if the release fails); ``send``,
    the keys to release in the current session, or ``None`` when every key was a pin
    of a session that ended (nothing to send); ``lost``, how many were such pins (the
    caller raises :class:`~kvstore.errors.LeaseLost` for them).  Keys in neither
    counter stay in ``send``: the daemon says whether the session holds them.
    """
    send = list(keys)
    taken = Counter(k for k in send if take_pin(pins, k))
    lost = 0
    if ended:
        left = taken.copy()
        send = [k for k in send if take_pin(left, k) or not take_pin(ended, k)]
        lost = len(keys) - len(send)
        if not send:
            return taken, None, lost
    return taken, send, lost


def register_req(sid: int, ns: Namespace) -> pb.RegisterNamespaceRequest:
    return pb.RegisterNamespaceRequest(
        session_id=sid,
        spec=pb.NamespaceSpec(
            model_id=ns.model_id,
            num_layers=ns.num_layers,
            num_kv_heads=ns.num_kv_heads,
            head_dim=ns.head_dim,
            block_tokens=ns.block_tokens,
            kv_dtype=ns.kv_dtype,
            layout=ns.layout,
            tp_rank=ns.tp_rank,
            tp_size=ns.tp_size,
            tenant_salt=ns.tenant_salt,
            hash_algo=ns.hash_algo,
        ),
    )


def allocate_req(
    sid: int,
    ns_id: bytes,
    nbytes: int,
    parent: bytes | None,
    keys: Sequence[bytes],
    first_depth: int,
) -> pb.AllocateRequest:
    return pb.AllocateRequest(
        session_id=sid,
        namespace_id=ns_id,
        block_nbytes=nbytes,
        parent_key=parent or b"",
        keys=keys,
        first_depth=first_depth,
    )


def status_names(codes: Sequence[int]) -> list[str]:
    return [Status(c).name for c in codes]


def allocations(keys: Sequence[bytes], resp: Any, arena: ArenaMap) -> list[Allocation]:
    out = []
    for k, st, slot in zip(keys, resp.status, resp.slots, strict=True):
        view = arena.slot(slot.offset, slot.length) if st == Status.NEW else None
        out.append(Allocation(k, Status(st).name, view))
    return out


def acquired_views(resp: Any, arena: ArenaMap) -> list[memoryview | None]:
    return [
        arena.slot(s.offset, s.length) if st == Status.OK else None
        for st, s in zip(resp.status, resp.slots, strict=True)
    ]


def readonly_arrays(views: Sequence[memoryview]) -> list[np.ndarray]:
    """Read-only ``np.uint8`` arrays over arena views (no copy)."""
    out = []
    for v in views:
        a = np.frombuffer(v, dtype=np.uint8)
        a.flags.writeable = False
        out.append(a)
    return out


def parse_stats(resp: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(resp.json)
    return out


def as_u8(buf: Any) -> np.ndarray:
    """A flat ``np.uint8`` view of a bytes-like, ndarray or CPU torch tensor (no copy)."""
    if hasattr(buf, "detach") and hasattr(buf, "numpy"):  # torch.Tensor
        if buf.device.type != "cpu":
            raise InvalidArgument("store_tokens takes CPU buffers; use kvstore.paged_io for GPU")
        import torch

        buf = buf.detach().contiguous().view(-1).view(torch.uint8).numpy()
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            buf = np.ascontiguousarray(buf)
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)


def block_filler(
    blocks: Sequence[Any] | Callable[[int, np.ndarray], None], n: int, nbytes: int
) -> Callable[[int, np.ndarray], None]:
    """Validates ``blocks`` up front (count and sizes) and returns ``fill(i, dst)``."""
    if callable(blocks):
        return blocks
    if len(blocks) < n:
        raise InvalidArgument(f"{len(blocks)} blocks given for {n} full blocks of tokens")
    arrays = [as_u8(blocks[i]) for i in range(n)]
    for i, a in enumerate(arrays):
        if a.nbytes != nbytes:
            raise InvalidArgument(
                f"block {i} has {a.nbytes} bytes; the namespace's blocks have {nbytes}"
            )

    def fill(i: int, dst: np.ndarray) -> None:
        np.copyto(dst, arrays[i])

    return fill


def checksum(view: memoryview) -> int:
    """xxh3-64 of a block: the checksum every tier verifies."""
    return int(xxhash.xxh3_64_intdigest(view))


class HeldModels:
    """The models a client pinned in its current session, and those whose pin it lost.

    A reconnect to the same daemon within ``models.pin_grace_s`` carries the pins
    over (the daemon kept them); the others are *lost*: the daemon released them, so
    the model's extent may have been reused under the client's tensors.  Releasing
    a lost model raises :class:`~loader.errors.ModelPinLost`; loading it again gives
    fresh tensors and clears the mark.
    """

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.lost: set[str] = set()
        self.session = 0  # the session ``held`` is about, and the models it adopted
        self.adopted: frozenset[str] = frozenset()

    def loaded(self, name: str, pin: bool = True, session: int = 0) -> None:
        """``name`` was loaded (fresh tensors), pinned if ``pin`` for ``session``: the
        session the call ran in (0: this one).  A call that a reconnect overtook (an
        asyncio client's other coroutine) pinned in the session that ended: the model
        is held only if the new session adopted that pin, lost otherwise."""
        if (
            pin
            and session
            and session != self.session
            and name not in self.adopted
            and name not in self.held
        ):
            self.lost.add(name)
            self.warn({name}, session)
            return
        if pin:
            self.held.add(name)
        self.lost.discard(name)

    def released(self, name: str) -> bool:
        """``name``'s pin was given back; True when it had been lost before."""
        self.held.discard(name)
        if name in self.lost:
            self.lost.discard(name)
            return True
        return False

    def reopened(self, adopted: Sequence[str], previous: int, session: int = 0) -> None:
        """A new ``session`` (replacing ``previous``) adopted the pins of ``adopted``:
        the other models held are lost."""
        kept = set(adopted)
        self.session, self.adopted = session, frozenset(kept)
        lost = self.held - kept
        self.lost |= lost
        self.held &= kept
        self.warn(lost, previous)

    def warn(self, lost: set[str], previous: int) -> None:
        """Logs the models a reopen lost (the engine should load them again)."""
        if lost:
            _log.warning(
                "kvstore: the pins of model(s) %s ended with session %d and were not kept "
                "for this one (daemon restarted, or away past models.pin_grace_s): their "
                "tensors may have changed, load them again",
                ", ".join(sorted(lost)),
                previous,
            )

    def swapped_from(self, old: str) -> None:
        """A swap unpinned ``old``: warns if its pin had been lost before."""
        if self.released(old):
            _log.warning(
                "kvstore: the pin of model %r was lost before this swap: tensors read "
                "from it since may have changed",
                old,
            )
