"""GPU tier: its logic on the host-memory twin (always), the CUDA backend and the
CUDA helpers on a GPU (``gpu`` marker)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvstore.config import ConfigError, TierConfig
from kvstore.entry import BlockEntry
from kvstore.hierarchy import Hierarchy, Level, Status
from kvstore.tiers import gpu as gpu_mod
from kvstore.tiers import load_backends
from kvstore.tiers.base import TIERS, ChecksumMismatch, TierIOError
from kvstore.tiers.dram import DramTier
from kvstore.tiers.gpu import (
    DEVICE_MEMORY,
    GpuTier,
    GpuUnavailable,
    host_address,
    pin_host_memory,
    read_chunks,
    read_file_into_device,
)

MiB = 1 << 20


def _entry(nbytes: int, checksum: int = 0) -> BlockEntry:
    return BlockEntry(
        key=os.urandom(32),
        ns=b"n" * 32,
        nbytes=nbytes,
        parent=None,
        depth=0,
        locs=[None, None],
        kid_tops=[0, 0],
        checksum=checksum,
    )


def _host_tier(capacity: int = 4 * MiB, slab: int = MiB, **kw: object) -> GpuTier:
    return GpuTier("gpu", capacity, backend="host", slab_bytes=slab, **kw)  # type: ignore[arg-type]


def test_registered_as_gpu_kind() -> None:
    load_backends()
    assert TIERS.get("gpu") is GpuTier
    assert set(DEVICE_MEMORY.names()) >= {"cuda", "host"}


def test_roundtrip_and_slot_accounting() -> None:
    t = _host_tier()
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 256, 300_000, dtype=np.uint8) for _ in range(3)]
    handles = []
    for b in blocks:
        h = t.reserve(len(b), _entry(len(b)))
        assert h is not None
        t.write(h, _entry(len(b)), memoryview(b))
        handles.append(h)
    assert len({h[0] for h in handles}) == 3
    assert t.used_bytes == 3 * (-(-300_000 // 4096) * 4096)
    for h, b in zip(handles, blocks, strict=True):
        out = bytearray(len(b))
        t.read_into(h, _entry(len(b)), memoryview(out))
        assert bytes(out) == b.tobytes()
    t.free(handles[1])
    assert t.reserve(300_000, _entry(300_000)) == handles[1]  # the freed slot is reused
    st = t.stats()
    assert st["kind"] == "gpu" and st["backend"] == "host" and st["capacity_bytes"] == 4 * MiB


def test_full_is_a_value_and_oversize_an_error() -> None:
    t = _host_tier(capacity=2 * MiB, slab=MiB)
    assert t.reserve(MiB, _entry(MiB)) is not None
    assert t.reserve(MiB, _entry(MiB)) is not None
    assert t.reserve(MiB, _entry(MiB)) is None  # full: the hierarchy evicts and retries
    with pytest.raises(ValueError, match="slab size"):
        t.reserve(MiB + 1, _entry(MiB + 1))
    with pytest.raises(ValueError, match="> 0"):
        t.reserve(0, _entry(0))


def test_bad_sizes_and_double_free_are_errors() -> None:
    t = _host_tier()
    h = t.reserve(8192, _entry(8192))
    with pytest.raises(ValueError, match="for a slot of 8192"):
        t.write(h, _entry(8192), memoryview(bytes(100)))
    with pytest.raises(ValueError, match="buffer for a block"):
        t.read_into(h, _entry(8192), memoryview(bytearray(100)))
    t.free(h)
    with pytest.raises(AssertionError, match="double free"):
        t.free(h)


def test_verify_reads_catches_corruption() -> None:
    t = _host_tier(verify_reads=True)
    data = os.urandom(10_000)
    e = _entry(len(data), checksum=xxhash.xxh3_64_intdigest(data))
    h = t.reserve(len(data), e)
    t.write(h, e, memoryview(data))
    out = bytearray(len(data))
    t.read_into(h, e, memoryview(out))
    assert bytes(out) == data
    assert isinstance(t.mem, gpu_mod.HostMemory) and t.mem.buf is not None
    t.mem.buf[h[0] + 17] ^= 0xFF
    with pytest.raises(ChecksumMismatch):
        t.read_into(h, e, memoryview(out))


@pytest.mark.parametrize("verify", [False, True])
def test_batched_reads_and_writes(verify: bool) -> None:
    t = _host_tier(verify_reads=verify)
    datas = [os.urandom(n) for n in (5000, 70_000, 1)]
    es = [_entry(len(d), checksum=xxhash.xxh3_64_intdigest(d)) for d in datas]
    hs = [t.reserve(len(d), e) for d, e in zip(datas, es, strict=True)]
    t.write_many([(h, e, memoryview(d)) for h, e, d in zip(hs, es, datas, strict=True)])
    outs = [bytearray(len(d) + 3) for d in datas]  # larger buffers are fine
    res = t.read_many([(h, e, memoryview(o)) for h, e, o in zip(hs, es, outs, strict=True)])
    assert res == [None, None, None]
    assert [bytes(o[: len(d)]) for o, d in zip(outs, datas, strict=True)] == datas
    assert isinstance(t.mem, gpu_mod.HostMemory) and t.mem.buf is not None
    t.mem.buf[hs[1][0]] ^= 1
    res = t.read_many([(h, e, memoryview(o)) for h, e, o in zip(hs, es, outs, strict=True)])
    assert [type(r) for r in res] == (
        [type(None), ChecksumMismatch, type(None)] if verify else [type(None)] * 3
    )
    with pytest.raises(ValueError, match="for a slot of"):
        t.write_many([(hs[0], es[0], memoryview(b"short"))])
    with pytest.raises(ValueError, match="buffer for a block"):
        t.read_many([(hs[1], es[1], memoryview(bytearray(10)))])


def test_ipc_export_bookkeeping() -> None:
    t = _host_tier()
    hs = [t.reserve(5000, _entry(5000)) for _ in range(2)]
    ex = t.ipc_export(hs)
    assert ex.slots == [(hs[0][0], 5000), (hs[1][0], 5000)]
    assert ex.pool_nbytes == t.capacity_bytes and ex.device == 0
    assert ex.ipc_handle == t.mem.ipc_handle() and ex.ipc_handle
    assert t.stats()["exports"] == 1
    assert t.device_ptr(hs[1]) == t.mem.ptr + hs[1][0]
    with pytest.raises(ValueError, match="outside the pool"):
        t.ipc_export([(t.capacity_bytes - 10, 4096)])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"colour": "red"}, "unknown option"),
        ({"backend": "host", "device": -1}, "device must be an integer"),
        ({"backend": "host", "device": True}, "device must be an integer"),
        ({"backend": "tpu"}, "unknown backend 'tpu'"),
        ({"backend": "host", "verify_reads": "yes"}, "verify_reads"),
        ({"backend": "host", "slab_bytes": "lots"}, "cannot parse size"),
    ],
)
def test_config_validation(options: dict, match: str, tmp_path: Path) -> None:
    cfg = TierConfig(name="hbm", kind="gpu", capacity=8 * MiB, options=options)
    with pytest.raises(ConfigError, match=match):
        GpuTier.from_config(cfg, tmp_path)


def test_config_builds_host_twin_and_refuses_cuda_without_gpu(tmp_path: Path) -> None:
    cfg = TierConfig(
        name="hbm",
        kind="gpu",
        capacity=8 * MiB,
        options={"backend": "host", "slab_bytes": "2MiB", "verify_reads": True},
    )
    t = GpuTier.from_config(cfg, tmp_path)
    assert isinstance(t, GpuTier) and t.alloc.slab_bytes == 2 * MiB and t.verify_reads
    if gpu_mod.cuda_available():
        pytest.skip("a GPU is present: the no-GPU message cannot be checked here")
    with pytest.raises(ConfigError, match="needs cupy and a CUDA device"):
        GpuTier.from_config(TierConfig(name="hbm", kind="gpu", capacity=8 * MiB), tmp_path)
    with pytest.raises(ConfigError, match="smaller than one slab"):
        GpuTier("g", 100, backend="host")


def test_in_a_hierarchy_above_dram() -> None:
    """GPU as level 0 above the DRAM write tier: promote into it, demote out of it."""
    dram = DramTier("dram", 8 * MiB, slab_bytes=MiB, prefault=False)
    g = _host_tier(capacity=2 * MiB, slab=MiB)
    try:
        h = Hierarchy([Level.build(g, block_hint=MiB), Level.build(dram, block_hint=MiB)], 1)
        keys = [bytes([i]) * 32 for i in range(3)]
        st, entries = h.allocate(1, b"n" * 32, 300_000, None, keys)
        assert st == [Status.NEW] * 3
        datas = [os.urandom(300_000) for _ in keys]
        for e, d in zip(entries, datas, strict=True):
            assert e is not None
            dram.view(e.locs[1])[:] = d
        sums = [xxhash.xxh3_64_intdigest(d) for d in datas]
        assert h.commit(1, keys, sums) == [Status.OK] * 3
        st, got = h.acquire(keys, target=0)  # into the GPU tier: it holds 2 slots of 3
        ok = [e for s, e in zip(st, got, strict=True) if s == Status.OK]
        assert ok, st
        for e in ok:
            assert e is not None and e.locs[0] is not None
            out = bytearray(300_000)
            g.read_into(e.locs[0], e, memoryview(out))
            assert bytes(out) == datas[keys.index(e.key)]
        h.release(ok)
    finally:
        g.close()
        dram.close()


# ---------------------------------------------------------------- helpers on CPU
def test_host_address_of_buffers() -> None:
    ba = bytearray(100)
    addr, n = host_address(memoryview(ba))
    assert n == 100 and addr == np.frombuffer(ba, np.uint8).ctypes.data
    mm = mmap.mmap(-1, 8192)
    assert host_address(mm)[1] == 8192
    mm.close()  # host_address kept no export on the mapping
    with pytest.raises(ValueError, match="empty"):
        host_address(bytearray())
    with pytest.raises(ValueError, match="contiguous"):
        host_address(np.zeros(10, np.uint8)[::2])


@pytest.mark.skipif(gpu_mod.cuda_available(), reason="checks the no-GPU error")
def test_cuda_helpers_say_no_gpu() -> None:
    assert gpu_mod.pin_host_memory_if_gpu(bytearray(4096)) is None
    with pytest.raises(GpuUnavailable, match="needs cupy and a CUDA device"):
        pin_host_memory(bytearray(4096))
    with pytest.raises(GpuUnavailable):
        read_file_into_device("/dev/null", 0, 10, 0)
    with pytest.raises(GpuUnavailable):
        GpuTier("g", 8 * MiB, backend="cuda")
    with pytest.raises(ValueError, match=">= 0"):
        read_file_into_device("/dev/null", -1, 10, 0)


@pytest.mark.parametrize(
    ("offset", "nbytes", "buf"), [(0, 100_000, 4096), (123, 50_000, 7000), (5, 0, 64)]
)
def test_read_chunks_moves_every_byte(tmp_path: Path, offset: int, nbytes: int, buf: int) -> None:
    data = os.urandom(120_000)
    p = tmp_path / "seg"
    p.write_bytes(data)
    dst = bytearray(nbytes)
    bufs = [memoryview(bytearray(buf)) for _ in range(2)]
    busy = [False, False]

    def submit(off: int, chunk: memoryview, i: int) -> None:
        assert not busy[i], "buffer refilled before its copy finished"
        busy[i] = True
        dst[off : off + len(chunk)] = chunk

    def wait(i: int) -> None:
        busy[i] = False

    fd = os.open(p, os.O_RDONLY)
    try:
        assert read_chunks(fd, offset, nbytes, bufs, submit, wait) == nbytes
    finally:
        os.close(fd)
    assert bytes(dst) == data[offset : offset + nbytes]


def test_read_chunks_stops_at_end_of_file(tmp_path: Path) -> None:
    p = tmp_path / "short"
    p.write_bytes(b"x" * 1000)
    fd = os.open(p, os.O_RDONLY)
    try:
        got = read_chunks(
            fd, 900, 500, [memoryview(bytearray(64))], lambda *a: None, lambda i: None
        )
    finally:
        os.close(fd)
    assert got == 100


# ---------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_cuda_tier_roundtrip_pinned_and_pageable() -> None:
    t = GpuTier("gpu", 64 * MiB, backend="cuda", slab_bytes=4 * MiB)
    try:
        data = os.urandom(3 * MiB)
        h = t.reserve(len(data), _entry(len(data)))
        t.write(h, _entry(len(data)), memoryview(data))
        mm = mmap.mmap(-1, 4 * MiB)
        with pin_host_memory(mm) as pinned:
            assert pinned.nbytes == 4 * MiB
            view = memoryview(mm)[: len(data)]
            t.read_into(h, _entry(len(data)), view)
            assert bytes(view) == data
            view.release()
        mm.close()
        out = bytearray(len(data))
        t.read_into(h, _entry(len(data)), memoryview(out))
        assert bytes(out) == data
        # Batched, from pageable memory: queued on one stream, one sync.
        more = [os.urandom(MiB + i) for i in range(5)]
        hs = [t.reserve(len(m), _entry(len(m))) for m in more]
        t.write_many([(h2, _entry(len(m)), memoryview(m)) for h2, m in zip(hs, more, strict=True)])
        outs = [bytearray(len(m)) for m in more]
        items = [
            (h2, _entry(len(m)), memoryview(o)) for h2, m, o in zip(hs, more, outs, strict=True)
        ]
        assert t.read_many(items) == [None] * 5
        assert [bytes(o) for o in outs] == more
    finally:
        t.close()


def _child_reads_export(export: gpu_mod.GpuExport, q: object) -> None:
    pool = gpu_mod.open_ipc_pool(export)
    off, n = export.slots[0]
    q.put(bytes(pool.tensor(off, n).cpu().numpy()))  # type: ignore[attr-defined]
    pool.close()


@pytest.mark.gpu
def test_ipc_export_opens_in_another_process() -> None:
    import multiprocessing as mp

    t = GpuTier("gpu", 16 * MiB, backend="cuda", slab_bytes=MiB)
    try:
        data = os.urandom(70_000)
        h = t.reserve(len(data), _entry(len(data)))
        t.write(h, _entry(len(data)), memoryview(data))
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_child_reads_export, args=(t.ipc_export([h]), q))
        p.start()
        got = q.get(timeout=120)
        p.join(60)
        assert p.exitcode == 0 and got == data
    finally:
        t.close()


@pytest.mark.gpu
@pytest.mark.parametrize("use_kvikio", [False, True])
@pytest.mark.parametrize("by_fd", [False, True])
def test_read_file_into_device(tmp_path: Path, use_kvikio: bool, by_fd: bool) -> None:
    import cupy

    if use_kvikio and not gpu_mod.kvikio_available():
        pytest.skip("kvikio not installed")
    data = os.urandom(20 * MiB + 333)
    p = tmp_path / "seg"
    p.write_bytes(data)
    dev = cupy.full(12 * MiB, 0xA5, dtype=cupy.uint8)
    fd = os.open(p, os.O_RDONLY) if by_fd else -1
    try:
        src = fd if by_fd else str(p)
        n = read_file_into_device(src, 4096 + 7, 12 * MiB, dev.data.ptr, use_kvikio=use_kvikio)
        assert n == 12 * MiB
        assert cupy.asnumpy(dev).tobytes() == data[4103 : 4103 + 12 * MiB]
        with pytest.raises(TierIOError, match="short read|failed"):
            read_file_into_device(src, len(data) - 100, 1000, dev.data.ptr, use_kvikio=use_kvikio)
    finally:
        if by_fd:
            os.close(fd)
        gpu_mod.close_device_files()


GPU_ABOVE_DRAM = """
[server]
lease_timeout_s = 2.0

[[tiers]]
name = "hbm"
kind = "gpu"
capacity = "8MiB"
options = { backend = "host", slab_bytes = "4MiB" }

[[tiers]]
name = "dram"
kind = "dram"
capacity = "64MiB"
options = { slab_bytes = "4MiB" }
"""


def test_daemon_runs_with_a_gpu_tier(make_daemon) -> None:  # type: ignore[no-untyped-def]
    """The daemon builds a `gpu` tier from its config (host twin) and serves blocks."""
    from kvstore import Client, Namespace

    d = make_daemon(GPU_ABOVE_DRAM).start()
    ns = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=64, block_tokens=16)
    tokens = list(range(48))
    blocks = [os.urandom(ns.block_nbytes) for _ in range(3)]
    with Client(d.socket) as c:
        assert c.store_tokens(ns, tokens, blocks).new == 3
        with c.load_tokens(ns, tokens) as lease:
            assert [a.tobytes() for a in lease.arrays] == blocks
        assert "hbm" in str(c.stats())
