"""A stored model's file read straight into GPU memory (kvikio), verified by chunk.

kvikio's ``CuFile.pread`` lands the bytes in device memory without a host copy when
the GPUDirect Storage driver is loaded (kvikio's own POSIX threads and a bounce
buffer otherwise).  The bytes still have to be checked: each segment is copied back
into one pinned staging buffer as soon as it has landed, while later segments are
still being read, and its 4 MiB chunks are hashed on a small thread pool against the
manifest's chunk checksums.  A mismatch raises :class:`ChunkMismatch`; the caller
(:func:`loader.gpu.load_file_to_cuda`) then loads through the pinned read ring with the
per-tensor checksums, which name a corrupt tensor.  Never wrong weights.

Memory: the destination (the model's size, on the device), ``READS_IN_FLIGHT``
segment reads (no host memory: they land on the device) and one staging segment.

The reader is a parameter, so the CPU twin (tests) runs the same orchestration with
``os.preadv`` into a CPU tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import xxhash

from loader.errors import ModelStoreError

SEGMENT_BYTES = 64 << 20
READS_IN_FLIGHT = 4
HASH_THREADS = 4

SegmentReader = Callable[[torch.Tensor, int, int], int]
"""``read(dest, offset, nbytes)``: reads ``nbytes`` of the file at ``offset`` into the
1-D uint8 tensor ``dest`` (a slice of the destination); returns the bytes read."""


class ChunkMismatch(Exception):
    """A chunk read into device memory did not match its checksum."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"chunk at offset {offset} does not match its checksum")
        self.offset = offset


def usable(manifest: Any, verify: bool) -> bool:
    """Whether ``manifest`` can be loaded this way (verifying needs its chunk sums)."""
    return not verify or (manifest.chunks is not None and manifest.chunks.covers(manifest.nbytes))


def segment_bytes(manifest: Any) -> int:
    """``SEGMENT_BYTES`` rounded up to whole chunks of ``manifest``'s chunk sums."""
    size = manifest.chunks.size if manifest.chunks is not None else 1
    return -(-SEGMENT_BYTES // size) * size


def read_to_device(
    manifest: Any, device: torch.device, read: SegmentReader, verify: bool = True
) -> torch.Tensor:
    """The whole data file of ``manifest`` in one uint8 tensor on ``device``.

    Raises:
        ChunkMismatch: a chunk does not match (the caller falls back, see module doc).
        ModelStoreError: a short read.
    """
    n = manifest.nbytes
    buf = torch.empty(n, dtype=torch.uint8, device=device)
    seg = segment_bytes(manifest)
    offsets = list(range(0, n, seg))

    def read_one(off: int) -> None:
        want = min(seg, n - off)
        try:
            got = read(buf[off : off + want], off, want)
        except (OSError, RuntimeError) as exc:  # kvikio reports I/O errors as RuntimeError
            raise ModelStoreError(f"read of {want} bytes at offset {off} failed: {exc}") from exc
        if got != want:
            raise ModelStoreError(f"short read: {got} of {want} bytes at offset {off}")

    with ThreadPoolExecutor(READS_IN_FLIGHT, thread_name_prefix="loader-gds") as io:
        futures = [io.submit(read_one, off) for off in offsets]
        try:
            if verify:
                _verify(manifest, buf, offsets, futures, seg, device)
            for f in futures:
                f.result()
        finally:
            for f in futures:
                f.cancel()
    return buf


def _verify(
    manifest: Any,
    buf: torch.Tensor,
    offsets: list[int],
    futures: list[Any],
    seg: int,
    device: torch.device,
) -> None:
    chunks = manifest.chunks
    size, sums = chunks.size, chunks.sums
    staging = torch.empty(seg, dtype=torch.uint8, pin_memory=device.type == "cuda")
    host = staging.numpy().data  # a memoryview of bytes (uint8, 1-D)
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="loader-gds-hash") as pool:
        for off, fut in zip(offsets, futures, strict=True):
            fut.result()  # this segment has landed (or its error is raised here)
            want = min(seg, manifest.nbytes - off)
            staging[:want].copy_(buf[off : off + want])  # device -> host, synchronous
            got = host[:want]  # the last chunk of the file may be short
            starts = range(0, want, size)
            digests = pool.map(lambda j, v=got: xxhash.xxh3_64_intdigest(v[j : j + size]), starts)
            for j, d in zip(starts, digests, strict=True):
                if d != sums[(off + j) // size]:
                    raise ChunkMismatch(off + j)


def kvikio_reader(path: str) -> tuple[SegmentReader, Callable[[], None]]:
    """A :data:`SegmentReader` over kvikio's ``CuFile`` for ``path``, and its closer."""
    import kvikio

    from kvstore.tiers.gpu_util import _DeviceSpan

    try:
        f = kvikio.CuFile(path, "r")
    except (OSError, RuntimeError) as exc:
        raise ModelStoreError(f"cannot open data file {path}: {exc}") from exc

    def read(dest: torch.Tensor, offset: int, nbytes: int) -> int:
        return int(f.pread(_DeviceSpan(dest.data_ptr(), nbytes), nbytes, offset).get())

    return read, f.close


def posix_reader(path: str) -> tuple[SegmentReader, Callable[[], None]]:
    """The CPU twin of :func:`kvikio_reader`: ``os.preadv`` into a CPU tensor."""
    fd = os.open(path, os.O_RDONLY)

    def read(dest: torch.Tensor, offset: int, nbytes: int) -> int:
        view = dest.numpy().data
        done = 0
        while done < nbytes:
            k = os.preadv(fd, [view[done:nbytes]], offset + done)
            if k == 0:
                break
            done += k
        return done

    return read, lambda: os.close(fd)
