"""Content-addressed block keys.

A block key is ``H(parent_key || token_ids || extra)`` over a canonical byte
encoding, so every engine, process, host and Python version computes the same
32 bytes for the same tokens.  The namespace (model, KV dtype and layout,
tensor-parallel rank, tenant salt) is folded in once: the first block's parent
is the namespace digest.  Never Python's ``hash()``: it changes with
``PYTHONHASHSEED``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NewType

import numpy as np

BlockKey = NewType("BlockKey", bytes)
"""32 bytes that name one immutable KV block."""

KEY_BYTES = 32
HASH_ALGOS = ("sha256", "xxh3_128")

# Bytes per element of the KV dtypes a namespace may name.
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

_BLOCK_TAG = b"kvstore/block/v1"
_NS_TAG = b"kvstore/namespace/v1"
_U32 = struct.Struct("<I")
_XXH_SEED_HI = 0x9E3779B97F4A7C15


class KeyInputError(ValueError):
    """Raised for input that cannot be turned into a key (bad tokens, sizes)."""


def key_length_error(keys: Sequence[bytes], field: str = "keys") -> str:
    """'' when every key is ``KEY_BYTES`` long, else a message naming the first bad one.
    One C-level pass; the culprit is searched only on error."""
    if not set(map(len, keys)) - {KEY_BYTES}:
        return ""
    i, k = next((i, k) for i, k in enumerate(keys) if len(k) != KEY_BYTES)
    return (
        f"{field}[{i}] is {len(k)} bytes; block keys are {KEY_BYTES} bytes "
        "(compute them with kvstore.keys)"
    )


def unpack_keys(packed: bytes) -> list[bytes]:
    """Splits concatenated 32-byte keys (a multiple of ``KEY_BYTES`` long) in one C pass.

    ``V32`` (raw void), not ``S32``: a bytes dtype would strip trailing zero bytes.
    """
    if len(packed) % KEY_BYTES:
        raise KeyInputError(f"{len(packed)} bytes is not a whole number of {KEY_BYTES}-byte keys")
    return np.frombuffer(packed, dtype=f"V{KEY_BYTES}").tolist()  # type: ignore[no-any-return]


def _digest(data: bytes, algo: str) -> bytes:
    if algo == "sha256":
        return hashlib.sha256(data).digest()
    if algo == "xxh3_128":
        import xxhash  # local: optional fast path for trusted single-tenant use

        # Two independent 128-bit digests make the same 32-byte key width as sha256.
        return xxhash.xxh3_128_digest(data) + xxhash.xxh3_128_digest(data, seed=_XXH_SEED_HI)
    raise KeyInputError(f"unknown hash algorithm {algo!r}; known: {', '.join(HASH_ALGOS)}")


def encode_tokens(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Encode token ids canonically as little-endian uint32.

    Raises:
        KeyInputError: if a token id is negative or does not fit in 32 bits.
    """
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise KeyInputError(f"token ids must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise KeyInputError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF):
        raise KeyInputError("token ids must be in [0, 2**32)")
    return arr.astype("<u4", copy=False).tobytes()


def block_key(
    parent: bytes, token_ids: Sequence[int] | np.ndarray, extra: bytes = b"", algo: str = "sha256"
) -> BlockKey:
    """Key of one block given its parent key (or the namespace digest for the first)."""
    if len(parent) != KEY_BYTES:
        raise KeyInputError(f"parent key must be {KEY_BYTES} bytes, got {len(parent)}")
    toks = encode_tokens(token_ids)
    data = b"".join(
        (_BLOCK_TAG, parent, _U32.pack(len(toks) // 4), toks, _U32.pack(len(extra)), extra)
    )
    return BlockKey(_digest(data, algo))


@dataclass(frozen=True, slots=True)
class Namespace:
    """What makes two blocks comparable.

    Blocks of different namespaces never share a key.  ``layout`` names how the
    engine arranges one block's bytes (e.g. ``"vllm_cpu"``); it is part of the
    identity because the same tokens under another layout are other bytes.
    """

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int
    kv_dtype: str = "bfloat16"
    layout: str = "generic"
    tp_rank: int = 0
    tp_size: int = 1
    tenant_salt: bytes = field(default=b"", repr=False)
    hash_algo: str = "sha256"

    def __post_init__(self) -> None:
        if not self.model_id:
            raise KeyInputError("namespace model_id must not be empty")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise KeyInputError(f"namespace {name} must be a positive integer, got {value!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise KeyInputError(f"tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")
        if self.kv_dtype not in DTYPE_BYTES:
            raise KeyInputError(
                f"unknown kv_dtype {self.kv_dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}"
            )
        if self.hash_algo not in HASH_ALGOS:
            raise KeyInputError(
                f"unknown hash_algo {self.hash_algo!r}; known: {', '.join(HASH_ALGOS)}"
            )

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block: layers x 2 (K, V) x tokens x kv_heads x head_dim x dtype."""
        return (
            self.num_layers
            * 2
            * self.block_tokens
            * self.num_kv_heads
            * self.head_dim
            * DTYPE_BYTES[self.kv_dtype]
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tenant_salt"] = self.tenant_salt.hex()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Namespace:
        d = dict(d)
        salt = d.get("tenant_salt", "")
        d["tenant_salt"] = bytes.fromhex(salt) if isinstance(salt, str) else bytes(salt)
        return cls(**d)

    def digest(self) -> bytes:
        """32-byte sha256 of the canonical encoding; the root parent of every chain."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(_NS_TAG + canon).digest()

    def block_keys(
        self,
        token_ids: Sequence[int] | np.ndarray,
        parent: bytes | None = None,
        extras: Sequence[bytes] | None = None,
    ) -> list[BlockKey]:
        """Chained keys of every *full* block of ``token_ids``.

        Args:
            token_ids: the tokens, from the start of the sequence unless ``parent``
                is given (then from the first token after the parent's block).
            parent: key of the block before ``token_ids[0]``; ``None`` for the
                namespace root.
            extras: optional per-block extra bytes (e.g. LoRA id, multimodal hash).

        Returns:
            One key per full block; a trailing partial block is not keyed.
        """
        toks = np.asarray(token_ids)
        if toks.ndim != 1:
            raise KeyInputError(f"token ids must be one-dimensional, got shape {toks.shape}")
        n = len(toks) // self.block_tokens
        if extras is not None and len(extras) < n:
            raise KeyInputError(f"need {n} extras for {n} full blocks, got {len(extras)}")
        prev = self.digest() if parent is None else parent
        out: list[BlockKey] = []
        bt = self.block_tokens
        for i in range(n):
            prev = block_key(
                prev, toks[i * bt : (i + 1) * bt], extras[i] if extras else b"", self.hash_algo
            )
            out.append(prev)
        return out
