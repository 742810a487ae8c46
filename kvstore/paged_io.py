"""Store and load an engine's paged KV cache through a kvstore client, one API everywhere.

An engine calls :func:`store_from_paged` after a prefill and :func:`load_into_paged`
before one.  Both compute the block keys from the token ids
(:meth:`Namespace.block_keys`), use the client's low-level verbs, and move the
bytes with :mod:`kernels`: the CUDA gather/scatter kernel when the cache is on a
GPU (staged through device memory, one launch per batch, then copies to or from
the shared-memory arena's slots, which run as DMA once the arena is pinned), the
CPU twin straight into or out of the slots otherwise.

Blocks are stored in the canonical layout of :mod:`kernels.layouts`.  vLLM's GPU
layout and the flash-attention layout give the same bytes, so they can share a
namespace; vLLM's CPU layout does not.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import xxhash

from kernels import KernelInputError, PagedKV, describe_kv_caches, gather_blocks, scatter_blocks
from kernels.layouts import KVCaches
from kvstore.keys import Namespace

STAGING_BYTES = 256 << 20
"""Most device memory one batch of a GPU store/load stages at once."""

_SAME_BYTES = {"vllm_gpu": "kv_split", "flash": "kv_split", "vllm_cpu": "vllm_cpu"}


class PagedClient(Protocol):
    """The client verbs used here (:class:`kvstore.Client` has them)."""

    def lookup(self, keys: Sequence[bytes]) -> Any: ...
    def allocate(self, ns: Namespace, keys: Sequence[bytes]) -> list[Any]: ...
    def commit(self, keys: Sequence[bytes], checksums: Sequence[int] | None = None) -> Any: ...
    def abort(self, keys: Sequence[bytes]) -> Any: ...
    def acquire(self, keys: Sequence[bytes]) -> list[memoryview | None]: ...
    def release(self, keys: Sequence[bytes]) -> Any: ...


@dataclass(frozen=True, slots=True)
class PagedStoreResult:
    """Blocks written (``new``), already stored (``present``), and not stored now
    (``skipped``: being written by another engine, or no room)."""

    new: int
    present: int
    skipped: int


def check_namespace(ns: Namespace, kv: PagedKV) -> None:
    """Raises :class:`KernelInputError` unless ``kv``'s blocks are ``ns``'s blocks."""
    want = (ns.num_layers, ns.block_tokens, ns.num_kv_heads, ns.head_dim, ns.kv_dtype)
    have = (kv.num_layers, kv.block_tokens, kv.kv_heads, kv.head_dim, kv.dtype_name)
    if want != have:
        raise KernelInputError(
            "kv cache does not match the namespace: (layers, block_tokens, kv_heads, "
            f"head_dim, dtype) is {have} in the cache, {want} in the namespace"
        )
    if ns.layout in _SAME_BYTES and _SAME_BYTES[ns.layout] != _SAME_BYTES[kv.layout]:
        raise KernelInputError(
            f"namespace layout {ns.layout!r} orders block bytes differently from {kv.layout!r}"
        )


def _engine_ids(block_ids: torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
    ids = (
        block_ids.detach().to("cpu", torch.int64)
        if isinstance(block_ids, torch.Tensor)
        else torch.tensor(list(block_ids), dtype=torch.int64)
    )
    if ids.dim() != 1:
        raise KernelInputError(f"block_ids must be 1-D, got shape {tuple(ids.shape)}")
    if ids.numel() < n:
        raise KernelInputError(f"{n} full blocks of tokens but only {ids.numel()} block ids")
    return ids[:n]


@contextmanager
def _slot_tensors(views: Sequence[memoryview]) -> Iterator[list[torch.Tensor]]:
    """uint8 tensors over arena slots, without a copy."""
    with warnings.catch_warnings():
        # Acquired slots are read-only memoryviews; torch warns that it cannot mark a
        # tensor read-only.  We only read those (scatter source), never write them.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        yield [torch.frombuffer(v, dtype=torch.uint8) for v in views]


def _batches(n: int, block_nbytes: int) -> Iterator[slice]:
    step = max(1, STAGING_BYTES // block_nbytes)
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def _gather_to_slots(kv: PagedKV, layout: str, ids: torch.Tensor, dst: list[torch.Tensor]) -> None:
    if kv.device.type != "cuda":
        gather_blocks(kv, layout, ids, dst)
        return
    nb = kv.block_nbytes
    for sl in _batches(len(dst), nb):
        staging = torch.empty((sl.stop - sl.start, nb), dtype=torch.uint8, device=kv.device)
        gather_blocks(kv, layout, ids[sl].to(kv.device), staging)
        for j, t in enumerate(dst[sl]):
            t[:nb].copy_(staging[j], non_blocking=True)
        torch.cuda.current_stream(kv.device).synchronize()


def _scatter_from_slots(
    kv: PagedKV, layout: str, ids: torch.Tensor, src: list[torch.Tensor]
) -> None:
    if kv.device.type != "cuda":
        scatter_blocks(kv, layout, ids, src)
        return
    nb = kv.block_nbytes
    for sl in _batches(len(src), nb):
        staging = torch.empty((sl.stop - sl.start, nb), dtype=torch.uint8, device=kv.device)
        for j, t in enumerate(src[sl]):
            staging[j].copy_(t[:nb], non_blocking=True)
        scatter_blocks(kv, layout, ids[sl].to(kv.device), staging)
    # The slots may be released (and rewritten) as soon as we return.
    torch.cuda.current_stream(kv.device).synchronize()


def store_from_paged(
    client: PagedClient,
    ns: Namespace,
    kv_caches: KVCaches | PagedKV,
    block_ids: torch.Tensor | Sequence[int],
    token_ids: Sequence[int] | np.ndarray,
    layout: str,
) -> PagedStoreResult:
    """Stores every full block of ``token_ids`` from the engine's paged cache.

    Args:
        client: a connected :class:`kvstore.Client` (or anything with its verbs).
        ns: the namespace of the blocks; must match the cache's geometry and dtype.
        kv_caches: the engine's cache (see :mod:`kernels.layouts`), or a
            :class:`~kernels.PagedKV` from :func:`kernels.describe_kv_caches`.
        block_ids: engine block id of each full block of ``token_ids``, in order
            (extra ids, e.g. of a partial last block, are ignored).
        token_ids: the sequence's tokens from its start.
        layout: ``"vllm_gpu"``, ``"flash"`` or ``"vllm_cpu"``.

    Returns:
        Counts of blocks written, already present and skipped.

    Raises:
        KernelInputError: the cache does not match ``ns`` or ``layout``, or too
            few block ids.  Slots allocated before the failure are aborted.
        kvstore.errors.KVStoreError: the daemon refused (e.g. ``ResourceExhausted``).
    """
    kv = describe_kv_caches(kv_caches, layout)
    check_namespace(ns, kv)
    keys = ns.block_keys(token_ids)
    ids = _engine_ids(block_ids, len(keys))
    if not keys:
        return PagedStoreResult(0, 0, 0)
    allocs = client.allocate(ns, keys)
    new = [(i, a) for i, a in enumerate(allocs) if a.status == "NEW"]
    present = sum(1 for a in allocs if a.status == "PRESENT")
    new_keys = [a.key for _, a in new]
    if not new:
        return PagedStoreResult(0, present, len(keys) - present)
    try:
        with _slot_tensors([a.view for _, a in new]) as slots:
            _gather_to_slots(kv, layout, ids[[i for i, _ in new]], slots)
        sums = [xxhash.xxh3_64_intdigest(a.view[: kv.block_nbytes]) for _, a in new]
    except BaseException:
        client.abort(new_keys)
        raise
    client.commit(new_keys, sums)
    return PagedStoreResult(len(new), present, len(keys) - len(new) - present)


def load_into_paged(
    client: PagedClient,
    ns: Namespace,
    kv_caches: KVCaches | PagedKV,
    block_ids: torch.Tensor | Sequence[int],
    token_ids: Sequence[int] | np.ndarray,
    layout: str,
) -> int:
    """Loads the longest cached prefix of ``token_ids`` into the engine's paged cache.

    Args:
        client: a connected :class:`kvstore.Client` (or anything with its verbs).
        ns: the namespace of the blocks; must match the cache.
        kv_caches: the engine's cache, written in place.
        block_ids: engine block ids to fill, in order; at most this many blocks load.
        token_ids: the sequence's tokens from its start.
        layout: ``"vllm_gpu"``, ``"flash"`` or ``"vllm_cpu"``.

    Returns:
        Tokens loaded: a multiple of ``ns.block_tokens`` (0 on a miss).  Blocks
        past that count are left untouched.

    Raises:
        KernelInputError: the cache does not match ``ns`` or ``layout``, or
            duplicate / out-of-range block ids.
        kvstore.errors.KVStoreError: the daemon refused; ``LeaseLost``: the session
            ended during the copy, so what was written into ``block_ids`` cannot be
            vouched for: treat none of it as loaded.
    """
    kv = describe_kv_caches(kv_caches, layout)
    check_namespace(ns, kv)
    ids_all = (
        block_ids.detach().to("cpu", torch.int64)
        if isinstance(block_ids, torch.Tensor)
        else torch.tensor(list(block_ids), dtype=torch.int64)
    )
    keys = ns.block_keys(token_ids)[: ids_all.numel()]
    if not keys:
        return 0
    n = int(client.lookup(keys).num_cached)
    if n == 0:
        return 0
    views = client.acquire(keys[:n])
    m = next((i for i, v in enumerate(views) if v is None), len(views))
    held = [k for k, v in zip(keys[:n], views, strict=True) if v is not None]
    try:
        if m:
            usable = [v for v in views[:m] if v is not None]
            with _slot_tensors(usable) as slots:
                _scatter_from_slots(kv, layout, ids_all[:m], slots)
    finally:
        client.release(held)
    return m * ns.block_tokens
