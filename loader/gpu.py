"""The GPU path: host tensors to CUDA memory through a ring of pinned staging buffers.

The arena's pages are not page-locked, so a direct ``.to("cuda")`` would make the
driver stage them through its own small bounce buffer synchronously.  Copying each
chunk into one of a few pinned buffers and issuing the host-to-device copy
asynchronously overlaps the CPU copy of chunk ``i+1`` with the DMA of chunk ``i``;
memory stays bounded by the ring (``buffers x buffer_bytes``), never the model.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_BUFFERS = 4
DEFAULT_BUFFER_BYTES = 32 << 20


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def copy_to_cuda(
    host: dict[str, torch.Tensor],
    device: torch.device,
    buffers: int = DEFAULT_BUFFERS,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> dict[str, torch.Tensor]:
    """Copies every tensor of ``host`` to ``device`` through pinned staging buffers.

    Raises:
        RuntimeError: no CUDA device.
    """
    if not cuda_available():
        raise RuntimeError("device='cuda' requested but torch sees no CUDA device")
    stream = torch.cuda.Stream(device=device)
    ring = [torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(buffers)]
    done: list[torch.cuda.Event | None] = [None] * buffers
    out: dict[str, torch.Tensor] = {}
    slot = 0
    for name, t in host.items():
        dst = torch.empty(t.shape, dtype=t.dtype, device=device)
        out[name] = dst
        if t.numel() == 0:
            continue
        src_b = t.reshape(-1).view(torch.uint8)
        dst_b = dst.reshape(-1).view(torch.uint8)
        for off in range(0, src_b.numel(), buffer_bytes):
            n = min(buffer_bytes, src_b.numel() - off)
            ev = done[slot]
            if ev is not None:
                ev.synchronize()  # the DMA that used this buffer has finished
            stage = ring[slot][:n]
            stage.copy_(src_b[off : off + n])
            with torch.cuda.stream(stream):
                dst_b[off : off + n].copy_(stage, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            done[slot] = ev
            slot = (slot + 1) % buffers
    stream.synchronize()
    return out


class CudaSink:
    """A pipeline sink that lands a data file in one CUDA buffer (the NVMe -> GPU path).

    Reads land in the pipeline's ring (pinned memory when the ring is built with
    :func:`pinned_ring_backing`), and each chunk is copied to the device while the
    next reads are in flight.  The copy is synchronous per chunk because the ring
    slot is reused as soon as :meth:`consume` returns.
    """

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def target(self, offset: int, length: int) -> memoryview | None:
        return None

    def consume(self, offset: int, data: memoryview) -> None:
        src = torch.frombuffer(data, dtype=torch.uint8)
        self.buffer[offset : offset + len(data)].copy_(src)

    def finish(self) -> None:
        torch.cuda.synchronize(self.buffer.device)


def pinned_ring_backing(count: int, size: int) -> tuple[torch.Tensor, memoryview]:
    """Page-locked host memory for a pipeline ring; keep the tensor alive with the ring."""
    t = torch.empty(count * size, dtype=torch.uint8, pin_memory=True)
    return t, memoryview(t.numpy().data)


def load_file_to_cuda(
    path: str, manifest: Any, device: torch.device, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Reads a stored model straight into GPU memory (no DRAM residency).

    Args:
        path: the model's data file (``ModelStore.data_path(manifest)``).
        manifest: its :class:`~loader.manifest.Manifest`.
        device: a CUDA device.
        verify: check every tensor's checksum on the way (in the pinned ring).
    """
    from loader.client import torch_dtype
    from loader.pipeline import ReadPipeline

    if not cuda_available():
        raise RuntimeError("no CUDA device")
    keep, backing = pinned_ring_backing(8, 8 << 20)
    pipe = ReadPipeline(8, 8, 8 << 20, ring_backing=backing)
    sink = CudaSink(manifest.nbytes, device)
    try:
        pipe.read(
            path, manifest.nbytes, sink, manifest.tensors if verify else None, manifest.chunks
        )
    finally:
        pipe.close()
        del keep
    out: dict[str, torch.Tensor] = {}
    for t in manifest.tensors:
        dt = torch_dtype(t.dtype)
        raw = sink.buffer[t.offset : t.offset + t.nbytes]
        out[t.name] = (
            raw.view(dt).view(t.shape)
            if t.nbytes
            else torch.empty(t.shape, dtype=dt, device=device)
        )
    return out
