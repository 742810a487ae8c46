"""Engine KV-cache layouts and the one canonical contiguous block layout.

An engine keeps its KV cache paged: one tensor (or two) per layer, indexed by a
block id.  kvstore keeps each block as one contiguous run of bytes.  This module
turns an engine's ``kv_caches`` into a list of *planes* and fixes how a block's
bytes are ordered, so every kernel (CUDA or CPU twin) agrees.

A plane is a tensor whose first dimension is the block id and whose block
``plane[b]`` is contiguous in memory.  The canonical kvstore block is::

    for layer in layers:            # in the order given
        for plane in layer's planes:  # K then V where the layout splits them
            plane[block_id] as raw bytes

so ``block_nbytes == num_layers * 2 * block_tokens * kv_heads * head_dim * itemsize``
(the same as :attr:`kvstore.keys.Namespace.block_nbytes`).

Layouts (``layout=`` argument):

``"vllm_gpu"``
    vLLM's GPU layout: per layer ``[2, num_blocks, block_tokens, kv_heads, head_dim]``;
    planes ``layer[0]`` (K) and ``layer[1]`` (V).  A single stacked tensor
    ``[num_layers, 2, num_blocks, ...]`` is accepted too.
``"flash"``
    flash-attention's layout: separate K and V per layer, each
    ``[num_blocks, block_tokens, kv_heads, head_dim]``; given as a list of
    ``(K, V)`` pairs or a flat list ``[K0, V0, K1, V1, ...]`` (or a stacked
    ``[num_layers, 2, num_blocks, ...]`` tensor).
``"vllm_cpu"``
    vLLM's CPU layout: per layer ``[num_blocks, kv_heads, block_tokens, 2 * head_dim]``
    (all layers may be views of one buffer); one plane per layer, copied as
    opaque bytes (inside a block vLLM stores K transposed, then V).  A stacked
    ``[num_layers, num_blocks, ...]`` tensor is accepted too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

LAYOUTS = ("vllm_gpu", "flash", "vllm_cpu")

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
    torch.float32: "float32",
}
"""Element types a KV cache may have, with the names :class:`kvstore.keys.Namespace` uses."""

KVCaches = torch.Tensor | Sequence[torch.Tensor] | Sequence[tuple[torch.Tensor, torch.Tensor]]


class KernelInputError(ValueError):
    """Input a kernel cannot work on: wrong dtype, shape, device, ids or buffer size."""


@dataclass(frozen=True, slots=True)
class PagedKV:
    """An engine's KV cache seen as planes of blocks.

    Attributes:
        layout: one of :data:`LAYOUTS`.
        planes: every plane in canonical order (layer-major, K before V).
        num_layers: layers in the cache.
        num_blocks: blocks per plane (valid block ids are ``0 .. num_blocks - 1``).
        block_tokens: tokens per block.
        kv_heads: KV heads.
        head_dim: elements per head.
        dtype: element type.
        device: where the cache lives.
        plane_nbytes: bytes of one block in one plane.
        plane_strides: bytes between consecutive blocks, per plane.
    """

    layout: str
    planes: tuple[torch.Tensor, ...]
    num_layers: int
    num_blocks: int
    block_tokens: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    plane_nbytes: int
    plane_strides: tuple[int, ...]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one canonical kvstore block (all layers)."""
        return self.plane_nbytes * len(self.planes)

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def plane_bytes(self, p: int) -> torch.Tensor:
        """Plane ``p`` as a ``uint8`` view of shape ``[num_blocks, plane_nbytes]``."""
        plane = self.planes[p]
        # Through the untyped storage: works for every dtype and any block stride.
        raw = torch.empty(0, dtype=torch.uint8, device=plane.device)
        raw.set_(plane.untyped_storage())
        return raw.as_strided(
            (self.num_blocks, self.plane_nbytes),
            (self.plane_strides[p], 1),
            storage_offset=plane.storage_offset() * plane.element_size(),
        )


def _as_layer_list(
    kv_caches: KVCaches, layout: str
) -> list[torch.Tensor | tuple[torch.Tensor, ...]]:
    """Splits the caller's kv_caches into one item per layer."""
    if isinstance(kv_caches, torch.Tensor):
        want = 5 if layout == "vllm_cpu" else 6
        if kv_caches.dim() != want:
            raise KernelInputError(
                f"layout {layout!r}: a stacked kv cache tensor must have {want} dims "
                f"(layers first), got shape {tuple(kv_caches.shape)}"
            )
        if layout == "flash":
            return [(kv_caches[i, 0], kv_caches[i, 1]) for i in range(kv_caches.shape[0])]
        return list(kv_caches.unbind(0))
    items: list[Any] = list(kv_caches)
    if not items:
        raise KernelInputError("kv_caches is empty: need at least one layer")
    if layout != "flash":
        for i, t in enumerate(items):
            if not isinstance(t, torch.Tensor):
                raise KernelInputError(
                    f"layout {layout!r}: kv_caches[{i}] must be a tensor, got {type(t).__name__}"
                )
        return list(items)
    if all(isinstance(t, torch.Tensor) for t in items):
        if len(items) % 2:
            raise KernelInputError(
                f"layout 'flash': a flat list must hold K and V per layer (even length), "
                f"got {len(items)} tensors"
            )
        return [(items[i], items[i + 1]) for i in range(0, len(items), 2)]
    out: list[torch.Tensor | tuple[torch.Tensor, ...]] = []
    for i, pair in enumerate(items):
        if (
            not isinstance(pair, tuple | list)
            or len(pair) != 2
            or not all(isinstance(t, torch.Tensor) for t in pair)
        ):
            raise KernelInputError(
                f"layout 'flash': kv_caches[{i}] must be a (K, V) pair of tensors"
            )
        out.append(tuple(pair))
    return out


def _planes_of(
    layer: torch.Tensor | tuple[torch.Tensor, ...], layout: str, i: int
) -> list[torch.Tensor]:
    if layout == "flash":
        assert isinstance(layer, tuple)
        k, v = layer
        for name, t in (("K", k), ("V", v)):
            if t.dim() != 4:
                raise KernelInputError(
                    f"layout 'flash': layer {i} {name} must be [num_blocks, block_tokens, "
                    f"kv_heads, head_dim], got shape {tuple(t.shape)}"
                )
        if k.shape != v.shape:
            raise KernelInputError(
                f"layout 'flash': layer {i} K {tuple(k.shape)} and V {tuple(v.shape)} differ"
            )
        return [k, v]
    assert isinstance(layer, torch.Tensor)
    if layout == "vllm_gpu":
        if layer.dim() != 5 or layer.shape[0] != 2:
            raise KernelInputError(
                f"layout 'vllm_gpu': layer {i} must be [2, num_blocks, block_tokens, kv_heads, "
                f"head_dim], got shape {tuple(layer.shape)}"
            )
        return [layer[0], layer[1]]
    if layer.dim() != 4 or layer.shape[3] % 2:
        raise KernelInputError(
            f"layout 'vllm_cpu': layer {i} must be [num_blocks, kv_heads, block_tokens, "
            f"2 * head_dim], got shape {tuple(layer.shape)}"
        )
    return [layer]


def describe_kv_caches(kv_caches: KVCaches | PagedKV, layout: str) -> PagedKV:
    """Validates an engine's KV cache and returns its planes.

    Args:
        kv_caches: per-layer tensors (see the module docstring for each layout),
            or a stacked tensor with the layers first, or an already described
            :class:`PagedKV` (returned as is when its layout matches).
        layout: one of :data:`LAYOUTS`.

    Raises:
        KernelInputError: unknown layout, wrong shape, dtype or device, layers that
            differ, or a block that is not contiguous in memory.
    """
    if layout not in LAYOUTS:
        raise KernelInputError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if isinstance(kv_caches, PagedKV):
        if kv_caches.layout != layout:
            raise KernelInputError(
                f"kv cache was described as {kv_caches.layout!r}, not {layout!r}"
            )
        return kv_caches
    layers = _as_layer_list(kv_caches, layout)
    planes: list[torch.Tensor] = []
    for i, layer in enumerate(layers):
        planes.extend(_planes_of(layer, layout, i))
    first = planes[0]
    if first.dtype not in DTYPE_NAMES:
        raise KernelInputError(
            f"unsupported kv cache dtype {first.dtype}; supported: "
            f"{', '.join(str(d) for d in DTYPE_NAMES)}"
        )
    for j, p in enumerate(planes):
        if p.shape != first.shape:
            raise KernelInputError(
                f"every layer must have the same shape: plane {j} is {tuple(p.shape)}, "
                f"plane 0 is {tuple(first.shape)}"
            )
        if p.dtype != first.dtype:
            raise KernelInputError(
                f"mixed dtypes: plane {j} is {p.dtype}, plane 0 is {first.dtype}"
            )
        if p.device != first.device:
            raise KernelInputError(
                f"mixed devices: plane {j} is on {p.device}, plane 0 on {first.device}"
            )
        if p.shape[0] and not p[0].is_contiguous():
            raise KernelInputError(
                f"plane {j}: one block is not contiguous in memory (strides {p.stride()}); "
                "kvstore copies whole blocks"
            )
        if p.shape[0] > 1 and p.stride(0) < p[0].numel():
            raise KernelInputError(f"plane {j}: blocks overlap in memory (stride {p.stride(0)})")
    if layout == "vllm_cpu":
        num_blocks, kv_heads, block_tokens, two_d = first.shape
        head_dim = two_d // 2
    else:
        num_blocks, block_tokens, kv_heads, head_dim = first.shape
    if min(block_tokens, kv_heads, head_dim) <= 0:
        raise KernelInputError(f"empty blocks: plane shape {tuple(first.shape)}")
    es = first.element_size()
    return PagedKV(
        layout=layout,
        planes=tuple(planes),
        num_layers=len(layers),
        num_blocks=int(num_blocks),
        block_tokens=int(block_tokens),
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        dtype=first.dtype,
        device=first.device,
        plane_nbytes=int(
            block_tokens * kv_heads * head_dim * es * (2 if layout == "vllm_cpu" else 1)
        ),
        plane_strides=tuple(int(p.stride(0) * es) for p in planes),
    )
