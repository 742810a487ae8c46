"""The Models gRPC service end to end: load, views, swap, prefetch, release, errors."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import torch

from kvstore.errors import (
    FailedPrecondition,
    InvalidArgument,
    KVStoreError,
    NotFound,
    ResourceExhausted,
)
from loader import client
from loader.errors import (
    ModelBudgetError,
    ModelChecksumError,
    ModelError,
    ModelExistsError,
    ModelFormatError,
    ModelNotFoundError,
    ModelStoreError,
)
from loader.store import ModelStore
from tests.loader.conftest import ServerHandle, flip_byte, small_model, write_model


def _add(
    server: ServerHandle, tmp_path: Path, name: str, seed: int, layers: int = 3
) -> dict[str, torch.Tensor]:
    ts = small_model(seed, layers)
    src = write_model(tmp_path / f"{name}.safetensors", ts)
    # A separate store handle, as `kvstore models add` in another process would use.
    with ModelStore(server.data_dir) as st:
        st.add(name, src)
    return ts


def test_load_returns_views_equal_to_source(server: ServerHandle, tmp_path: Path) -> None:
    ref = _add(server, tmp_path, "a", 1)
    got = client.load_model(server.channel, "a")
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert torch.equal(got[k], v), k
    # Views on shared memory: the storage is not owned by torch (a copy's would be),
    # and every tensor sits in one mapping of the model at its offset in the file.
    big = got["layers.0.mlp.up"]
    assert not big.untyped_storage().resizable()
    with ModelStore(server.data_dir) as st:
        offsets = {t.name: t.offset for t in st.get("a").tensors}
    base = big.data_ptr() - offsets["layers.0.mlp.up"]
    assert all(got[k].data_ptr() - offsets[k] == base for k in got if got[k].numel())
    # Writes are private: another load still sees the original bytes.
    big.zero_()
    again = client.load_model(server.channel, "a")
    assert torch.equal(again["layers.0.mlp.up"], ref["layers.0.mlp.up"])


def test_second_load_is_served_from_dram(server: ServerHandle, tmp_path: Path) -> None:
    _add(server, tmp_path, "a", 1)
    client.load_model(server.channel, "a")
    loads = server.servicer.manager.counters.loads
    client.load_model(server.channel, "a")
    assert server.servicer.manager.counters.loads == loads
    assert server.servicer.manager.counters.hits >= 1


def test_swap_pins_new_and_unpins_old(server: ServerHandle, tmp_path: Path) -> None:
    _add(server, tmp_path, "a", 1)
    ref_b = _add(server, tmp_path, "b", 2)
    client.load_model(server.channel, "a", session_id=7)
    got = client.swap_models(server.channel, "a", "b", session_id=7)
    assert torch.equal(got["embed.weight"], ref_b["embed.weight"])
    states = {m["name"]: m for m in client.list_models(server.channel)}
    assert states["b"]["pins"] == 1 and states["a"]["pins"] == 0
    assert states["a"]["state"] == "ready"  # evictable, not dropped


def test_swap_to_resident_model_is_fast(server: ServerHandle, tmp_path: Path) -> None:
    _add(server, tmp_path, "a", 1)
    _add(server, tmp_path, "b", 2)
    client.load_model(server.channel, "a")
    client.load_model(server.channel, "b", pin=False)
    loads = server.servicer.manager.counters.loads
    t0 = time.perf_counter()
    client.swap_models(server.channel, "a", "b")
    # Generous bound for a loaded 2-core CI box; the benchmark measures the real figure.
    assert time.perf_counter() - t0 < 0.5
    # What makes it fast: "b" is served from DRAM, not read from disk again.
    assert server.servicer.manager.counters.loads == loads


def test_prefetch_then_load(server: ServerHandle, tmp_path: Path) -> None:
    _add(server, tmp_path, "a", 1)
    assert client.prefetch_model(server.channel, "a") in ("loading", "ready")
    client.load_model(server.channel, "a")
    assert server.servicer.manager.counters.loads == 1


def test_lru_eviction_under_budget_and_pins(server: ServerHandle, tmp_path: Path) -> None:
    # Each model is ~0.7 MiB; the budget is 8 MiB: overfill it with unpinned models.
    for i in range(16):
        _add(server, tmp_path, f"m{i}", i, layers=12)
    pinned = client.load_model(server.channel, "m0")
    for i in range(1, 16):
        client.load_model(server.channel, f"m{i}", pin=False)
    assert server.servicer.manager.counters.evictions > 0
    assert server.servicer.manager.resident("m0") is not None  # pinned: never evicted
    assert torch.equal(pinned["embed.weight"], small_model(0, 12)["embed.weight"])
    # LRU: the most recently loaded ones are resident, the oldest unpinned went first.
    assert server.servicer.manager.resident("m15") is not None
    assert server.servicer.manager.resident("m1") is None


def test_budget_exhausted_by_pins(tmp_path: Path) -> None:
    from loader.config import ModelsConfig
    from tests.loader.conftest import _start

    gen = _start(tmp_path / "data", ModelsConfig(dram_budget=2 << 20, prefault=False))
    srv = next(gen)
    try:
        for i, name in enumerate("abc"):
            _add(srv, tmp_path, name, i, layers=12)  # ~0.7 MiB each: two fit, not three
        client.load_model(srv.channel, "a")
        client.load_model(srv.channel, "b")
        with pytest.raises(ModelBudgetError, match="pinned"):
            client.load_model(srv.channel, "c")
        client.release_model(srv.channel, "a")
        client.load_model(srv.channel, "c")  # now a is evictable
    finally:
        gen.close()


def test_swap_where_only_one_model_fits(tmp_path: Path) -> None:
    from loader.config import ModelsConfig
    from tests.loader.conftest import _start

    gen = _start(tmp_path / "data", ModelsConfig(dram_budget=1 << 20, prefault=False))
    srv = next(gen)
    try:
        ref_a = _add(srv, tmp_path, "a", 1, layers=12)  # ~0.7 MiB each: one fits
        ref_b = _add(srv, tmp_path, "b", 2, layers=12)
        got_a = client.load_model(srv.channel, "a", session_id=3)
        # The error says why (room for both) and what to do; "a" stays pinned and usable.
        with pytest.raises(ModelBudgetError, match="needs room for both.*release 'a' first"):
            client.swap_models(srv.channel, "a", "b", session_id=3)
        states = {m["name"]: m for m in client.list_models(srv.channel)}
        assert states["a"]["pins"] == 1 and states["a"]["state"] == "ready"
        assert torch.equal(got_a["embed.weight"], ref_a["embed.weight"])
        # A model larger than the whole budget: no such hint (releasing cannot help).
        _add(srv, tmp_path, "huge", 3, layers=30)
        with pytest.raises(ModelBudgetError, match="raise models.dram_budget") as ei:
            client.swap_models(srv.channel, "a", "huge", session_id=3)
        assert "room for both" not in str(ei.value)
        # What the message says works.
        client.release_model(srv.channel, "a", session_id=3)
        got_b = client.load_model(srv.channel, "b", session_id=3)
        assert torch.equal(got_b["embed.weight"], ref_b["embed.weight"])
    finally:
        gen.close()


def test_unknown_model(server: ServerHandle) -> None:
    with pytest.raises(ModelNotFoundError, match="nope") as ei:
        client.load_model(server.channel, "nope")
    # Model errors are client errors like any other: `except KVStoreError` catches them.
    assert isinstance(ei.value, KVStoreError) and isinstance(ei.value, NotFound)
    assert ei.value.code == grpc.StatusCode.NOT_FOUND


def test_model_errors_are_kvstore_errors() -> None:
    pairs = [
        (ModelNotFoundError, NotFound),
        (ModelBudgetError, ResourceExhausted),
        (ModelFormatError, InvalidArgument),
        (ModelStoreError, FailedPrecondition),
        (ModelChecksumError, KVStoreError),
        (ModelExistsError, KVStoreError),
    ]
    for cls, base in pairs:
        assert issubclass(cls, ModelError) and issubclass(cls, base), cls
        assert cls.code == getattr(base, "code", None) or base is KVStoreError, cls


def _unswapped(server: ServerHandle, **want: int) -> None:
    """Nothing loaded for b, nothing pinned on it; ``want``: a's expected pins."""
    states = {m["name"]: m for m in client.list_models(server.channel)}
    assert states["b"]["state"] == "stored" and states["b"]["pins"] == 0
    assert server.servicer.manager.resident("b") is None
    for name, pins in want.items():
        assert states[name]["pins"] == pins


def test_swap_from_unknown_model_fails_and_loads_nothing(
    server: ServerHandle, tmp_path: Path
) -> None:
    _add(server, tmp_path, "b", 2)
    with pytest.raises(ModelNotFoundError, match="'nope'"):
        client.swap_models(server.channel, "nope", "b", session_id=7)
    _unswapped(server)
    assert server.servicer.manager.counters.loads == 0


def test_swap_from_a_model_not_held_fails_and_changes_nothing(
    server: ServerHandle, tmp_path: Path
) -> None:
    _add(server, tmp_path, "a", 1)
    _add(server, tmp_path, "b", 2)
    client.load_model(server.channel, "a", session_id=8)  # another session's pin
    client.load_model(server.channel, "a", session_id=7, pin=False)
    with pytest.raises(ModelNotFoundError, match="session 7 holds no pin on it"):
        client.swap_models(server.channel, "a", "b", session_id=7)
    _unswapped(server, a=1)
    # Held: the same swap works; swapping from it again (no longer held) fails.
    client.load_model(server.channel, "a", session_id=7)
    client.swap_models(server.channel, "a", "b", session_id=7)
    with pytest.raises(ModelNotFoundError, match="'a'"):
        client.swap_models(server.channel, "a", "b", session_id=7)
    states = {m["name"]: m for m in client.list_models(server.channel)}
    assert states["a"]["pins"] == 1 and states["b"]["pins"] == 1  # session 8's a, 7's b


def test_corrupt_data_names_the_tensor(server: ServerHandle, tmp_path: Path) -> None:
    _add(server, tmp_path, "a", 1)
    with ModelStore(server.data_dir) as st:
        m = st.get("a")
        t = next(t for t in m.tensors if t.name == "layers.1.mlp.up")
        flip_byte(st.data_path(m), t.offset + 100)
    with pytest.raises(ModelChecksumError, match="layers.1.mlp.up"):
        client.load_model(server.channel, "a")
    assert server.servicer.manager.resident("a") is None  # nothing half-resident


def test_removed_and_readded_model_is_reloaded(server: ServerHandle, tmp_path: Path) -> None:
    _add(server, tmp_path, "a", 1)
    client.load_model(server.channel, "a", pin=False)
    with ModelStore(server.data_dir) as st:
        st.remove("a")
    ref = _add(server, tmp_path, "a", 5)
    got = client.load_model(server.channel, "a")
    assert torch.equal(got["embed.weight"], ref["embed.weight"])


def test_release_session_drops_pins(server: ServerHandle, tmp_path: Path) -> None:
    _add(server, tmp_path, "a", 1)
    client.load_model(server.channel, "a", session_id=3)
    client.load_model(server.channel, "a", session_id=3)
    assert server.servicer.manager.release_session(3) == 2
    assert client.list_models(server.channel)[0]["pins"] == 0
