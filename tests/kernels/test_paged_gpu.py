"""CUDA kernel against the CPU twin: identical bytes, output poisoned first."""

from __future__ import annotations

import pytest
import torch

from kernels import LAYOUTS, describe_kv_caches, gather_blocks, scatter_blocks
from tests.kernels.cachegen import DTYPES, POISON, as_bytes, make_cache

pytestmark = pytest.mark.gpu

FORMS = [
    ("vllm_gpu", "list"),
    ("vllm_gpu", "stacked"),
    ("flash", "pairs"),
    ("flash", "flat"),
    ("vllm_cpu", "shared"),
    ("vllm_cpu", "list"),
]


def _both(layout: str, form: str, dtype: torch.dtype, seed: int, **kw):
    cpu = make_cache(layout, dtype, form=form, seed=seed, **kw)
    gpu = make_cache(layout, dtype, form=form, seed=seed, device="cuda", **kw)
    return cpu, gpu


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("layout", "form"), FORMS)
@pytest.mark.parametrize("pad", [0, 1])
def test_cuda_gather_equals_twin(layout: str, form: str, dtype: torch.dtype, pad: int) -> None:
    if pad and form in ("stacked", "shared"):
        pytest.skip("padding applies to per-layer tensors")
    cpu, gpu = _both(
        layout, form, dtype, seed=7, layers=5, blocks=33, tokens=16, heads=4, head_dim=64, pad=pad
    )
    kv = describe_kv_caches(gpu.caches, layout)
    ids = torch.tensor([31, 0, 7, 7, 12, 32, 3])
    want = torch.full((len(ids), kv.block_nbytes), POISON, dtype=torch.uint8)
    gather_blocks(cpu.caches, layout, ids, want)
    out = torch.full((len(ids), kv.block_nbytes), POISON, dtype=torch.uint8, device="cuda")
    gather_blocks(gpu.caches, layout, ids.cuda(), out, impl="cuda")
    torch.cuda.synchronize()
    assert as_bytes(out) == as_bytes(want)
    # Per-block destinations, oddly sized so the narrow vector paths run too.
    bufs = [
        torch.full((kv.block_nbytes + 3,), POISON, dtype=torch.uint8, device="cuda")[i % 3 :]
        for i in range(len(ids))
    ]
    gather_blocks(gpu.caches, layout, ids, [b[: kv.block_nbytes] for b in bufs], impl="cuda")
    torch.cuda.synchronize()
    for i, b in enumerate(bufs):
        assert as_bytes(b[: kv.block_nbytes]) == as_bytes(want[i])
        assert set(as_bytes(b[kv.block_nbytes :])) <= {POISON}, "wrote past the block"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_scatter_equals_twin(layout: str, dtype: torch.dtype) -> None:
    form = "pairs" if layout == "flash" else "list"
    cpu, gpu = _both(
        layout,
        dtype=dtype,
        form=form,
        seed=9,
        layers=3,
        blocks=20,
        tokens=16,
        heads=2,
        head_dim=128,
    )
    kv = describe_kv_caches(cpu.caches, layout)
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (4, kv.block_nbytes), dtype=torch.uint8, generator=g)
    ids = torch.tensor([19, 2, 11, 0])
    scatter_blocks(cpu.caches, layout, ids, blocks)
    scatter_blocks(gpu.caches, layout, ids.cuda(), blocks.cuda(), impl="cuda")
    torch.cuda.synchronize()
    for c, d in zip(cpu.layers, gpu.layers, strict=True):
        for a, b in zip(
            c if isinstance(c, tuple) else (c,), d if isinstance(d, tuple) else (d,), strict=True
        ):
            assert as_bytes(a) == as_bytes(b)


def test_cuda_large_gather_roundtrip() -> None:
    """A realistic shape: 32 layers, 16 tokens, 8 heads, 128 dims, bf16 (2 MiB blocks)."""
    caches = [
        torch.randn(2, 64, 16, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(32)
    ]
    kv = describe_kv_caches(caches, "vllm_gpu")
    ids = torch.randperm(64, device="cuda")[:48]
    out = torch.full((48, kv.block_nbytes), POISON, dtype=torch.uint8, device="cuda")
    gather_blocks(caches, "vllm_gpu", ids, out)
    ref = torch.empty_like(out)
    gather_blocks(caches, "vllm_gpu", ids, ref, impl="torch")
    assert torch.equal(out, ref)
    fresh = [torch.zeros_like(c) for c in caches]
    scatter_blocks(fresh, "vllm_gpu", ids, out)
    for c, f in zip(caches, fresh, strict=True):
        assert torch.equal(c[:, ids].view(torch.int16), f[:, ids].view(torch.int16))
