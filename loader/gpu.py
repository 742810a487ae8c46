"""The GPU path: host tensors to CUDA memory through a ring of pinned staging buffers,
and stored models from disk into CUDA memory (kvikio or a pinned read ring).

The arena's pages are not page-locked, so a direct ``.to("cuda")`` would make the
driver stage them through its own small bounce buffer synchronously.  Copying each
chunk into one of a few pinned buffers and issuing the host-to-device copy
asynchronously overlaps the CPU copy of chunk ``i+1`` with the DMA of chunk ``i``;
memory stays bounded by the ring (``buffers x buffer_bytes``), never the model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

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
    path: str,
    manifest: Any,
    device: torch.device,
    verify: bool = True,
    use_kvikio: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Reads a stored model straight into GPU memory (no DRAM residency).

    With kvikio (``use_kvikio`` None: when it is installed) the reads land in device
    memory directly (GPUDirect Storage where the driver has it) and are verified by
    chunk (:mod:`loader.gpu_direct`); otherwise, for models without chunk checksums,
    or after a chunk mismatch, through a ring of pinned buffers with ``O_DIRECT``
    reads, verified on the way.

    Args:
        path: the model's data file (``ModelStore.data_path(manifest)``).
        manifest: its :class:`~loader.manifest.Manifest`.
        device: a CUDA device.
        verify: check every byte against the manifest's checksums.
        use_kvikio: force (True) or skip (False) the kvikio path.

    Raises:
        ModelChecksumError: a tensor's bytes do not match (names the tensor).
        ModelStoreError: the data file is missing, short or unreadable.
    """
    from loader import gpu_direct
    from loader.pipeline import ReadPipeline

    if not cuda_available():
        raise RuntimeError("no CUDA device")
    if use_kvikio is None:
        from kvstore.tiers.gpu_util import kvikio_available

        use_kvikio = kvikio_available()
    if use_kvikio and manifest.nbytes and gpu_direct.usable(manifest, verify):
        read, close = gpu_direct.kvikio_reader(path)
        try:
            buf = gpu_direct.read_to_device(manifest, device, read, verify)
            return tensor_views(manifest, buf, device)
        except gpu_direct.ChunkMismatch as exc:
            log.warning("%s: %s; loading it again with the per-tensor checksums", path, exc)
        finally:
            close()
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
    return tensor_views(manifest, sink.buffer, device)


def tensor_views(manifest: Any, buf: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """One tensor per manifest entry, viewing ``buf`` (the data file's bytes)."""
    from loader.client import torch_dtype

    out: dict[str, torch.Tensor] = {}
    for t in manifest.tensors:
        dt = torch_dtype(t.dtype)
        raw = buf[t.offset : t.offset + t.nbytes]
        out[t.name] = (
            raw.view(dt).view(t.shape)
            if t.nbytes
            else torch.empty(t.shape, dtype=dt, device=device)
        )
    return out
