"""The read pipeline: many aligned reads in flight, bounded memory, verified bytes.

A data file is read in fixed-size chunks with ``os.preadv`` on a thread pool (the
syscall releases the GIL, so reads overlap each other and the copy/hash work of the
consumer).  The file is opened with ``O_DIRECT`` so the page cache is bypassed (no
double copy, no cache pollution); a filesystem that refuses it gets buffered reads.

Where the bytes land is a :class:`Sink`:

* a sink that can expose aligned host memory for a chunk (the DRAM arena) gets the
  read straight into it: no copy at all;
* any other sink (GPU memory, a checksum-only sink) gets each chunk in a buffer of a
  bounded ring of pre-allocated aligned buffers and copies it out while later reads
  are in flight.

Either way the pipeline itself holds at most ``ring_buffers x ring_buffer_bytes``,
never the model's size.

Verification, two ways:

* **chunk checksums** (manifests written since they were added, when the read size
  is a multiple of their chunk size): each read is hashed on the I/O thread that made
  it, as soon as it lands, so hashing runs on every core alongside the reads still in
  flight and nothing is left to hash when the last read completes;
* **per-tensor checksums**: chunks are consumed in file order and each tensor's
  xxh3_64 is computed incrementally on a hasher thread.

Any chunk mismatch stops the read and reads the file again with the per-tensor
checksums, which decide: a corrupt tensor is an error naming it, never wrong weights;
a mismatch that was only in padding or in that one read loads normally.
"""

from __future__ import annotations

import collections
import errno
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import xxhash

from loader.arena import MADV_POPULATE_WRITE
from loader.errors import ModelChecksumError, ModelStoreError
from loader.manifest import ALIGN, ChunkSums, TensorEntry


class Sink(Protocol):
    """Where a pipeline's bytes go.  Offsets are relative to the data file's start."""

    def target(self, offset: int, length: int) -> memoryview | None:
        """Aligned writable host memory to read ``[offset, offset+length)`` into, or None."""

    def consume(self, offset: int, data: memoryview) -> None:
        """Copies a chunk out of a ring buffer (called in file order, one at a time)."""

    def finish(self) -> None:
        """Called once after the last chunk (e.g. to synchronize a device stream)."""


class HostSink:
    """Reads land directly in ``dest`` (page-aligned host memory such as the arena)."""

    def __init__(self, dest: memoryview) -> None:
        self.dest = dest

    def target(self, offset: int, length: int) -> memoryview | None:
        return self.dest[offset : offset + length]

    def consume(self, offset: int, data: memoryview) -> None:
        self.dest[offset : offset + len(data)] = data

    def finish(self) -> None:
        pass


class CopySink(HostSink):
    """Like :class:`HostSink` but always through the ring (measures the copy path)."""

    def target(self, offset: int, length: int) -> memoryview | None:
        return None


class NullSink:
    """Discards the bytes (checksum verification or read-speed measurement only)."""

    def target(self, offset: int, length: int) -> memoryview | None:
        return None

    def consume(self, offset: int, data: memoryview) -> None:
        pass

    def finish(self) -> None:
        pass


class AlignedRing:
    """``count`` pre-allocated buffers of ``size`` bytes, page-aligned.

    Args:
        count: number of buffers (= reads that may be in flight into the ring).
        size: bytes per buffer, a multiple of 4 KiB.
        backing: optional buffer of at least ``count * size`` bytes to carve the ring
            from (pinned host memory for the GPU path); anonymous mmap by default.
    """

    def __init__(self, count: int, size: int, backing: memoryview | None = None) -> None:
        if count < 1 or size < ALIGN or size % ALIGN:
            raise ValueError(f"ring needs >= 1 buffers of a multiple of {ALIGN} bytes")
        self.count, self.size = count, size
        self._map: mmap.mmap | None = None
        self._populated = backing is not None
        if backing is None:
            self._map = mmap.mmap(-1, count * size)
            backing = memoryview(self._map)
        if len(backing) < count * size:
            raise ValueError("ring backing buffer too small")
        self._backing = backing
        self.buffers = [backing[i * size : (i + 1) * size] for i in range(count)]
        self._free = collections.deque(range(count))

    @property
    def nbytes(self) -> int:
        return self.count * self.size

    def populate(self) -> None:
        """Faults the ring in (first touch of fresh pages is slow, ~0.5 GB/s on small
        VMs); done on first use, so loads that never need the ring never pay for it."""
        if self._populated or self._map is None:
            return
        try:
            self._map.madvise(MADV_POPULATE_WRITE)
        except OSError:
            self._map.write(bytes(self.count * self.size))
        self._populated = True

    def has_free(self) -> bool:
        return bool(self._free)

    def acquire(self) -> int:
        if not self._populated:
            self.populate()
        return self._free.popleft()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def close(self) -> None:
        self.buffers = []
        try:
            self._backing.release()
            if self._map is not None:
                self._map.close()
        except BufferError:
            # A traceback still references a chunk view (an error being handled);
            # the mapping goes when that view is garbage-collected.
            pass


log = logging.getLogger(__name__)


class _ChunkMismatch(Exception):
    """A chunk read back did not match its checksum (the read falls back to tensors)."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class _Verifier:
    """Incremental per-tensor xxh3_64 over chunks fed in file order."""

    def __init__(self, tensors: Sequence[TensorEntry]) -> None:
        self.tensors = sorted(tensors, key=lambda t: t.offset)
        self.i = 0
        self.h = xxhash.xxh3_64()

    def update(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        while self.i < len(self.tensors):
            t = self.tensors[self.i]
            if t.offset >= end:
                return
            lo = max(t.offset, offset)
            hi = min(t.offset + t.nbytes, end)
            if hi > lo:
                self.h.update(data[lo - offset : hi - offset])
            if t.offset + t.nbytes > end:
                return
            if self.h.intdigest() != t.checksum:
                raise ModelChecksumError(
                    f"checksum mismatch in tensor {t.name!r} (offset {t.offset}, "
                    f"{t.nbytes} bytes): the stored data is corrupt"
                )
            self.h.reset()
            self.i += 1

    def finish(self) -> None:
        # Empty tensors at the very end of the file are past the last chunk.
        while self.i < len(self.tensors) and self.tensors[self.i].nbytes == 0:
            t = self.tensors[self.i]
            if xxhash.xxh3_64_intdigest(b"") != t.checksum:
                raise ModelChecksumError(f"checksum mismatch in (empty) tensor {t.name!r}")
            self.i += 1
        if self.i < len(self.tensors):
            t = self.tensors[self.i]
            raise ModelChecksumError(f"tensor {t.name!r} was not read completely")


@dataclass(slots=True)
class ReadStats:
    nbytes: int = 0
    seconds: float = 0.0
    direct: bool = False
    zero_copy_chunks: int = 0
    ring_chunks: int = 0
    fallback_reason: str = ""
    verify: str = ""  # "chunks", "tensors", "tensors after a chunk mismatch" or "off"

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class ReadPipeline:
    """Reads data files through a bounded ring with many reads in flight.

    Args:
        io_threads: threads issuing ``preadv``.
        ring_buffers: buffers in the ring (bounds reads in flight through the ring).
        ring_buffer_bytes: bytes per buffer and per read (a multiple of 4 KiB).
        direct: try ``O_DIRECT`` (falls back to buffered reads when refused).
        ring_backing: optional memory to carve the ring from (pinned memory for GPUs).
        max_inflight: most reads in flight (default ``ring_buffers``).  Reads that land
            straight in the destination cost no ring memory, so they can go deeper:
            a virtio disk here reads ~2x faster at 64 x 8 MiB in flight than at 8.

    Thread contract: one :meth:`read` at a time per pipeline (the ring is shared);
    the residency manager serializes loads.
    """

    def __init__(
        self,
        io_threads: int = 8,
        ring_buffers: int = 8,
        ring_buffer_bytes: int = 8 << 20,
        direct: bool = True,
        ring_backing: memoryview | None = None,
        max_inflight: int | None = None,
    ) -> None:
        self.ring = AlignedRing(ring_buffers, ring_buffer_bytes, ring_backing)
        self.direct = direct
        self.max_inflight = max(1, max_inflight or ring_buffers)
        self.io_threads = max(1, io_threads)
        self._pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="loader-io")
        self._lock = threading.Lock()

    def start_threads(self, timeout: float = 10.0) -> int:
        """Starts every I/O thread now (the pool otherwise spawns them during the first
        read, which then runs measurably slower).  Returns the number of threads."""
        n = self.io_threads
        gate = threading.Barrier(n + 1)
        futures = [self._pool.submit(gate.wait, timeout) for _ in range(n)]
        gate.wait(timeout)
        for f in futures:
            f.result()
        return n

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.ring.close()

    def _open(self, path: Path) -> tuple[int | None, int, str]:
        try:
            buffered = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ModelStoreError(f"cannot open data file {path}: {exc.strerror}") from None
        if not self.direct:
            return None, buffered, "direct I/O disabled by configuration"
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), buffered, ""
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return None, buffered, f"filesystem refused O_DIRECT ({exc.strerror})"
            os.close(buffered)
            raise ModelStoreError(f"cannot open data file {path}: {exc.strerror}") from None

    def read(
        self,
        path: str | os.PathLike[str],
        nbytes: int,
        sink: Sink,
        tensors: Sequence[TensorEntry] | None = None,
        chunks: ChunkSums | None = None,
    ) -> ReadStats:
        """Reads ``nbytes`` of ``path`` into ``sink``, verifying ``tensors``' checksums.

        Args:
            tensors: the tensors to verify (None: no verification).
            chunks: the data file's chunk checksums, used first when given with
                ``tensors`` and every read covers whole chunks (see the module doc).

        Raises:
            ModelChecksumError: a tensor's bytes do not match its checksum.
            ModelStoreError: the data file is missing, short or unreadable.
        """
        path = Path(path)
        with self._lock:
            if (
                tensors is not None
                and chunks is not None
                and chunks.covers(nbytes)
                and self.ring.size % chunks.size == 0
            ):
                try:
                    st = self._read(path, nbytes, sink, None, chunks)
                    st.verify = "chunks"
                    return st
                except _ChunkMismatch as exc:
                    # Its traceback holds the read's frames, which hold its future,
                    # which holds it: a cycle keeping views on the destination alive.
                    exc.__traceback__ = None
                    log.warning(
                        "%s: chunk at offset %d does not match its checksum; reading it "
                        "again with the per-tensor checksums",
                        path,
                        exc.offset,
                    )
                st = self._read(path, nbytes, sink, tensors)
                st.verify = "tensors after a chunk mismatch"
                return st
            st = self._read(path, nbytes, sink, tensors)
            st.verify = "tensors" if tensors is not None else "off"
            return st

    def _read(
        self,
        path: Path,
        nbytes: int,
        sink: Sink,
        tensors: Sequence[TensorEntry] | None,
        chunks: ChunkSums | None = None,
    ) -> ReadStats:
        fd_direct, fd_buf, reason = self._open(path)
        stats = ReadStats(nbytes=nbytes, direct=fd_direct is not None, fallback_reason=reason)
        state = {"direct": fd_direct is not None, "reason": reason}
        verifier = _Verifier(tensors) if tensors is not None else None
        step = self.ring.size
        inflight: collections.deque[tuple[int, memoryview, int, Future[int]]] = collections.deque()
        t0 = time.perf_counter()

        def pread(buf: memoryview, off: int) -> int:
            done = 0
            while done < len(buf):
                fd = fd_direct if state["direct"] and fd_direct is not None else fd_buf
                try:
                    n = os.preadv(fd, [buf[done:]], off + done)
                except OSError as exc:
                    # Some filesystems accept O_DIRECT at open and refuse it per read.
                    if exc.errno == errno.EINVAL and fd is fd_direct:
                        state["direct"] = False
                        state["reason"] = "filesystem refused an O_DIRECT read"
                        continue
                    raise
                if n == 0:
                    break
                done += n
            return done

        def pread_verified(buf: memoryview, off: int) -> int:
            # On the I/O thread, right after the read: xxh3 releases the GIL, so the
            # chunks of reads that land together are hashed on every core.
            n = pread(buf, off)
            if chunks is not None and n == len(buf):
                size, sums = chunks.size, chunks.sums
                for j in range(0, n, size):
                    if xxhash.xxh3_64_intdigest(buf[j : j + size]) != sums[(off + j) // size]:
                        raise _ChunkMismatch(off + j)
            return n

        job = pread_verified if chunks is not None else pread

        # Checksums of chunks read straight into the destination are computed on a
        # hasher thread, in file order, so the submitting loop keeps the disk busy
        # (xxh3 releases the GIL; the second core hashes while reads are in flight).
        hq: queue.Queue[tuple[int, memoryview] | None] = queue.Queue()
        herr: list[BaseException] = []

        def hash_loop() -> None:
            while (item := hq.get()) is not None:
                try:
                    if not herr and verifier is not None:
                        verifier.update(*item)
                except ModelChecksumError as exc:
                    herr.append(exc)
                finally:
                    hq.task_done()
            hq.task_done()

        hasher = threading.Thread(target=hash_loop, name="loader-hash", daemon=True)
        hasher.start()

        def complete() -> None:
            off, buf, slot, fut = inflight.popleft()
            try:
                n = fut.result()
            finally:
                if slot >= 0:
                    self.ring.release(slot)
            if n != len(buf):
                raise ModelStoreError(
                    f"data file {path} is short: read {n} of {len(buf)} bytes at {off}"
                )
            if slot >= 0:
                sink.consume(off, buf)
                stats.ring_chunks += 1
                if verifier is not None:
                    # Ring chunks are hashed here, before the slot is reused; first
                    # let the hasher finish what it has, to keep file order.
                    hq.join()
                    if herr:
                        raise herr[0]
                    verifier.update(off, buf)
            else:
                stats.zero_copy_chunks += 1
                hq.put((off, buf))

        try:
            size = os.fstat(fd_buf).st_size
            if size < nbytes:
                raise ModelStoreError(
                    f"data file {path} is truncated: {size} bytes, manifest says {nbytes}"
                )
            for off in range(0, nbytes, step):
                length = min(step, nbytes - off)
                while len(inflight) >= self.max_inflight:
                    complete()
                dst = sink.target(off, length)
                slot = -1
                if dst is None:
                    while not self.ring.has_free():
                        complete()
                    slot = self.ring.acquire()
                    dst = self.ring.buffers[slot][:length]
                inflight.append((off, dst, slot, self._pool.submit(job, dst, off)))
            while inflight:
                complete()
            hq.put(None)
            hasher.join()
            if herr:
                raise herr[0]
            if verifier is not None:
                verifier.finish()
            sink.finish()
        except OSError as exc:
            raise ModelStoreError(f"reading {path}: {exc.strerror}") from None
        finally:
            if hasher.is_alive():
                hq.put(None)
                hasher.join()
            # On error, wait for reads still in flight before the ring is reused.
            for _, _, slot, fut in inflight:
                fut.exception()
                if slot >= 0:
                    self.ring.release(slot)
            inflight.clear()
            if fd_direct is not None:
                os.close(fd_direct)
            os.close(fd_buf)
        stats.seconds = time.perf_counter() - t0
        stats.direct = bool(state["direct"])
        stats.fallback_reason = str(state["reason"])
        return stats
