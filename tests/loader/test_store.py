"""Ingest, list, remove; all-or-nothing on every kind of bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import xxhash

from loader.errors import ModelExistsError, ModelFormatError, ModelNotFoundError
from loader.manifest import ALIGN
from loader.store import ModelStore, resolve_sources
from tests.loader.conftest import small_model, write_model


def _nothing_left(store: ModelStore) -> None:
    assert store.list_models() == []
    assert list(store.data_dir.iterdir()) == []


def test_add_single_file_aligned_with_checksums(store: ModelStore, tmp_path: Path) -> None:
    ts = small_model()
    m = store.add("m", write_model(tmp_path / "m.safetensors", ts))
    assert m.nbytes % ALIGN == 0
    data = store.data_path(m).read_bytes()
    assert len(data) == m.nbytes
    for t in m.tensors:
        assert t.offset % ALIGN == 0
        ref = ts[t.name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert data[t.offset : t.offset + t.nbytes] == ref
        assert t.checksum == xxhash.xxh3_64_intdigest(ref)
    assert [x.name for x in store.list_models()] == ["m"]


def test_add_folder_of_shards_and_index(store: ModelStore, tmp_path: Path) -> None:
    ts = small_model()
    names = sorted(ts)
    a = {k: ts[k] for k in names[: len(names) // 2]}
    b = {k: ts[k] for k in names[len(names) // 2 :]}
    d = tmp_path / "shards"
    write_model(d / "model-00001-of-00002.safetensors", a)
    write_model(d / "model-00002-of-00002.safetensors", b)
    m = store.add("folder", d)
    assert {t.name for t in m.tensors} == set(ts)
    data = store.data_path(m).read_bytes()
    for t in m.tensors:  # each shard's bytes made it into the one data file
        ref = ts[t.name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert data[t.offset : t.offset + t.nbytes] == ref, t.name
    wmap = {k: "model-00001-of-00002.safetensors" for k in a}
    wmap |= {k: "model-00002-of-00002.safetensors" for k in b}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    m2 = store.add("index", d / "model.safetensors.index.json")
    assert {t.name for t in m2.tensors} == set(ts)
    # The source `models ls` shows: what was given, or for parsed shards their folder.
    assert (m.source, m2.source) == (str(d), str(d / "model.safetensors.index.json"))
    m3 = store.add("parsed", resolve_sources(d))
    assert m3.source == str(d)


def test_index_that_lies(store: ModelStore, tmp_path: Path) -> None:
    d = tmp_path / "shards"
    write_model(d / "s1.safetensors", {"a": torch.ones(4)})
    write_model(d / "s2.safetensors", {"b": torch.ones(4)})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s2.safetensors", "b": "s2.safetensors"}})
    )
    with pytest.raises(ModelFormatError, match="weight_map puts 'a' in s2"):
        store.add("m", d)
    _nothing_left(store)


def test_duplicate_tensor_across_shards(store: ModelStore, tmp_path: Path) -> None:
    d = tmp_path / "shards"
    write_model(d / "s1.safetensors", {"w": torch.ones(4)})
    write_model(d / "s2.safetensors", {"w": torch.zeros(4)})
    with pytest.raises(ModelFormatError, match="'w' appears in both"):
        store.add("m", d)
    _nothing_left(store)


def test_name_already_registered(store: ModelStore, tmp_path: Path) -> None:
    src = write_model(tmp_path / "m.safetensors", small_model())
    first = store.add("m", src)
    with pytest.raises(ModelExistsError, match="already registered"):
        store.add("m", src)
    assert store.list_models() == [first]
    assert [p.name for p in store.data_dir.iterdir()] == [first.data_file]


@pytest.mark.parametrize("bad", ["", "../x", "a b", "-x", "x" * 201])
def test_bad_model_names(store: ModelStore, tmp_path: Path, bad: str) -> None:
    src = write_model(tmp_path / "m.safetensors", small_model())
    with pytest.raises(ModelFormatError, match="invalid model name"):
        store.add(bad, src)


@pytest.mark.parametrize("kind", ["not_safetensors", "truncated", "unknown_dtype"])
def test_bad_input_leaves_nothing(store: ModelStore, tmp_path: Path, kind: str) -> None:
    good = write_model(tmp_path / "good.safetensors", small_model()).read_bytes()
    p = tmp_path / "bad.safetensors"
    if kind == "not_safetensors":
        p.write_bytes(b"\x00" * 64)
    elif kind == "truncated":
        p.write_bytes(good[: len(good) - 1000])
    else:
        p.write_bytes(good.replace(b'"BF16"', b'"BF99"', 1))
    with pytest.raises(ModelFormatError):
        store.add("m", p)
    _nothing_left(store)


def test_failure_half_way_removes_the_data_file(store: ModelStore, tmp_path: Path) -> None:
    src = write_model(tmp_path / "m.safetensors", small_model())
    calls = []

    def boom(n: int) -> None:
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt  # ^C half-way through the copy

    with pytest.raises(KeyboardInterrupt):
        store.add("m", src, progress=boom)
    _nothing_left(store)


def test_file_shrinks_during_ingest(store: ModelStore, tmp_path: Path) -> None:
    from loader.store import resolve_sources

    src = write_model(tmp_path / "m.safetensors", small_model())
    files = resolve_sources(src)
    os.truncate(src, src.stat().st_size - 500)
    with pytest.raises(ModelFormatError, match="changed size"):
        store.add("m", files)
    _nothing_left(store)


def test_remove(store: ModelStore, tmp_path: Path) -> None:
    m = store.add("m", write_model(tmp_path / "m.safetensors", small_model()))
    store.remove("m")
    assert not store.data_path(m).exists()
    with pytest.raises(ModelNotFoundError):
        store.remove("m")
    with pytest.raises(ModelNotFoundError, match="registered: none"):
        store.get("m")


def test_dead_writer_partials_are_cleaned(tmp_path: Path) -> None:
    d = tmp_path / "data" / "models" / "data"
    d.mkdir(parents=True)
    dead = d / "abc.pid999999999.partial"
    dead.write_bytes(b"x")
    live = d / f"def.pid{os.getpid()}.partial"
    live.write_bytes(b"x")
    with ModelStore(tmp_path / "data"):
        pass
    assert not dead.exists() and live.exists()


def test_second_store_handle_sees_adds(tmp_path: Path) -> None:
    src = write_model(tmp_path / "m.safetensors", small_model())
    with ModelStore(tmp_path / "d") as a, ModelStore(tmp_path / "d") as b:
        a.add("m", src)
        assert b.get("m").name == "m"


def test_get_reuses_its_parse_until_the_stored_manifest_changes(
    store: ModelStore, tmp_path: Path
) -> None:
    src = write_model(tmp_path / "a.safetensors", small_model(0))
    first = store.add("m", src)
    assert store.get("m") is store.get("m")  # parsed once, not on every load and swap
    # Removed and added again by another process: the new manifest, not the old parse.
    with ModelStore(store.root.parent) as other:
        other.remove("m")
        again = other.add("m", src)
        assert store.get("m").uid == again.uid != first.uid
        other.remove("m")
    with pytest.raises(ModelNotFoundError):
        store.get("m")
