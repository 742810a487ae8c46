"""Chunk checksums: recorded at ingest, verified per read on the I/O threads, and any
mismatch decided by the per-tensor checksums (a corrupt tensor is named, never loaded)."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import mmap
from pathlib import Path

import pytest
import xxhash

from loader.config import ModelsConfig
from loader.errors import ModelChecksumError
from loader.manifest import CHUNK_BYTES, ChunkSums, Manifest
from loader.pipeline import CopySink, HostSink, NullSink, ReadPipeline, ReadStats, Sink
from loader.residency import ResidencyManager
from loader.store import ModelStore
from tests.loader.conftest import flip_byte, small_model, write_model

CHUNK = 64 << 10


@pytest.fixture
def cstore(tmp_path: Path) -> ModelStore:
    s = ModelStore(tmp_path / "data", chunk_bytes=CHUNK)
    yield s
    s.close()


def _stored(store: ModelStore, tmp_path: Path) -> Manifest:
    return store.add("m", write_model(tmp_path / "m.safetensors", small_model(0, 12)))


def _read(
    store: ModelStore,
    m: Manifest,
    sink: Sink,
    ring_bytes: int = 2 * CHUNK,
    chunks: ChunkSums | None = None,
) -> ReadStats:
    pipe = ReadPipeline(io_threads=4, ring_buffers=3, ring_buffer_bytes=ring_bytes)
    try:
        return pipe.read(store.data_path(m), m.nbytes, sink, m.tensors, chunks or m.chunks)
    finally:
        pipe.close()


def test_ingest_records_every_chunk_of_the_file(cstore: ModelStore, tmp_path: Path) -> None:
    m = _stored(cstore, tmp_path)
    data = cstore.data_path(m).read_bytes()
    assert m.chunks is not None and m.chunks.size == CHUNK
    assert len(data) == m.nbytes and m.nbytes > 3 * CHUNK  # several chunks, padding in them
    assert list(m.chunks.sums) == [
        xxhash.xxh3_64_intdigest(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)
    ]
    assert cstore.get("m") == m  # through the index (JSON) and back
    # One compact string in the JSON (a 140 GB model has 35,000 sums; the daemon reads
    # the manifest on every load and swap).
    size, packed = json.loads(m.to_json())["chunks"]
    assert size == CHUNK and isinstance(packed, str) and len(packed) < 12 * len(m.chunks.sums)
    with ModelStore(tmp_path / "d2") as default:
        assert _stored(default, tmp_path).chunks.size == CHUNK_BYTES  # type: ignore[union-attr]


def test_manifest_without_chunks_still_loads(cstore: ModelStore, tmp_path: Path) -> None:
    # Manifests written before chunk sums existed have none: per-tensor verification.
    m = _stored(cstore, tmp_path)
    old = Manifest.from_json(dataclasses.replace(m, chunks=None).to_json())
    assert old.chunks is None and "chunks" not in json.loads(old.to_json())
    dest = bytearray(m.nbytes)
    st = _read(cstore, old, HostSink(memoryview(dest)))
    assert st.verify == "tensors"
    assert bytes(dest) == cstore.data_path(m).read_bytes()


@pytest.mark.parametrize("sink_kind", ["direct", "copy", "null"])
def test_reads_verified_by_chunk(cstore: ModelStore, tmp_path: Path, sink_kind: str) -> None:
    m = _stored(cstore, tmp_path)
    dest = mmap.mmap(-1, m.nbytes)
    mv = memoryview(dest)
    sink: Sink = {"direct": HostSink, "copy": CopySink}.get(sink_kind, lambda _: NullSink())(mv)
    st = _read(cstore, m, sink)
    assert st.verify == "chunks"
    if sink_kind != "null":
        assert bytes(mv) == cstore.data_path(m).read_bytes()
    mv.release()
    dest.close()


def test_reads_not_covering_whole_chunks_verify_per_tensor(
    cstore: ModelStore, tmp_path: Path
) -> None:
    m = _stored(cstore, tmp_path)
    # 48 KiB reads: a chunk spans two reads, so the tensors' checksums are used.
    assert _read(cstore, m, NullSink(), ring_bytes=48 << 10).verify == "tensors"
    # Chunk sums of another file size (a stale manifest) are not used either.
    wrong = ChunkSums(CHUNK, m.chunks.sums[:-1])  # type: ignore[union-attr]
    assert _read(cstore, m, NullSink(), chunks=wrong).verify == "tensors"


@pytest.mark.parametrize("sink_kind", ["direct", "copy"])
def test_corrupt_tensor_is_named(
    cstore: ModelStore, tmp_path: Path, sink_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    m = _stored(cstore, tmp_path)
    t = next(t for t in m.tensors if t.name == "layers.7.mlp.up")
    flip_byte(cstore.data_path(m), t.offset + t.nbytes // 2)
    dest = bytearray(m.nbytes)
    sink = HostSink(memoryview(dest)) if sink_kind == "direct" else CopySink(memoryview(dest))
    with caplog.at_level(logging.WARNING, "loader.pipeline"):
        with pytest.raises(ModelChecksumError, match=r"layers\.7\.mlp\.up"):
            _read(cstore, m, sink)
    assert "does not match its checksum" in caplog.text


def test_mismatch_only_in_padding_loads_the_right_bytes(cstore: ModelStore, tmp_path: Path) -> None:
    m = _stored(cstore, tmp_path)
    # A tensor whose end is not 4 KiB-aligned: the bytes after it are padding.
    t = next(t for t in m.tensors if t.nbytes and (t.offset + t.nbytes) % 4096)
    path = cstore.data_path(m)
    flip_byte(path, t.offset + t.nbytes)
    dest = bytearray(m.nbytes)
    st = _read(cstore, m, HostSink(memoryview(dest)))
    assert st.verify == "tensors after a chunk mismatch"
    data = path.read_bytes()
    for e in m.tensors:  # every tensor's bytes are right (the padding byte is not)
        assert dest[e.offset : e.offset + e.nbytes] == data[e.offset : e.offset + e.nbytes]


def test_wrong_chunk_sum_falls_back_to_the_tensors(cstore: ModelStore, tmp_path: Path) -> None:
    m = _stored(cstore, tmp_path)
    sums = list(m.chunks.sums)  # type: ignore[union-attr]
    sums[1] ^= 1
    dest = bytearray(m.nbytes)
    st = _read(cstore, m, HostSink(memoryview(dest)), chunks=ChunkSums(CHUNK, tuple(sums)))
    assert st.verify == "tensors after a chunk mismatch"
    assert bytes(dest) == cstore.data_path(m).read_bytes()


def test_daemon_loads_verify_by_chunk(tmp_path: Path) -> None:
    # The residency manager (the daemon's loads) passes the manifest's chunk sums.
    with ModelStore(tmp_path / "d", chunk_bytes=CHUNK) as store:
        m = _stored(store, tmp_path)
        cfg = ModelsConfig(dram_budget=m.nbytes + (4 << 20), ring_buffer_bytes=2 * CHUNK)
        mgr = ResidencyManager(store, cfg.validate())
        try:
            r = mgr.acquire("m", pin=False)
            assert r.read is not None and r.read.verify == "chunks"
        finally:
            mgr.close()


def test_fallback_leaves_no_view_on_the_destination(cstore: ModelStore, tmp_path: Path) -> None:
    # A caught chunk mismatch must not keep the read's frames (and their views on the
    # destination) alive in a reference cycle: the arena could not be unmapped.
    m = _stored(cstore, tmp_path)
    sums = list(m.chunks.sums)  # type: ignore[union-attr]
    sums[0] ^= 1
    dest = mmap.mmap(-1, m.nbytes)
    gc.disable()
    try:
        mv = memoryview(dest)
        st = _read(cstore, m, HostSink(mv), chunks=ChunkSums(CHUNK, tuple(sums)))
        assert st.verify == "tensors after a chunk mismatch"
        mv.release()
        dest.close()  # BufferError if a view survived
    finally:
        gc.enable()
