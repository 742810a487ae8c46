"""Paged gather/scatter: the CPU twin against a naive per-element reference, input
validation, and the CUDA launch planner.  CUDA-vs-twin tests are in test_paged_gpu.py."""

from __future__ import annotations

import pytest
import torch

from kernels import (
    LAYOUTS,
    KernelInputError,
    cuda_paged,
    describe_kv_caches,
    gather_blocks,
    scatter_blocks,
)
from kvstore.keys import Namespace
from tests.kernels.cachegen import DTYPES, POISON, as_bytes, make_cache, reference_block

FORMS = {
    "vllm_gpu": ["list", "stacked", "padded"],
    "flash": ["pairs", "flat", "stacked", "padded"],
    "vllm_cpu": ["list", "stacked", "shared", "padded"],
}
CASES = [(lay, form) for lay in LAYOUTS for form in FORMS[lay]]


def _cache(layout: str, form: str, dtype: torch.dtype, seed: int = 0):
    if form == "padded":
        return make_cache(
            layout, dtype, form="list" if layout != "flash" else "pairs", pad=2, seed=seed
        )
    return make_cache(layout, dtype, form=form, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("layout", "form"), CASES)
def test_gather_matches_naive_reference(layout: str, form: str, dtype: torch.dtype) -> None:
    c = _cache(layout, form, dtype)
    kv = describe_kv_caches(c.caches, layout)
    ids = [5, 0, 3, 5]  # a duplicate is fine for a gather
    out = torch.full((len(ids), kv.block_nbytes), POISON, dtype=torch.uint8)
    gather_blocks(c.caches, layout, torch.tensor(ids), out)
    for i, b in enumerate(ids):
        assert as_bytes(out[i]) == reference_block(c, b), f"block {i} (id {b})"


@pytest.mark.parametrize(("layout", "form"), CASES)
def test_gather_into_per_block_buffers(layout: str, form: str) -> None:
    c = _cache(layout, form, torch.bfloat16, seed=1)
    kv = describe_kv_caches(c.caches, layout)
    ids = [6, 2, 1]
    # One buffer per block, larger than a block and of another dtype (bytes are bytes).
    bufs = [torch.full((kv.block_nbytes + 8,), POISON, dtype=torch.uint8) for _ in ids]
    gather_blocks(c.caches, layout, ids, bufs)
    for buf, b in zip(bufs, ids, strict=True):
        assert as_bytes(buf[: kv.block_nbytes]) == reference_block(c, b)
        assert set(as_bytes(buf[kv.block_nbytes :])) == {POISON}, "wrote past the block"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("layout", "form"), CASES)
def test_scatter_is_the_inverse_of_gather(layout: str, form: str, dtype: torch.dtype) -> None:
    src = _cache(layout, form, dtype, seed=2)
    dst = _cache(layout, form, dtype, seed=3)
    kv = describe_kv_caches(src.caches, layout)
    ids_src, ids_dst = [1, 4, 6], [3, 0, 5]
    blocks = torch.full((3, kv.block_nbytes), POISON, dtype=torch.uint8)
    gather_blocks(src.caches, layout, ids_src, blocks)
    before = {b: reference_block(dst, b) for b in range(dst.num_blocks)}
    scatter_blocks(dst.caches, layout, torch.tensor(ids_dst, dtype=torch.int32), blocks)
    for s, d in zip(ids_src, ids_dst, strict=True):
        assert reference_block(dst, d) == reference_block(src, s)
    for b in set(range(dst.num_blocks)) - set(ids_dst):
        assert reference_block(dst, b) == before[b], f"untouched block {b} changed"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_from_per_block_buffers(layout: str) -> None:
    src = make_cache(layout, torch.float16, seed=4)
    dst = make_cache(layout, torch.float16, seed=5)
    kv = describe_kv_caches(src.caches, layout)
    bufs = [torch.empty(kv.block_nbytes, dtype=torch.uint8) for _ in range(2)]
    gather_blocks(src.caches, layout, [2, 3], bufs)
    scatter_blocks(dst.caches, layout, [6, 0], bufs)
    assert reference_block(dst, 6) == reference_block(src, 2)
    assert reference_block(dst, 0) == reference_block(src, 3)


def test_block_nbytes_matches_namespace() -> None:
    for layout in LAYOUTS:
        for dtype in DTYPES:
            c = make_cache(layout, dtype, layers=3, tokens=4, heads=2, head_dim=8)
            kv = describe_kv_caches(c.caches, layout)
            ns = Namespace(
                "m",
                num_layers=3,
                num_kv_heads=2,
                head_dim=8,
                block_tokens=4,
                kv_dtype=kv.dtype_name,
            )
            assert kv.block_nbytes == ns.block_nbytes
            assert (kv.num_layers, kv.block_tokens, kv.kv_heads, kv.head_dim) == (3, 4, 2, 8)


def test_empty_id_list_is_a_no_op() -> None:
    c = make_cache("vllm_gpu", torch.bfloat16)
    before = [as_bytes(t) for t in c.caches]
    out = torch.full((16,), POISON, dtype=torch.uint8)
    gather_blocks(c.caches, "vllm_gpu", torch.tensor([], dtype=torch.int64), out)
    assert set(as_bytes(out)) == {POISON}  # nothing gathered
    scatter_blocks(c.caches, "vllm_gpu", [], torch.zeros(16, dtype=torch.uint8))
    assert [as_bytes(t) for t in c.caches] == before  # nothing scattered


# ------------------------------------------------------------------ bad input
def _gpu_cache():
    return make_cache("vllm_gpu", torch.bfloat16)


def _block_out(n: int = 1) -> torch.Tensor:
    kv = describe_kv_caches(_gpu_cache().caches, "vllm_gpu")
    return torch.empty(n * kv.block_nbytes, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layout": "paged"}, "unknown layout"),
        ({"block_ids": [7]}, "block id 7 out of range"),
        ({"block_ids": [-1]}, "block id -1 out of range"),
        ({"block_ids": torch.tensor([[1]])}, "1-D"),
        ({"block_ids": torch.tensor([1.0])}, "integer tensor"),
        ({"block_ids": ["a"]}, "integers"),
        ({"block_ids": [0, 1], "out": _block_out(1)}, "too small"),
        ({"out": [_block_out(1), _block_out(1)]}, "2 block buffers for 1 block ids"),
        ({"out": [torch.empty(8, dtype=torch.uint8)]}, r"out\[0\] too small"),
        ({"out": _block_out(2).view(2, -1)[:, ::2]}, "contiguous"),
        ({"impl": "fast"}, "unknown impl"),
        ({"impl": "cuda"}, "needs CUDA tensors"),
    ],
)
def test_gather_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {
        "kv_caches": _gpu_cache().caches,
        "layout": "vllm_gpu",
        "block_ids": [1],
        "out": _block_out(),
    }
    args.update(kwargs)
    with pytest.raises(KernelInputError, match=match):
        gather_blocks(**args)


def test_scatter_rejects_duplicate_ids() -> None:
    with pytest.raises(KernelInputError, match="duplicate block ids"):
        scatter_blocks(_gpu_cache().caches, "vllm_gpu", [1, 1], _block_out(2))


@pytest.mark.parametrize(
    ("layout", "caches", "match"),
    [
        ("vllm_gpu", [torch.zeros(2, 4, 2, 2, 8, dtype=torch.int64)], "unsupported kv cache dtype"),
        (
            "vllm_gpu",
            [torch.zeros(2, 4, 2, 2, 8, dtype=torch.float64)],
            "unsupported kv cache dtype",
        ),
        ("vllm_gpu", [torch.zeros(3, 4, 2, 2, 8, dtype=torch.bfloat16)], r"\[2, num_blocks"),
        ("vllm_gpu", [torch.zeros(4, 2, 2, 8, dtype=torch.bfloat16)], r"\[2, num_blocks"),
        ("vllm_gpu", torch.zeros(2, 4, 2, 2, 8, dtype=torch.bfloat16), "must have 6 dims"),
        ("vllm_gpu", [], "empty"),
        ("vllm_gpu", ["x"], "must be a tensor"),
        (
            "vllm_gpu",
            [
                torch.zeros(2, 4, 2, 2, 8, dtype=torch.bfloat16),
                torch.zeros(2, 5, 2, 2, 8, dtype=torch.bfloat16),
            ],
            "same shape",
        ),
        (
            "vllm_gpu",
            [
                torch.zeros(2, 4, 2, 2, 8, dtype=torch.bfloat16),
                torch.zeros(2, 4, 2, 2, 8, dtype=torch.float16),
            ],
            "mixed dtypes",
        ),
        (
            "vllm_gpu",
            [torch.zeros(2, 4, 8, 2, 2, dtype=torch.bfloat16).transpose(2, 4)],
            "not contiguous",
        ),
        ("flash", [torch.zeros(4, 2, 2, 8, dtype=torch.bfloat16)] * 3, "even length"),
        ("flash", [(torch.zeros(4, 2, 2, 8, dtype=torch.bfloat16),)], r"\(K, V\) pair"),
        ("flash", [(torch.zeros(4, 2, 2, 8), torch.zeros(4, 2, 2, 4))], "differ"),
        ("flash", [(torch.zeros(4, 2, 2), torch.zeros(4, 2, 2))], r"\[num_blocks, block_tokens"),
        ("vllm_cpu", [torch.zeros(4, 2, 2, 7, dtype=torch.bfloat16)], r"2 \* head_dim"),
    ],
)
def test_describe_rejects_bad_caches(layout: str, caches: object, match: str) -> None:
    with pytest.raises(KernelInputError, match=match):
        describe_kv_caches(caches, layout)  # type: ignore[arg-type]


def test_described_cache_is_reused_and_layout_checked() -> None:
    c = _gpu_cache()
    kv = describe_kv_caches(c.caches, "vllm_gpu")
    assert describe_kv_caches(kv, "vllm_gpu") is kv
    with pytest.raises(KernelInputError, match="described as 'vllm_gpu'"):
        describe_kv_caches(kv, "flash")


# ------------------------------------------------------------------ CUDA planner
@pytest.mark.parametrize(
    "plane_nbytes", [2, 6, 48, 4096, 16 << 10, (16 << 10) + 2, 100_000, 1 << 20]
)
@pytest.mark.parametrize("addr_align", [1, 2, 8, 16, 256])
def test_launch_plan_covers_every_byte_once(plane_nbytes: int, addr_align: int) -> None:
    lp = cuda_paged.plan(3, 4, plane_nbytes, [1 << 20, addr_align * 7], 4 * plane_nbytes)
    assert lp.vec in (1, 2, 4, 8, 16)
    assert plane_nbytes % lp.vec == 0 and addr_align * 7 % lp.vec == 0
    assert lp.chunk_nbytes % lp.vec == 0
    covered = bytearray(plane_nbytes)
    for c in range(lp.chunks):  # mirrors the kernel's start/len arithmetic
        start = c * lp.chunk_nbytes
        assert start < plane_nbytes, "an empty chunk wastes a thread block"
        for j in range(start, min(start + lp.chunk_nbytes, plane_nbytes)):
            covered[j] += 1
    assert set(covered) == {1}
    assert lp.grid == 3 * 4 * lp.chunks


def test_launch_plan_prefers_16_byte_vectors_for_real_layouts() -> None:
    # 16 tokens x 8 heads x 128 dims x bf16 = 32 KiB planes, 256-byte aligned bases.
    lp = cuda_paged.plan(64, 64, 32 << 10, [0x7F0000000000, 32 << 10], 64 * (32 << 10))
    assert lp.vec == 16 and lp.chunks == 2 and lp.grid == 64 * 64 * 2


def test_direct_reference_agrees_with_naive_one() -> None:
    from tests.kernels.cachegen import direct_block

    for layout, form in CASES:
        c = _cache(layout, form, torch.bfloat16, seed=3)
        assert direct_block(c, 4) == reference_block(c, 4)
