"""The CUDA launch path on CPU: ``cuda_paged.launch`` builds its real arguments
(pointer arrays, plan) and an emulation of the kernel, following the CUDA source
statement by statement over host memory, runs them.  This checks the argument
marshalling and the kernel's address arithmetic without a GPU, and that every
vector access the plan allows is aligned (a misaligned one faults on a GPU)."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
import torch

from kernels import LAYOUTS, cuda_paged, describe_kv_caches, gather_blocks, scatter_blocks
from tests.kernels.cachegen import DTYPES, POISON, as_bytes, make_cache


def _i64(addr: int, i: int) -> int:
    return ctypes.c_int64.from_address(addr + 8 * i).value


def emulate(device: torch.device, grid: int, args: tuple[Any, ...]) -> None:
    (plane_ptrs, plane_strides, block_ids, blk_ptrs, flat_base, block_nbytes, num_planes,
     plane_nbytes, chunk_nbytes, chunks, vec, to_paged) = (int(a) for a in args)  # fmt: skip
    assert device.type == "cpu"
    for w in range(grid):  # one iteration = one thread block
        c = w % chunks
        ip = w // chunks
        p = ip % num_planes
        i = ip // num_planes
        start = c * chunk_nbytes
        if start >= plane_nbytes:
            continue
        n = min(plane_nbytes - start, chunk_nbytes)
        paged = _i64(plane_ptrs, p) + _i64(block_ids, i) * _i64(plane_strides, p) + start
        blk = _i64(blk_ptrs, i) if blk_ptrs else flat_base + i * block_nbytes
        flat = blk + p * plane_nbytes + start
        dst, src = (paged, flat) if to_paged else (flat, paged)
        assert dst % vec == 0 and src % vec == 0 and n % vec == 0, "misaligned vector access"
        ctypes.memmove(dst, src, n)


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_paged, "_enqueue", emulate)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pad", [0, 1])
def test_emulated_kernel_gathers_like_the_twin(
    emulated: None, layout: str, dtype: torch.dtype, pad: int
) -> None:
    c = make_cache(layout, dtype, form="pairs" if layout == "flash" else "list", pad=pad,
                   layers=3, blocks=9, tokens=16, heads=2, head_dim=64, seed=pad)  # fmt: skip
    kv = describe_kv_caches(c.caches, layout)
    ids = torch.tensor([8, 0, 3, 3, 5])
    want = torch.full((5, kv.block_nbytes), POISON, dtype=torch.uint8)
    gather_blocks(kv, layout, ids, want)
    out = torch.full((5, kv.block_nbytes), POISON, dtype=torch.uint8)
    cuda_paged.launch(kv, ids, out, (), to_paged=False)
    assert as_bytes(out) == as_bytes(want)
    # Per-block destinations at odd offsets: the plan must fall back to narrow vectors.
    bufs = [
        torch.full((kv.block_nbytes + 3,), POISON, dtype=torch.uint8)[i % 3 :] for i in range(5)
    ]
    cuda_paged.launch(kv, ids, None, [b[: kv.block_nbytes] for b in bufs], to_paged=False)
    for i, b in enumerate(bufs):
        assert as_bytes(b[: kv.block_nbytes]) == as_bytes(want[i])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_emulated_kernel_scatters_like_the_twin(emulated: None, layout: str) -> None:
    form = "pairs" if layout == "flash" else "list"
    a = make_cache(
        layout,
        torch.bfloat16,
        form=form,
        layers=2,
        blocks=6,
        tokens=16,
        heads=2,
        head_dim=32,
        seed=1,
    )
    b = make_cache(
        layout,
        torch.bfloat16,
        form=form,
        layers=2,
        blocks=6,
        tokens=16,
        heads=2,
        head_dim=32,
        seed=1,
    )
    kv_a = describe_kv_caches(a.caches, layout)
    kv_b = describe_kv_caches(b.caches, layout)
    blocks = torch.randint(0, 256, (3, kv_a.block_nbytes), dtype=torch.uint8)
    ids = torch.tensor([5, 1, 2])
    scatter_blocks(kv_a, layout, ids, blocks)
    cuda_paged.launch(kv_b, ids, blocks, (), to_paged=True)
    for x, y in zip(kv_a.planes, kv_b.planes, strict=True):
        assert as_bytes(x) == as_bytes(y)
