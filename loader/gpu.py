"""The GPU path: host tensors to CUDA memory through a ring of pinned staging buffers.

The arena's pages are not page-locked, so a direct ``.to("cuda")`` would make the
driver stage them through its own small bounce buffer synchronously.  Copying each
chunk into one of a few pinned buffers and issuing the host-to-device copy
asynchronously overlaps the CPU copy of chunk ``i+1`` with the DMA of chunk ``i``;
memory stays bounded by the ring (``buffers x buffer_bytes``), never the model.
"""

from __future__ import annotations

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
