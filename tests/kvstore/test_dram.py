"""The shared-memory arena and its slab allocator."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from kvstore.config import ConfigError, TierConfig
from kvstore.tiers.dram import ALIGN, DramTier, SlabAllocator


def test_slab_allocator_mixed_sizes_share_one_arena() -> None:
    a = SlabAllocator(capacity=8 * 65536, slab_bytes=65536)
    small = [a.alloc(4096) for _ in range(16)]  # one slab
    big = [a.alloc(30_000) for _ in range(4)]  # stride 32 KiB: two slabs
    assert None not in small and None not in big
    offs = sorted(o for o in small + big if o is not None)
    assert len(set(offs)) == len(offs)
    assert all(o % ALIGN == 0 for o in offs)
    assert a.free_slabs() == 8 - 3
    for o in small:
        assert o is not None
        a.free(o)
    assert a.free_slabs() == 8 - 2  # an empty slab goes back to the pool
    assert a.used_bytes == 4 * 32768


def test_slab_allocator_full_returns_none_and_reuses() -> None:
    a = SlabAllocator(capacity=2 * 8192, slab_bytes=8192)
    offs = [a.alloc(4096) for _ in range(4)]
    assert None not in offs
    assert a.alloc(4096) is None
    a.free(offs[1])  # type: ignore[arg-type]
    assert a.alloc(100) == offs[1]
    with pytest.raises(ValueError, match="slab"):
        a.alloc(8193)
    with pytest.raises(AssertionError, match="double free"):
        a.free(offs[0])  # type: ignore[arg-type]
        a.free(offs[0])  # type: ignore[arg-type]


def test_arena_is_shared_with_another_mapping() -> None:
    t = DramTier("dram", 1 << 20, slab_bytes=1 << 16)
    try:
        h = t.reserve(5000, None)  # type: ignore[arg-type]
        assert h is not None
        t.view(h)[:5] = b"hello"
        fd = os.open(t.arena.path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, t.arena.size)
        finally:
            os.close(fd)
        assert mm[h[0] : h[0] + 5] == b"hello"
        mm.close()
        assert t.stats()["used_bytes"] == 8192
        t.free(h)
        assert t.used_bytes == 0
    finally:
        t.close()


def test_dram_options_validated(tmp_path: object) -> None:
    cfg = TierConfig("dram", "dram", 1 << 20, options={"slab_size": 1})
    with pytest.raises(ConfigError, match="slab_size.*known: slab_bytes"):
        DramTier.from_config(cfg, tmp_path)  # type: ignore[arg-type]
    cfg = TierConfig("dram", "dram", 1 << 20, options={"prefault": "yes"})
    with pytest.raises(ConfigError, match="prefault"):
        DramTier.from_config(cfg, tmp_path)  # type: ignore[arg-type]


def test_cxl_tier_binds_to_numa_node(tmp_path: object) -> None:
    from kvstore.tiers.dram import CxlTier

    with pytest.raises(ConfigError, match="numa_node"):
        CxlTier.from_config(TierConfig("cxl", "cxl", 1 << 20), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no such NUMA node"):
        CxlTier.from_config(
            TierConfig("cxl", "cxl", 1 << 20, options={"numa_node": 4096}),
            tmp_path,  # type: ignore[arg-type]
        )
    # On a one-node machine, node 0 stands in for the CXL node.
    t = CxlTier.from_config(
        TierConfig("cxl", "cxl", 1 << 20, options={"numa_node": 0, "slab_bytes": 65536}),
        tmp_path,  # type: ignore[arg-type]
    )
    try:
        assert t.stats()["numa_node"] == 0 and t.kind == "cxl"
        assert _numa_policy(t.arena.mm) == "bind:0"  # the kernel's policy for the arena
    finally:
        t.close()
    d = DramTier("dram", 1 << 20, slab_bytes=1 << 16)
    try:
        assert _numa_policy(d.arena.mm) == "default"  # a plain DRAM tier binds nothing
    finally:
        d.close()


def _numa_policy(mm: mmap.mmap) -> str:
    """The memory policy /proc/self/numa_maps shows for the mapping ``mm``."""
    maps = Path("/proc/self/numa_maps")
    if not maps.exists():
        pytest.skip("no /proc/self/numa_maps (a kernel without NUMA support)")
    buf = (ctypes.c_char * 1).from_buffer(mm)
    addr = ctypes.addressof(buf)
    del buf
    for line in maps.read_text().splitlines():
        start, policy = line.split()[:2]
        if int(start, 16) == addr:
            return policy
    raise AssertionError("mapping not found in /proc/self/numa_maps")
