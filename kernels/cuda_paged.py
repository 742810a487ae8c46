"""The CUDA paged gather/scatter: one launch for every layer (cupy ``RawKernel``).

The kernel gets a device array of plane base pointers and block strides (one
plane per layer, or K and V per layer), the block ids, and either the base of a
contiguous output or one pointer per block.  Thread block ``w`` copies chunk
``c`` of plane ``p`` of block ``i`` (``w = (i * planes + p) * chunks + c``) with
the widest vector (16 down to 1 bytes) that every address and size allows.
Bytes are copied opaquely, so one kernel serves bf16, fp16, fp8 and fp32.

Only :func:`launch` and :func:`plan` are meant for callers; :mod:`kernels.paged`
validates the inputs first.  :func:`plan` is pure Python so CI checks the work
split without a GPU.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from kernels.layouts import PagedKV

THREADS = 256
CHUNK_TARGET = 16 << 10
"""Bytes one thread block copies: 16 KiB = 4 unrolled 16-byte loads per thread."""

CUDA_SOURCE = r"""
template <typename V>
__device__ __forceinline__ void kvs_copy_span(char* __restrict__ dst,
                                              const char* __restrict__ src,
                                              long long nbytes) {
    const long long nv = nbytes / (long long)sizeof(V);
    V* d = reinterpret_cast<V*>(dst);
    const V* s = reinterpret_cast<const V*>(src);
    const long long step = blockDim.x;
    long long j = threadIdx.x;
    // Four independent loads in flight per thread before the stores.
    for (; j + 3 * step < nv; j += 4 * step) {
        V a = s[j];
        V b = s[j + step];
        V c = s[j + 2 * step];
        V e = s[j + 3 * step];
        d[j] = a;
        d[j + step] = b;
        d[j + 2 * step] = c;
        d[j + 3 * step] = e;
    }
    for (; j < nv; j += step) d[j] = s[j];
}

extern "C" __global__ void kvs_paged_copy(
        const unsigned long long* __restrict__ plane_ptrs,
        const long long* __restrict__ plane_strides,
        const long long* __restrict__ block_ids,
        const unsigned long long* __restrict__ blk_ptrs,
        unsigned long long flat_base,
        long long block_nbytes,
        int num_planes,
        long long plane_nbytes,
        long long chunk_nbytes,
        int chunks,
        int vec,
        int to_paged) {
    const long long w = blockIdx.x;
    const long long c = w % chunks;
    const long long ip = w / chunks;
    const int p = (int)(ip % num_planes);
    const long long i = ip / num_planes;
    const long long start = c * chunk_nbytes;
    if (start >= plane_nbytes) return;
    long long len = plane_nbytes - start;
    if (len > chunk_nbytes) len = chunk_nbytes;
    char* paged = reinterpret_cast<char*>(plane_ptrs[p]) + block_ids[i] * plane_strides[p] + start;
    const unsigned long long blk = blk_ptrs ? blk_ptrs[i]
                                            : flat_base + (unsigned long long)(i * block_nbytes);
    char* flat = reinterpret_cast<char*>(blk) + (long long)p * plane_nbytes + start;
    char* dst = to_paged ? paged : flat;
    const char* src = to_paged ? flat : paged;
    switch (vec) {
        case 16: kvs_copy_span<uint4>(dst, src, len); break;
        case 8: kvs_copy_span<uint2>(dst, src, len); break;
        case 4: kvs_copy_span<unsigned int>(dst, src, len); break;
        case 2: kvs_copy_span<unsigned short>(dst, src, len); break;
        default: kvs_copy_span<unsigned char>(dst, src, len); break;
    }
}
"""


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """How one gather/scatter is split over thread blocks."""

    vec: int
    chunk_nbytes: int
    chunks: int
    grid: int


def plan(
    n_blocks: int, n_planes: int, plane_nbytes: int, addresses: Sequence[int], block_nbytes: int
) -> LaunchPlan:
    """Chooses the vector width and chunking.

    Args:
        n_blocks: block ids in the call.
        n_planes: planes of the cache.
        plane_nbytes: bytes of one block of one plane.
        addresses: every base address and stride the kernel adds (alignment).
        block_nbytes: bytes of one canonical block.
    """
    vec = 16
    for a in (*addresses, plane_nbytes, block_nbytes):
        while vec > 1 and a % vec:
            vec //= 2
    chunks = max(1, math.ceil(plane_nbytes / CHUNK_TARGET))
    chunk = math.ceil(plane_nbytes / chunks)
    chunk = math.ceil(chunk / vec) * vec  # every chunk starts vector-aligned
    chunks = math.ceil(plane_nbytes / chunk)
    grid = n_blocks * n_planes * chunks
    if grid >= 1 << 31:
        raise ValueError(f"too many blocks in one call ({n_blocks}); split the call")
    return LaunchPlan(vec=vec, chunk_nbytes=chunk, chunks=chunks, grid=grid)


@cache
def available() -> bool:
    """cupy importable (the CUDA path's only extra dependency)."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def _kernel() -> Any:
    import cupy

    return cupy.RawKernel(CUDA_SOURCE, "kvs_paged_copy", options=("-std=c++17",))


# Engines register their caches once and reuse them for every call: keep the
# plane pointer/stride arrays on the device instead of uploading them per call.
_PLANE_CACHE: OrderedDict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_PLANE_CACHE_MAX = 16


def _plane_arrays(kv: PagedKV) -> tuple[torch.Tensor, torch.Tensor]:
    ptrs = tuple(p.data_ptr() for p in kv.planes)
    key = (str(kv.device), ptrs, kv.plane_strides)
    hit = _PLANE_CACHE.get(key)
    if hit is not None:
        _PLANE_CACHE.move_to_end(key)
        return hit
    arrs = (
        torch.tensor(ptrs, dtype=torch.int64).to(kv.device),
        torch.tensor(kv.plane_strides, dtype=torch.int64).to(kv.device),
    )
    _PLANE_CACHE[key] = arrs
    if len(_PLANE_CACHE) > _PLANE_CACHE_MAX:
        _PLANE_CACHE.popitem(last=False)
    return arrs


def _enqueue(device: torch.device, grid: int, args: tuple[Any, ...]) -> None:
    """Launches the kernel on torch's current stream of ``device`` (tests replace this
    with a CPU emulation of the kernel to check the arguments)."""
    import cupy

    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
        _kernel()((grid,), (THREADS,), args)


def launch(
    kv: PagedKV,
    ids: torch.Tensor,
    flat: torch.Tensor | None,
    per_block: Sequence[torch.Tensor],
    to_paged: bool,
) -> None:
    """Enqueues the copy on torch's current stream of the cache's device.

    Args:
        kv: the described cache (CUDA).
        ids: int64 block ids on the cache's device, validated.
        flat: ``[n, block_nbytes]`` uint8 blocks, or ``None`` when ``per_block`` is given.
        per_block: one uint8 tensor per block (used when ``flat`` is ``None``).
        to_paged: ``True`` scatters blocks into the cache, ``False`` gathers.
    """
    n = ids.numel()
    plane_ptrs, plane_strides = _plane_arrays(kv)
    if flat is not None:
        flat_base = flat.data_ptr()
        blk_addrs: list[int] = [flat_base]
        blk_arr = None
    else:
        blk_addrs = [t.data_ptr() for t in per_block]
        flat_base = 0
        blk_arr = torch.tensor(blk_addrs, dtype=torch.int64).to(kv.device)
    lp = plan(
        n,
        len(kv.planes),
        kv.plane_nbytes,
        [p.data_ptr() for p in kv.planes] + list(kv.plane_strides) + blk_addrs,
        kv.block_nbytes,
    )
    args = (
        np.uint64(plane_ptrs.data_ptr()),
        np.uint64(plane_strides.data_ptr()),
        np.uint64(ids.data_ptr()),
        np.uint64(blk_arr.data_ptr() if blk_arr is not None else 0),
        np.uint64(flat_base),
        np.int64(kv.block_nbytes),
        np.int32(len(kv.planes)),
        np.int64(kv.plane_nbytes),
        np.int64(lp.chunk_nbytes),
        np.int32(lp.chunks),
        np.int32(lp.vec),
        np.int32(1 if to_paged else 0),
    )
    _enqueue(kv.device, lp.grid, args)
    # The temporaries are freed through torch's stream-ordered caching allocator,
    # so they outlive the kernel that reads them.
    del blk_arr
