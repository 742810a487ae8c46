"""The kvikio (GPUDirect) load path's orchestration, run on the CPU with a POSIX reader
(its CPU twin): segments read in parallel, verified by chunk as each lands."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from loader import gpu_direct as gd
from loader.errors import ModelStoreError
from loader.gpu import tensor_views
from loader.manifest import Manifest
from loader.store import ModelStore
from tests.loader.conftest import flip_byte, small_model, write_model

CHUNK = 64 << 10
CPU = torch.device("cpu")


@pytest.fixture
def stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ModelStore, Manifest]:
    # Segments of two chunks and two reads in flight: many segments, all paths taken.
    monkeypatch.setattr(gd, "SEGMENT_BYTES", 2 * CHUNK)
    monkeypatch.setattr(gd, "READS_IN_FLIGHT", 2)
    store = ModelStore(tmp_path / "d", chunk_bytes=CHUNK)
    m = store.add("m", write_model(tmp_path / "m.safetensors", small_model(3, 12)))
    assert m.nbytes > 4 * CHUNK
    yield store, m
    store.close()


def _load(store: ModelStore, m: Manifest, verify: bool = True) -> torch.Tensor:
    read, close = gd.posix_reader(str(store.data_path(m)))
    try:
        return gd.read_to_device(m, CPU, read, verify)
    finally:
        close()


def test_reads_every_byte_and_builds_the_tensors(stored: tuple[ModelStore, Manifest]) -> None:
    store, m = stored
    buf = _load(store, m)
    assert bytes(buf.numpy()) == store.data_path(m).read_bytes()
    ref = small_model(3, 12)
    got = tensor_views(m, buf, CPU)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


def test_a_corrupt_chunk_is_caught(stored: tuple[ModelStore, Manifest]) -> None:
    store, m = stored
    t = next(t for t in m.tensors if t.name == "layers.9.mlp.up")
    flip_byte(store.data_path(m), t.offset + 5)
    with pytest.raises(gd.ChunkMismatch) as ei:
        _load(store, m)
    assert ei.value.offset == (t.offset + 5) // CHUNK * CHUNK
    # Unverified, it loads (what --no-verify asks for): the file's bytes, flip included.
    assert bytes(_load(store, m, verify=False).numpy()) == store.data_path(m).read_bytes()


def test_a_short_file_is_an_error(stored: tuple[ModelStore, Manifest]) -> None:
    store, m = stored
    os.truncate(store.data_path(m), m.nbytes - CHUNK)
    with pytest.raises(ModelStoreError, match="short read"):
        _load(store, m, verify=False)


def test_which_manifests_can_use_it(stored: tuple[ModelStore, Manifest]) -> None:
    _, m = stored
    old = dataclasses.replace(m, chunks=None)  # added before chunk checksums
    assert gd.usable(m, True) and gd.usable(old, False) and not gd.usable(old, True)
    assert gd.segment_bytes(m) == 2 * CHUNK


def test_a_failing_read_is_a_store_error(stored: tuple[ModelStore, Manifest]) -> None:
    store, m = stored

    def broken(dest: torch.Tensor, offset: int, nbytes: int) -> int:
        raise OSError(5, "Input/output error")

    with pytest.raises(ModelStoreError, match="Input/output error"):
        gd.read_to_device(m, CPU, broken)
