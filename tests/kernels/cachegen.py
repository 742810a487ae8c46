"""Builders of small random paged KV caches for every layout and dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float32]
POISON = 0xA5


@dataclass
class Cache:
    """A random cache plus the ground truth needed by the naive reference."""

    layout: str
    caches: object  # what the engine would pass
    layers: list[object]  # per layer: tensor (vllm_gpu, vllm_cpu) or (K, V)
    num_blocks: int


def rand_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, device: str = "cpu"
) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (every bit pattern, NaNs included)."""
    es = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * es), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).to(device)


def make_cache(
    layout: str,
    dtype: torch.dtype,
    *,
    layers: int = 2,
    blocks: int = 7,
    tokens: int = 4,
    heads: int = 2,
    head_dim: int = 8,
    form: str = "list",
    pad: int = 0,
    seed: int = 0,
    device: str = "cpu",
) -> Cache:
    """A cache in ``layout``.

    ``form``: ``"list"`` per-layer tensors, ``"stacked"`` one tensor with layers
    first, ``"pairs"`` / ``"flat"`` for flash.  ``pad`` extra blocks of elements
    between blocks (a strided, non-contiguous plane), ``"shared"`` for vllm_cpu
    puts all layers in one buffer.
    """
    g = torch.Generator().manual_seed(seed)
    if layout == "vllm_cpu":
        per = (blocks, heads, tokens, 2 * head_dim)
        if form in ("stacked", "shared"):
            buf = rand_tensor((layers, *per), dtype, g, device)
            ls = list(buf.unbind(0))
            return Cache(layout, buf if form == "stacked" else ls, ls, blocks)
        ls = [_padded(per, dtype, g, pad, device) for _ in range(layers)]
        return Cache(layout, ls, ls, blocks)
    per = (blocks, tokens, heads, head_dim)
    if form == "stacked":
        buf = rand_tensor((layers, 2, *per), dtype, g, device)
        if layout == "vllm_gpu":
            return Cache(layout, buf, list(buf.unbind(0)), blocks)
        return Cache(layout, buf, [(buf[i, 0], buf[i, 1]) for i in range(layers)], blocks)
    if layout == "vllm_gpu":
        ls = []
        for _ in range(layers):
            if pad:
                big = rand_tensor((2, blocks, tokens + pad, heads, head_dim), dtype, g, device)
                ls.append(big[:, :, :tokens])
            else:
                ls.append(rand_tensor((2, *per), dtype, g, device))
        return Cache(layout, ls, ls, blocks)
    pairs = [
        (_padded(per, dtype, g, pad, device), _padded(per, dtype, g, pad, device))
        for _ in range(layers)
    ]
    caches: object = pairs if form != "flat" else [t for kv in pairs for t in kv]
    return Cache(layout, caches, pairs, blocks)


def _padded(
    shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator, pad: int, device: str
) -> torch.Tensor:
    if not pad:
        return rand_tensor(shape, dtype, g, device)
    big = rand_tensor((shape[0], shape[1] + pad, *shape[2:]), dtype, g, device)
    return big[:, : shape[1]]


def _elem_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t`` as uint8 with one trailing dim of element bytes."""
    es = t.element_size()
    return t.contiguous().view(torch.uint8).view(*t.shape, es)


def reference_block(c: Cache, b: int) -> bytes:
    """The canonical bytes of block ``b``, built one element at a time."""
    out = bytearray()
    for layer in c.layers:
        if c.layout == "vllm_cpu":
            assert isinstance(layer, torch.Tensor)
            e = _elem_bytes(layer.cpu())
            _, h_, t_, d2 = layer.shape
            for h in range(h_):
                for t in range(t_):
                    for d in range(d2):
                        out += bytes(e[b, h, t, d].tolist())
            continue
        kv = (layer[0], layer[1]) if isinstance(layer, torch.Tensor) else layer
        for part in kv:
            e = _elem_bytes(part.cpu())
            _, t_, h_, d_ = part.shape
            for t in range(t_):
                for h in range(h_):
                    for d in range(d_):
                        out += bytes(e[b, t, h, d].tolist())
    return bytes(out)


def as_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def direct_block(c: Cache, b: int) -> bytes:
    """The canonical bytes of block ``b`` by whole-block slicing (fast; for big caches)."""
    parts: list[bytes] = []
    for layer in c.layers:
        if c.layout == "vllm_cpu":
            assert isinstance(layer, torch.Tensor)
            parts.append(as_bytes(layer[b]))
            continue
        kv = (layer[0], layer[1]) if isinstance(layer, torch.Tensor) else layer
        parts.extend(as_bytes(part[b]) for part in kv)
    return b"".join(parts)
