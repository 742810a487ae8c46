"""Gather blocks out of an engine's paged KV cache, and scatter them back.

``gather_blocks`` copies the listed block ids of every layer into contiguous
kvstore blocks (canonical layout: :mod:`kernels.layouts`); ``scatter_blocks`` is
its inverse.  On CUDA tensors both run as ONE kernel launch for all layers
(:mod:`kernels.cuda_paged`, through cupy); elsewhere, or with ``impl="torch"``,
the CPU twin below does the same with ``index_select`` / ``index_copy_`` per
plane into the preallocated buffers.  Both produce identical bytes.

On CUDA the copy is enqueued on torch's current stream, like any torch op:
synchronize before handing the buffer to another process or device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels.layouts import KernelInputError, KVCaches, PagedKV, describe_kv_caches

log = logging.getLogger(__name__)

IMPLS = ("auto", "cuda", "torch")

BlockBuffers = torch.Tensor | Sequence[torch.Tensor]
"""Contiguous kvstore blocks: one tensor holding ``n`` blocks back to back, or one
tensor per block (e.g. views on the shared-memory arena's slots)."""


@dataclass(frozen=True, slots=True)
class _Blocks:
    """Validated block buffers as bytes: ``flat`` ``[n, block_nbytes]`` or ``per_block``."""

    flat: torch.Tensor | None
    per_block: tuple[torch.Tensor, ...]


def _check_ids(block_ids: torch.Tensor | Sequence[int], kv: PagedKV, unique: bool) -> torch.Tensor:
    """Block ids as a 1-D int64 tensor on the cache's device, range-checked."""
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dim() != 1:
            raise KernelInputError(f"block_ids must be 1-D, got shape {tuple(block_ids.shape)}")
        if block_ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
            raise KernelInputError(f"block_ids must be an integer tensor, got {block_ids.dtype}")
        ids = block_ids.to(device=kv.device, dtype=torch.int64).contiguous()
    else:
        try:
            ids = torch.tensor(list(block_ids), dtype=torch.int64, device=kv.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise KernelInputError(f"block_ids must be integers: {exc}") from None
        if ids.dim() != 1:
            raise KernelInputError("block_ids must be a flat sequence of integers")
    if ids.numel():
        lo, hi = torch.stack([ids.min(), ids.max()]).tolist()  # one sync on CUDA
        if lo < 0 or hi >= kv.num_blocks:
            bad = lo if lo < 0 else hi
            raise KernelInputError(
                f"block id {bad} out of range: the cache has {kv.num_blocks} blocks "
                f"(valid ids 0..{kv.num_blocks - 1})"
            )
        if unique and torch.unique(ids).numel() != ids.numel():
            raise KernelInputError(
                "duplicate block ids in a scatter: the result would depend on write order"
            )
    return ids


def _check_buffers(bufs: BlockBuffers, n: int, kv: PagedKV, what: str) -> _Blocks:
    nb = kv.block_nbytes
    if isinstance(bufs, torch.Tensor):
        if bufs.device != kv.device:
            raise KernelInputError(
                f"{what} is on {bufs.device}, the kv cache on {kv.device}: they must match"
            )
        if not bufs.is_contiguous():
            raise KernelInputError(f"{what} must be contiguous")
        have = bufs.numel() * bufs.element_size()
        if have < n * nb:
            raise KernelInputError(
                f"{what} too small: {have} bytes for {n} blocks of {nb} bytes (need {n * nb})"
            )
        flat = bufs.view(-1).view(torch.uint8)[: n * nb].view(n, nb)
        return _Blocks(flat=flat, per_block=())
    items = list(bufs)
    if len(items) != n:
        raise KernelInputError(f"{what}: {len(items)} block buffers for {n} block ids")
    per: list[torch.Tensor] = []
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise KernelInputError(f"{what}[{i}] must be a tensor, got {type(t).__name__}")
        if t.device != kv.device:
            raise KernelInputError(
                f"{what}[{i}] is on {t.device}, the kv cache on {kv.device}: they must match"
            )
        if not t.is_contiguous():
            raise KernelInputError(f"{what}[{i}] must be contiguous")
        have = t.numel() * t.element_size()
        if have < nb:
            raise KernelInputError(f"{what}[{i}] too small: {have} bytes for a block of {nb}")
        per.append(t.view(-1).view(torch.uint8)[:nb])
    return _Blocks(flat=None, per_block=tuple(per))


def _use_cuda(kv: PagedKV, impl: str) -> bool:
    if impl not in IMPLS:
        raise KernelInputError(f"unknown impl {impl!r}; known: {', '.join(IMPLS)}")
    if kv.device.type != "cuda":
        if impl == "cuda":
            raise KernelInputError(f"impl='cuda' needs CUDA tensors, the cache is on {kv.device}")
        return False
    if impl == "torch":
        return False
    from kernels import cuda_paged

    if cuda_paged.available():
        return True
    if impl == "cuda":
        raise KernelInputError("impl='cuda' needs cupy, which is not importable here")
    log.warning("cupy not importable: paged copies on %s use the torch twin", kv.device)
    return False


def gather_blocks(
    kv_caches: KVCaches | PagedKV,
    layout: str,
    block_ids: torch.Tensor | Sequence[int],
    out: BlockBuffers,
    *,
    impl: str = "auto",
) -> None:
    """Copies blocks ``block_ids`` of every layer into contiguous kvstore blocks.

    Args:
        kv_caches: the engine's paged cache (see :mod:`kernels.layouts`).
        layout: ``"vllm_gpu"``, ``"flash"`` or ``"vllm_cpu"``.
        block_ids: engine block ids, 1-D integers; duplicates are allowed.
        out: a contiguous tensor of at least ``len(block_ids) * block_nbytes`` bytes
            (any dtype; block ``i`` lands at byte ``i * block_nbytes``), or one
            contiguous tensor of at least ``block_nbytes`` bytes per block id.
            Must be on the cache's device.
        impl: ``"auto"`` (CUDA kernel for CUDA tensors, else the twin), ``"cuda"``
            or ``"torch"`` (the twin, on any device).

    Raises:
        KernelInputError: bad layout, dtype, shape, device, ids or buffer size.
    """
    kv = describe_kv_caches(kv_caches, layout)
    ids = _check_ids(block_ids, kv, unique=False)
    dst = _check_buffers(out, ids.numel(), kv, "out")
    if not ids.numel():
        return
    if _use_cuda(kv, impl):
        from kernels import cuda_paged

        cuda_paged.launch(kv, ids, dst.flat, dst.per_block, to_paged=False)
    else:
        _gather_twin(kv, ids, dst)


def scatter_blocks(
    kv_caches: KVCaches | PagedKV,
    layout: str,
    block_ids: torch.Tensor | Sequence[int],
    src: BlockBuffers,
    *,
    impl: str = "auto",
) -> None:
    """Copies contiguous kvstore blocks back into blocks ``block_ids`` of every layer.

    Args:
        kv_caches: the engine's paged cache (written in place).
        layout: ``"vllm_gpu"``, ``"flash"`` or ``"vllm_cpu"``.
        block_ids: engine block ids, 1-D integers, no duplicates.
        src: blocks as for :func:`gather_blocks`'s ``out``.
        impl: as for :func:`gather_blocks`.

    Raises:
        KernelInputError: bad layout, dtype, shape, device, ids (or duplicates) or
            buffer size.
    """
    kv = describe_kv_caches(kv_caches, layout)
    ids = _check_ids(block_ids, kv, unique=True)
    blocks = _check_buffers(src, ids.numel(), kv, "src")
    if not ids.numel():
        return
    if _use_cuda(kv, impl):
        from kernels import cuda_paged

        cuda_paged.launch(kv, ids, blocks.flat, blocks.per_block, to_paged=True)
    else:
        _scatter_twin(kv, ids, blocks)


# ---------------------------------------------------------------- CPU twins
# On CPU tensors the twin copies one block-plane at a time through numpy, plane by
# plane.  Measured on the 2-core VM (bench/results/gpu.md): torch's index_select /
# index_copy_ / copy_ split every copy above 32 K elements across OpenMP threads and
# fall to a tenth of memcpy speed when the cores are busy; a numpy slice assignment
# is one plain memcpy.  On CUDA tensors (the twin as a fallback, or a reference in
# tests) one torch op per plane keeps the launches few.
def _gather_twin(kv: PagedKV, ids: torch.Tensor, dst: _Blocks) -> None:
    pn = kv.plane_nbytes
    n_planes = len(kv.planes)
    if kv.device.type != "cpu":
        if dst.flat is not None:
            out = dst.flat.view(ids.numel(), n_planes, pn)
            for p in range(n_planes):
                torch.index_select(kv.plane_bytes(p), 0, ids, out=out[:, p])
        else:
            for p in range(n_planes):
                sel = kv.plane_bytes(p).index_select(0, ids)
                for i, t in enumerate(dst.per_block):
                    t.view(n_planes, pn)[p].copy_(sel[i])
        return
    if dst.flat is not None:
        blocks = list(dst.flat.numpy().reshape(ids.numel(), n_planes, pn))
    else:
        blocks = [t.numpy().reshape(n_planes, pn) for t in dst.per_block]
    id_list = ids.tolist()
    for p in range(n_planes):
        plane = kv.plane_bytes(p).numpy()
        for blk, bid in zip(blocks, id_list, strict=True):
            blk[p] = plane[bid]


def _scatter_twin(kv: PagedKV, ids: torch.Tensor, src: _Blocks) -> None:
    pn = kv.plane_nbytes
    n_planes = len(kv.planes)
    if kv.device.type != "cpu":
        if src.flat is not None:
            flat = src.flat.view(ids.numel(), n_planes, pn)
        else:
            flat = torch.stack([t.view(n_planes, pn) for t in src.per_block])
        for p in range(n_planes):
            kv.plane_bytes(p).index_copy_(0, ids, flat[:, p])
        return
    if src.flat is not None:
        blocks = list(src.flat.numpy().reshape(ids.numel(), n_planes, pn))
    else:
        blocks = [t.numpy().reshape(n_planes, pn) for t in src.per_block]
    id_list = ids.tolist()
    for p in range(n_planes):
        plane = kv.plane_bytes(p).numpy()
        for blk, bid in zip(blocks, id_list, strict=True):
            plane[bid] = blk[p]
