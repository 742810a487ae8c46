"""Helpers shared by the NVMe tier tests (and the crash-test writer process)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from kvstore.entry import BlockEntry
from kvstore.tiers.nvme import NvmeOptions, NvmeTier

NS = b"n" * 32


def key_of(i: int, salt: int = 0) -> bytes:
    return xxhash.xxh3_128_digest(f"{salt}:{i}".encode()) * 2


def data_for(key: bytes, nbytes: int) -> bytes:
    """Deterministic bytes of a key, so a reader can tell right bytes from wrong."""
    return np.random.default_rng(int.from_bytes(key[:8], "little")).bytes(nbytes)


def bf16_for(key: bytes, nbytes: int) -> bytes:
    """Deterministic bf16-like bytes of a key (normal values: the compression codec
    stores them in ~1/1.46 of the space); an odd ``nbytes`` drops the last byte."""
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    f = rng.standard_normal((nbytes + 1) // 2, dtype=np.float32)
    return (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()[:nbytes]


def entry(
    key: bytes, nbytes: int, checksum: int = 0, parent: BlockEntry | None = None, depth: int = 0
) -> BlockEntry:
    return BlockEntry(
        key=key,
        ns=NS,
        nbytes=nbytes,
        parent=parent,
        depth=depth,
        locs=[None],
        kid_tops=[0],
        checksum=checksum,
    )


def open_tier(path: Path, capacity: int = 256 << 20, **opts: Any) -> NvmeTier:
    o = {"segment_bytes": 1 << 20, "staging_bytes": 1 << 20, "io_threads": 2}
    o.update(opts)
    return NvmeTier("nvme", capacity, path, NvmeOptions(**o))


def put(
    t: NvmeTier,
    key: bytes,
    nbytes: int,
    checksum: int = 0,
    data_fn: Callable[[bytes, int], bytes] = data_for,
) -> tuple[Any, BlockEntry, bytes]:
    data = data_fn(key, nbytes)
    e = entry(key, nbytes, checksum)
    h = t.reserve(nbytes, e)
    assert h is not None
    t.write(h, e, memoryview(data))
    return h, e, data


def read(t: NvmeTier, h: Any, e: BlockEntry) -> bytes:
    out = bytearray(e.nbytes)
    t.read_into(h, e, memoryview(out))
    return bytes(out)
