"""The read pipeline: bounded memory, verified bytes, direct and buffered reads."""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from loader.arena import ExtentAllocator
from loader.errors import ModelChecksumError, ModelStoreError
from loader.manifest import Manifest
from loader.pipeline import CopySink, HostSink, NullSink, ReadPipeline
from loader.store import ModelStore
from tests.loader.conftest import small_model, write_model

ROOT = Path(__file__).resolve().parents[2]


def _stored(store: ModelStore, tmp_path: Path, layers: int = 12) -> Manifest:
    return store.add("m", write_model(tmp_path / "m.safetensors", small_model(0, layers)))


@pytest.mark.parametrize("sink_kind", ["direct", "copy"])
def test_read_into_host_memory(store: ModelStore, tmp_path: Path, sink_kind: str) -> None:
    m = _stored(store, tmp_path)
    dest = mmap.mmap(-1, m.nbytes)
    mv = memoryview(dest)
    sink = HostSink(mv) if sink_kind == "direct" else CopySink(mv)
    pipe = ReadPipeline(io_threads=4, ring_buffers=3, ring_buffer_bytes=64 << 10)
    try:
        st = pipe.read(store.data_path(m), m.nbytes, sink, m.tensors)
    finally:
        pipe.close()
    assert (st.zero_copy_chunks > 0) == (sink_kind == "direct")
    assert (st.ring_chunks > 0) == (sink_kind == "copy")
    assert bytes(mv) == store.data_path(m).read_bytes()
    mv.release()
    dest.close()


def test_start_threads_spawns_every_reader(store: ModelStore, tmp_path: Path) -> None:
    m = _stored(store, tmp_path)
    before = {t.ident for t in threading.enumerate()}
    pipe = ReadPipeline(io_threads=6, ring_buffers=2, ring_buffer_bytes=64 << 10)
    try:
        assert pipe.start_threads() == 6
        readers = [
            t for t in threading.enumerate() if t.ident not in before and "loader-io" in t.name
        ]
        assert len(readers) == 6
        # The started threads serve reads (none is left blocked on the start gate).
        dest = bytearray(m.nbytes)
        pipe.read(store.data_path(m), m.nbytes, CopySink(memoryview(dest)), m.tensors)
        assert bytes(dest) == store.data_path(m).read_bytes()
        assert len([t for t in threading.enumerate() if "loader-io" in t.name]) >= 6
    finally:
        pipe.close()


def test_checksum_mismatch_names_tensor(store: ModelStore, tmp_path: Path) -> None:
    m = _stored(store, tmp_path)
    t = next(t for t in m.tensors if t.name == "layers.5.attn.qkv")
    with open(store.data_path(m), "r+b") as f:
        f.seek(t.offset + t.nbytes - 1)
        last = f.read(1)
        f.seek(t.offset + t.nbytes - 1)
        f.write(bytes([last[0] ^ 0x80]))
    pipe = ReadPipeline(2, 2, 64 << 10)
    try:
        with pytest.raises(ModelChecksumError, match="layers.5.attn.qkv"):
            pipe.read(store.data_path(m), m.nbytes, NullSink(), m.tensors)
    finally:
        pipe.close()


def test_short_data_file(store: ModelStore, tmp_path: Path) -> None:
    m = _stored(store, tmp_path)
    os.truncate(store.data_path(m), m.nbytes - 8192)
    pipe = ReadPipeline(2, 2, 64 << 10)
    try:
        with pytest.raises(ModelStoreError, match="truncated"):
            pipe.read(store.data_path(m), m.nbytes, NullSink(), m.tensors)
    finally:
        pipe.close()


def test_buffered_fallback_when_o_direct_refused(
    store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = _stored(store, tmp_path)
    real_open = os.open

    def no_direct(path: object, flags: int, *a: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_direct)
    pipe = ReadPipeline(2, 2, 64 << 10)
    try:
        st = pipe.read(store.data_path(m), m.nbytes, NullSink(), m.tensors)
    finally:
        pipe.close()
    assert not st.direct and "refused O_DIRECT" in st.fallback_reason


def test_buffered_fallback_when_a_direct_read_fails(
    store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = _stored(store, tmp_path)
    real = os.preadv
    direct_fds: set[int] = set()
    real_open = os.open

    def track_open(path: object, flags: int, *a: object) -> int:
        fd = real_open(path, flags, *a)  # type: ignore[arg-type]
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refuse(fd: int, bufs: list[memoryview], off: int, *a: object) -> int:
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, off)

    monkeypatch.setattr(os, "open", track_open)
    monkeypatch.setattr(os, "preadv", refuse)
    pipe = ReadPipeline(2, 2, 64 << 10)
    try:
        st = pipe.read(store.data_path(m), m.nbytes, NullSink(), m.tensors)
    finally:
        pipe.close()
    assert not st.direct


def test_extent_allocator() -> None:
    a = ExtentAllocator(1 << 20, align=64 << 10)
    x = a.alloc(100)
    y = a.alloc(300 << 10)
    z = a.alloc(64 << 10)
    assert (x, y, z) == (0, 64 << 10, 384 << 10)
    assert a.alloc(1 << 20) is None
    a.free(y, 300 << 10)
    assert a.alloc(320 << 10) == 64 << 10  # first fit reuses the hole
    a.free(64 << 10, 320 << 10)
    a.free(x, 100)
    a.free(z, 64 << 10)
    assert a.free_bytes == 1 << 20 and a.largest_free == 1 << 20  # coalesced
    assert a.alloc(100) == 0
    a.free(0, 100)
    with pytest.raises(ValueError, match="double free"):
        a.free(0, 100)


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from loader.config import ModelsConfig
    from loader.pipeline import NullSink, ReadPipeline
    from loader.residency import ResidencyManager
    from loader.store import ModelStore

    def status():
        out = {}
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
        return out

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    store = ModelStore(sys.argv[1])
    m = store.get("big")
    ring = (4, 1 << 20)
    res = {"model": m.nbytes, "ring": ring[0] * ring[1]}
    base = status()
    pipe = ReadPipeline(io_threads=4, ring_buffers=ring[0], ring_buffer_bytes=ring[1])
    reset_peak()
    pipe.read(store.data_path(m), m.nbytes, NullSink(), m.tensors)
    res["null_peak_growth"] = status()["VmHWM"] - base["VmRSS"]
    pipe.close()
    mgr = ResidencyManager(store, ModelsConfig(dram_budget=m.nbytes + (4 << 20),
        ring_buffers=ring[0], ring_buffer_bytes=ring[1], prefault=False).validate())
    base = status()
    reset_peak()
    mgr.acquire("big", pin=False)
    after = status()
    res["arena_peak_growth"] = after["VmHWM"] - base["VmRSS"]
    res["arena_anon_growth"] = after["RssAnon"] - base["RssAnon"]
    res["arena_shmem_growth"] = after["RssShmem"] - base["RssShmem"]
    mgr.close()
    print(json.dumps(res))
    """
)


def test_memory_bounded_by_ring_and_destination(tmp_path: Path) -> None:
    # A 48 MiB model through a 4 MiB ring.
    g = torch.Generator().manual_seed(0)
    ts = {f"w{i}": torch.randn(1024, 1536, generator=g) for i in range(8)}
    with ModelStore(tmp_path / "d") as st:
        st.add("big", write_model(tmp_path / "big.safetensors", ts))
    del ts
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "d")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    slack = 12 << 20  # interpreter, thread stacks, allocator noise
    assert r["model"] > 10 * r["ring"]
    # Through the ring: the process grows by the ring at most, not the model.
    assert r["null_peak_growth"] < r["ring"] + slack, r
    # Into the arena: the destination (shared memory) and nothing else.
    assert r["arena_anon_growth"] < slack, r
    assert r["arena_peak_growth"] < r["model"] + r["ring"] + slack, r
    assert r["arena_shmem_growth"] >= r["model"] * 0.9, r
