"""store_from_paged / load_into_paged: against an in-memory fake of the client
contract (every layout and dtype, unhappy paths), against the real daemon, and
on a GPU (``gpu`` marker)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import xxhash

from kernels import LAYOUTS, KernelInputError, describe_kv_caches
from kvstore.keys import Namespace
from kvstore.paged_io import PagedStoreResult, load_into_paged, store_from_paged
from tests.kernels.cachegen import DTYPES, direct_block, make_cache, reference_block


@dataclass
class _Alloc:
    key: bytes
    status: str
    view: memoryview | None


@dataclass
class _Lookup:
    num_cached: int
    tiers: list[str]


@dataclass
class FakeClient:
    """The client contract in memory: slots are bytearrays, reads are read-only views."""

    blocks: dict[bytes, bytearray] = field(default_factory=dict)
    pending: dict[bytes, bytearray] = field(default_factory=dict)
    pins: dict[bytes, int] = field(default_factory=dict)
    checksums: dict[bytes, int] = field(default_factory=dict)
    aborted: list[bytes] = field(default_factory=list)
    in_progress: set[bytes] = field(default_factory=set)
    vanish: set[bytes] = field(default_factory=set)  # evicted between lookup and acquire

    def lookup(self, keys):
        n = 0
        for k in keys:
            if k not in self.blocks:
                break
            n += 1
        return _Lookup(n, ["dram"] * n)

    def allocate(self, ns, keys):
        out = []
        for k in keys:
            if k in self.blocks:
                out.append(_Alloc(k, "PRESENT", None))
            elif k in self.in_progress:
                out.append(_Alloc(k, "IN_PROGRESS", None))
            else:
                self.pending[k] = bytearray(b"\xa5" * ns.block_nbytes)
                out.append(_Alloc(k, "NEW", memoryview(self.pending[k])))
        return out

    def commit(self, keys, checksums=None):
        for i, k in enumerate(keys):
            self.blocks[k] = self.pending.pop(k)
            if checksums is not None:
                self.checksums[k] = checksums[i]
        return ["OK"] * len(keys)

    def abort(self, keys):
        for k in keys:
            self.pending.pop(k)
            self.aborted.append(k)
        return len(keys)

    def acquire(self, keys):
        out = []
        for k in keys:
            if k in self.blocks and k not in self.vanish:
                self.pins[k] = self.pins.get(k, 0) + 1
                out.append(memoryview(bytes(self.blocks[k])).toreadonly())
            else:
                out.append(None)
        return out

    def release(self, keys):
        for k in keys:
            assert self.pins.get(k, 0) > 0, "released a key that was not pinned"
            self.pins[k] -= 1


def _ns(kv, layout: str, bt: int | None = None) -> Namespace:
    return Namespace(
        "m",
        num_layers=kv.num_layers,
        num_kv_heads=kv.kv_heads,
        head_dim=kv.head_dim,
        block_tokens=bt or kv.block_tokens,
        kv_dtype=kv.dtype_name,
        layout=layout,
    )


def _form(layout: str) -> str:
    return "pairs" if layout == "flash" else "list"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_store_then_load_roundtrip(layout: str, dtype: torch.dtype) -> None:
    src = make_cache(layout, dtype, form=_form(layout), seed=1)
    dst = make_cache(layout, dtype, form=_form(layout), seed=2)
    kv = describe_kv_caches(src.caches, layout)
    ns = _ns(kv, layout)
    tokens = list(range(100, 100 + 3 * kv.block_tokens + 2))  # 3 full blocks + a partial
    c = FakeClient()
    r = store_from_paged(c, ns, src.caches, [4, 1, 6, 0], tokens, layout)
    assert r == PagedStoreResult(new=3, present=0, skipped=0)
    keys = ns.block_keys(tokens)
    for k, b in zip(keys, [4, 1, 6], strict=True):
        assert bytes(c.blocks[k]) == reference_block(src, b)
        assert c.checksums[k] == xxhash.xxh3_64_intdigest(bytes(c.blocks[k]))
    untouched = reference_block(dst, 3)
    assert load_into_paged(c, ns, dst.caches, [2, 5, 0, 3], tokens, layout) == 3 * kv.block_tokens
    for s, d in zip([4, 1, 6], [2, 5, 0], strict=True):
        assert reference_block(dst, d) == reference_block(src, s)
    assert reference_block(dst, 3) == untouched
    assert all(v == 0 for v in c.pins.values()), "a pin leaked"


def test_second_store_dedups_and_skips_in_progress() -> None:
    src = make_cache("vllm_gpu", torch.bfloat16)
    kv = describe_kv_caches(src.caches, "vllm_gpu")
    ns = _ns(kv, "vllm_gpu")
    tokens = list(range(4 * kv.block_tokens))
    c = FakeClient()
    store_from_paged(c, ns, src.caches, [0, 1], tokens[: 2 * kv.block_tokens], "vllm_gpu")
    c.in_progress.add(ns.block_keys(tokens)[3])
    r = store_from_paged(c, ns, src.caches, [0, 1, 2, 3], tokens, "vllm_gpu")
    assert r == PagedStoreResult(new=1, present=2, skipped=1)


def test_load_stops_at_a_block_that_vanished_and_releases_every_pin() -> None:
    src = make_cache("flash", torch.float16, form="pairs")
    dst = make_cache("flash", torch.float16, form="pairs", seed=9)
    kv = describe_kv_caches(src.caches, "flash")
    ns = _ns(kv, "flash")
    tokens = list(range(3 * kv.block_tokens))
    c = FakeClient()
    store_from_paged(c, ns, src.caches, [0, 1, 2], tokens, "flash")
    c.vanish.add(ns.block_keys(tokens)[1])
    assert load_into_paged(c, ns, dst.caches, [3, 4, 5], tokens, "flash") == kv.block_tokens
    assert reference_block(dst, 3) == reference_block(src, 0)
    assert all(v == 0 for v in c.pins.values())


def test_miss_and_empty_inputs() -> None:
    src = make_cache("vllm_cpu", torch.bfloat16)
    kv = describe_kv_caches(src.caches, "vllm_cpu")
    ns = _ns(kv, "vllm_cpu")
    c = FakeClient()
    assert load_into_paged(c, ns, src.caches, [0, 1], list(range(50)), "vllm_cpu") == 0
    assert store_from_paged(c, ns, src.caches, [], [1, 2], "vllm_cpu") == PagedStoreResult(0, 0, 0)
    assert load_into_paged(c, ns, src.caches, [], list(range(50)), "vllm_cpu") == 0


def test_load_caps_at_the_number_of_block_ids() -> None:
    src = make_cache("vllm_gpu", torch.bfloat16)
    kv = describe_kv_caches(src.caches, "vllm_gpu")
    ns = _ns(kv, "vllm_gpu")
    tokens = list(range(3 * kv.block_tokens))
    c = FakeClient()
    store_from_paged(c, ns, src.caches, [0, 1, 2], tokens, "vllm_gpu")
    dst = make_cache("vllm_gpu", torch.bfloat16)
    untouched = [reference_block(dst, b) for b in range(dst.num_blocks) if b != 5]
    assert load_into_paged(c, ns, dst.caches, [5], tokens, "vllm_gpu") == kv.block_tokens
    # The first block's bytes, into the one page given; no other page written.
    assert reference_block(dst, 5) == reference_block(src, 0)
    assert [reference_block(dst, b) for b in range(dst.num_blocks) if b != 5] == untouched


def test_failed_gather_aborts_the_slots() -> None:
    src = make_cache("vllm_gpu", torch.bfloat16)
    kv = describe_kv_caches(src.caches, "vllm_gpu")
    ns = _ns(kv, "vllm_gpu")
    c = FakeClient()
    with pytest.raises(KernelInputError, match="out of range"):
        store_from_paged(c, ns, src.caches, [0, 99], list(range(2 * kv.block_tokens)), "vllm_gpu")
    assert len(c.aborted) == 2 and not c.pending and not c.blocks


def test_failed_scatter_releases_the_pins() -> None:
    src = make_cache("vllm_gpu", torch.bfloat16)
    kv = describe_kv_caches(src.caches, "vllm_gpu")
    ns = _ns(kv, "vllm_gpu")
    tokens = list(range(2 * kv.block_tokens))
    c = FakeClient()
    store_from_paged(c, ns, src.caches, [0, 1], tokens, "vllm_gpu")
    with pytest.raises(KernelInputError, match="duplicate"):
        load_into_paged(c, ns, src.caches, [3, 3], tokens, "vllm_gpu")
    assert all(v == 0 for v in c.pins.values())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"block_tokens": 8}, "does not match the namespace"),
        ({"kv_dtype": "float16"}, "does not match the namespace"),
        ({"num_layers": 3}, "does not match the namespace"),
        ({"layout": "vllm_cpu"}, "orders block bytes differently"),
    ],
)
def test_namespace_must_match_the_cache(change: dict, match: str) -> None:
    src = make_cache("vllm_gpu", torch.bfloat16)
    kv = describe_kv_caches(src.caches, "vllm_gpu")
    args = {
        "num_layers": kv.num_layers,
        "num_kv_heads": kv.kv_heads,
        "head_dim": kv.head_dim,
        "block_tokens": kv.block_tokens,
        "kv_dtype": kv.dtype_name,
        "layout": "vllm_gpu",
    }
    args.update(change)
    ns = Namespace("m", **args)  # type: ignore[arg-type]
    with pytest.raises(KernelInputError, match=match):
        store_from_paged(FakeClient(), ns, src.caches, [0, 1], list(range(64)), "vllm_gpu")


def test_too_few_block_ids_for_a_store() -> None:
    src = make_cache("vllm_gpu", torch.bfloat16)
    kv = describe_kv_caches(src.caches, "vllm_gpu")
    with pytest.raises(KernelInputError, match="only 1 block ids"):
        store_from_paged(
            FakeClient(),
            _ns(kv, "vllm_gpu"),
            src.caches,
            [0],
            list(range(2 * kv.block_tokens)),
            "vllm_gpu",
        )


def test_flash_and_vllm_gpu_blocks_are_interchangeable() -> None:
    g = make_cache("vllm_gpu", torch.bfloat16, seed=4)
    f = make_cache("flash", torch.bfloat16, form="pairs", seed=5)
    kv = describe_kv_caches(g.caches, "vllm_gpu")
    ns = _ns(kv, "generic")
    tokens = list(range(kv.block_tokens))
    c = FakeClient()
    store_from_paged(c, ns, g.caches, [2], tokens, "vllm_gpu")
    assert load_into_paged(c, ns, f.caches, [6], tokens, "flash") == kv.block_tokens
    assert reference_block(f, 6) == reference_block(g, 2)


# ---------------------------------------------------------------- real daemon
def test_against_the_real_daemon(daemon) -> None:  # type: ignore[no-untyped-def]
    from kvstore import Client

    src = make_cache(
        "vllm_gpu", torch.bfloat16, layers=4, blocks=10, tokens=16, heads=2, head_dim=64
    )
    dst = make_cache(
        "vllm_gpu", torch.bfloat16, layers=4, blocks=10, tokens=16, heads=2, head_dim=64, seed=3
    )
    kv = describe_kv_caches(src.caches, "vllm_gpu")
    ns = _ns(kv, "vllm_gpu")
    tokens = np.arange(5 * 16 + 3) + 7
    with Client(daemon.socket, name="paged-io-test") as c:
        r = store_from_paged(c, ns, src.caches, [9, 0, 4, 2, 7, 1], tokens, "vllm_gpu")
        assert r == PagedStoreResult(new=5, present=0, skipped=0)
        assert store_from_paged(c, ns, src.caches, [9, 0, 4, 2, 7], tokens, "vllm_gpu").present == 5
        assert c.lookup_tokens(ns, tokens) == 80
        with c.load_tokens(ns, tokens) as lease:  # the engine-level verb sees the same bytes
            assert lease.arrays[0].tobytes() == reference_block(src, 9)
        assert load_into_paged(c, ns, dst.caches, [1, 2, 3, 5, 6], tokens, "vllm_gpu") == 80
        assert c.stats()["sessions"]["pins"] == 0  # load_into_paged released every pin
    for s, d in zip([9, 0, 4, 2, 7], [1, 2, 3, 5, 6], strict=True):
        assert reference_block(dst, d) == reference_block(src, s)
    with Client(daemon.socket) as c2:  # another session: nothing left pinned
        st = c2.stats()["sessions"]
        assert st["pins"] == 0 and st["pending_allocations"] == 0


# ---------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_store_then_load(layout: str) -> None:
    src = make_cache(
        layout,
        torch.bfloat16,
        form=_form(layout),
        blocks=40,
        tokens=16,
        heads=4,
        head_dim=64,
        device="cuda",
        seed=11,
    )
    dst = make_cache(
        layout,
        torch.bfloat16,
        form=_form(layout),
        blocks=40,
        tokens=16,
        heads=4,
        head_dim=64,
        device="cuda",
        seed=12,
    )
    kv = describe_kv_caches(src.caches, layout)
    ns = _ns(kv, layout)
    tokens = list(range(20 * 16))
    ids = torch.randperm(40)[:20]
    c = FakeClient()
    assert store_from_paged(c, ns, src.caches, ids.cuda(), tokens, layout).new == 20
    keys = ns.block_keys(tokens)
    for k, b in zip(keys, ids.tolist(), strict=True):
        assert bytes(c.blocks[k]) == direct_block(src, b)
    ids2 = torch.randperm(40)[:20]
    assert load_into_paged(c, ns, dst.caches, ids2, tokens, layout) == 20 * 16
    for s, d in zip(ids.tolist(), ids2.tolist(), strict=True):
        assert direct_block(dst, d) == direct_block(src, s)


@pytest.mark.gpu
def test_gpu_cache_through_the_real_daemon(daemon) -> None:  # type: ignore[no-untyped-def]
    """CUDA cache -> daemon arena -> another CUDA cache, over the real client."""
    from kvstore import Client

    kw = {"layers": 8, "blocks": 64, "tokens": 16, "heads": 4, "head_dim": 64, "device": "cuda"}
    src = make_cache("vllm_gpu", torch.bfloat16, seed=21, **kw)
    dst = make_cache("vllm_gpu", torch.bfloat16, seed=22, **kw)
    kv = describe_kv_caches(src.caches, "vllm_gpu")
    ns = _ns(kv, "vllm_gpu")
    tokens = np.arange(30 * 16) + 1
    ids = torch.randperm(64)[:30]
    ids2 = torch.randperm(64)[:30]
    with Client(daemon.socket, name="paged-io-gpu") as c:
        assert store_from_paged(c, ns, src.caches, ids.cuda(), tokens, "vllm_gpu").new == 30
        assert load_into_paged(c, ns, dst.caches, ids2, tokens, "vllm_gpu") == 30 * 16
    for s, d in zip(ids.tolist(), ids2.tolist(), strict=True):
        assert direct_block(dst, d) == direct_block(src, s)
