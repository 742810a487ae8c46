"""Disk I/O for the NVMe tier: aligned buffers, the staging pool and the I/O backends.

Every extent the NVMe tier writes is 4 KiB-aligned in offset and length, and every
buffer handed to the kernel is page-aligned (``mmap`` memory), so the same calls work
with ``O_DIRECT`` (which bypasses the page cache and needs that alignment) and with
buffered files (tmpfs and some network filesystems refuse ``O_DIRECT``).

Backends:

* :class:`PosixBackend`: ``os.preadv`` / ``os.pwritev`` (both release the GIL, so a
  thread pool keeps many requests in flight).
* :class:`KvikioBackend`: kvikio ``CuFile`` (GPUDirect Storage when the driver
  supports it, kvikio's own POSIX thread pool otherwise).  Only chosen when kvikio
  imports and a CUDA device is present; kvikio needs ``libcuda`` even in its
  compatibility mode, so CPU-only hosts always use the POSIX backend.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ALIGN = 4096
"""Extent and buffer alignment (``O_DIRECT`` and GDS both need 4 KiB)."""


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def alloc_aligned(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory of ``align_up(nbytes)`` bytes, zero-filled and
    pre-faulted (first touch of fresh pages is far slower than a warm copy)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, max(ALIGN, align_up(nbytes)), flags=flags)


def buffer_address(mv: memoryview) -> int:
    """Address of the first byte of a contiguous buffer."""
    return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data)


def is_aligned(mv: memoryview) -> bool:
    return mv.contiguous and buffer_address(mv) % ALIGN == 0


def probe_o_direct(directory: Path) -> bool:
    """Whether ``directory``'s filesystem accepts ``O_DIRECT`` reads and writes."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / ".odirect-probe"
    buf = alloc_aligned(ALIGN)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    try:
        os.pwritev(fd, [buf], 0)
        os.preadv(fd, [buf], 0)
        return True
    except OSError as exc:
        # A full disk cannot tell: buffered I/O (the tier then starts degraded).
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSPC, errno.EDQUOT):
            return False
        raise
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
        buf.close()


class StagingPool:
    """A bounded pool of page-aligned buffers for writes in flight.

    ``acquire`` blocks while the pool's byte budget is spent (backpressure: memory
    stays bounded however fast blocks arrive).  Buffers are kept and reused by
    size, so in steady state nothing is allocated; a buffer of another size is
    unmapped to make room when needed.  A single block larger than the whole
    budget is still admitted when nothing else is in use, so progress is certain.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._cv = threading.Condition()
        self._free: dict[int, list[mmap.mmap]] = {}
        self._mapped = 0  # bytes of all buffers, free or in use
        self._in_use = 0
        self.waits = 0

    def preallocate(self, nbytes: int) -> None:
        """Map as many buffers of ``nbytes`` as fit the budget (done at start)."""
        size = align_up(nbytes)
        with self._cv:
            while self._mapped + size <= self.budget:
                self._free.setdefault(size, []).append(alloc_aligned(size))
                self._mapped += size

    def acquire(self, nbytes: int) -> mmap.mmap:
        size = align_up(nbytes)
        with self._cv:
            waited = False
            while True:
                lst = self._free.get(size)
                if lst:
                    buf = lst.pop()
                    self._in_use += size
                    return buf
                # Unmap idle buffers of other sizes until the new one fits.
                while self._mapped + size > self.budget and self._drop_one_idle(size):
                    pass
                if self._mapped + size <= self.budget or self._in_use == 0:
                    buf = alloc_aligned(size)
                    self._mapped += size
                    self._in_use += size
                    return buf
                if not waited:
                    self.waits += 1
                    waited = True
                self._cv.wait()

    def _drop_one_idle(self, keep: int) -> bool:
        for size, lst in self._free.items():
            if size != keep and lst:
                lst.pop().close()
                self._mapped -= size
                return True
        return False

    def release(self, buf: mmap.mmap) -> None:
        size = len(buf)
        with self._cv:
            self._in_use -= size
            if self._mapped > self.budget:  # an oversized one-off: give it back
                buf.close()
                self._mapped -= size
            else:
                self._free.setdefault(size, []).append(buf)
            self._cv.notify_all()

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    def close(self) -> None:
        with self._cv:
            for lst in self._free.values():
                for b in lst:
                    try:
                        b.close()
                    except BufferError:  # still viewed somewhere: the GC unmaps it later
                        pass
            self._free.clear()


class _BounceBuffers(threading.local):
    """One reusable aligned buffer per thread for reads into unaligned destinations."""

    buf: mmap.mmap | None = None

    def get(self, nbytes: int) -> mmap.mmap:
        if self.buf is None or len(self.buf) < nbytes:
            if self.buf is not None:
                self.buf.close()
            self.buf = alloc_aligned(nbytes)
        return self.buf


class IOBackend:
    """Positional reads and writes of aligned extents on segment files."""

    name = ""

    def __init__(self, o_direct: bool) -> None:
        self.o_direct = o_direct
        self._bounce = _BounceBuffers()

    def bounce(self, nbytes: int) -> mmap.mmap:
        """This thread's reusable aligned buffer of at least ``nbytes``."""
        return self._bounce.get(nbytes)

    def open(self, path: Path, create: bool) -> Any:
        """A file object for ``path`` (opened read-write, created when ``create``)."""
        raise NotImplementedError

    def close_file(self, f: Any) -> None:
        raise NotImplementedError

    def pwrite(self, f: Any, buf: memoryview, offset: int) -> None:
        """Write all of ``buf`` (aligned, length a multiple of 4 KiB) at ``offset``."""
        raise NotImplementedError

    def pwritev(self, f: Any, bufs: list[memoryview], offset: int) -> None:
        """Write ``bufs`` back to back from ``offset`` (one request where the backend can)."""
        for b in bufs:
            self.pwrite(f, b, offset)
            offset += len(b)

    def pread(self, f: Any, buf: memoryview, offset: int) -> None:
        """Fill all of ``buf`` (aligned, length a multiple of 4 KiB) from ``offset``."""
        raise NotImplementedError

    def preadv(self, f: Any, bufs: list[memoryview], offset: int) -> None:
        """Fill ``bufs`` back to back from ``offset`` (one request where the backend can)."""
        for b in bufs:
            self.pread(f, b, offset)
            offset += len(b)

    def sync(self, f: Any) -> None:
        """Make the file's data durable (``fdatasync``)."""
        raise NotImplementedError

    def read_extent(self, f: Any, offset: int, length: int, dst: memoryview) -> None:
        """Read ``len(dst)`` bytes at ``offset`` from an extent of ``length`` aligned bytes.

        Reads straight into ``dst`` when it is aligned and whole pages long;
        otherwise through this thread's bounce buffer and one copy.
        """
        n = len(dst)
        if n == length and is_aligned(dst):
            self.pread(f, dst, offset)
            return
        bb = self._bounce.get(length)
        mv = memoryview(bb)[:length]
        try:
            self.pread(f, mv, offset)
            dst[:] = mv[:n]
        finally:
            mv.release()


class PosixBackend(IOBackend):
    """``preadv`` / ``pwritev`` on file descriptors, ``O_DIRECT`` when available."""

    name = "posix"

    def open(self, path: Path, create: bool) -> int:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        if self.o_direct:
            flags |= os.O_DIRECT
        return os.open(path, flags, 0o600)

    def close_file(self, f: int) -> None:
        os.close(f)

    def pwrite(self, f: int, buf: memoryview, offset: int) -> None:
        done, n = 0, len(buf)
        while done < n:
            w = os.pwritev(f, [buf[done:]], offset + done)
            if w <= 0:
                raise OSError(errno.EIO, "short write")
            done += w

    def pwritev(self, f: int, bufs: list[memoryview], offset: int) -> None:
        total = sum(len(b) for b in bufs)
        done = os.pwritev(f, bufs, offset)
        if done >= total:
            return
        # A short vectored write (rare): finish the rest buffer by buffer.
        pos = offset
        for b in bufs:
            n = len(b)
            if done >= n:
                done -= n
            else:
                self.pwrite(f, b[done:], pos + done)
                done = 0
            pos += n

    def preadv(self, f: int, bufs: list[memoryview], offset: int) -> None:
        total = sum(len(b) for b in bufs)
        done = os.preadv(f, bufs, offset)
        if done >= total:
            return
        pos = offset  # a short vectored read (rare): finish buffer by buffer
        for b in bufs:
            n = len(b)
            if done >= n:
                done -= n
            else:
                self.pread(f, b[done:], pos + done)
                done = 0
            pos += n

    def pread(self, f: int, buf: memoryview, offset: int) -> None:
        done, n = 0, len(buf)
        while done < n:
            r = os.preadv(f, [buf[done:]], offset + done)
            if r <= 0:
                raise OSError(errno.EIO, f"short read at offset {offset + done} (end of file)")
            done += r

    def sync(self, f: int) -> None:
        os.fdatasync(f)


class KvikioBackend(IOBackend):
    """kvikio ``CuFile``: GPUDirect Storage into device memory, kvikio's pool for host memory.

    Host buffers work as they do with POSIX; a device buffer (CuPy array) passed to
    :meth:`pread_device` is filled by DMA from the disk without a host bounce when
    the GDS driver is loaded.
    """

    name = "kvikio"

    def __init__(self, o_direct: bool) -> None:
        super().__init__(o_direct)
        import kvikio

        self._kvikio = kvikio
        self._fds: dict[int, int] = {}

    def open(self, path: Path, create: bool) -> Any:
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        f = self._kvikio.CuFile(path, "r+")
        # fdatasync needs a plain descriptor; kvikio does not expose one for syncing.
        self._fds[id(f)] = os.open(path, os.O_RDWR)
        return f

    def close_file(self, f: Any) -> None:
        fd = self._fds.pop(id(f), None)
        if fd is not None:
            os.close(fd)
        f.close()

    def pwrite(self, f: Any, buf: memoryview, offset: int) -> None:
        n = f.pwrite(buf, len(buf), offset).get()
        if n != len(buf):
            raise OSError(errno.EIO, f"short kvikio write ({n} of {len(buf)})")

    def pread(self, f: Any, buf: memoryview, offset: int) -> None:
        n = f.pread(buf, len(buf), offset).get()
        if n != len(buf):
            raise OSError(errno.EIO, f"short kvikio read ({n} of {len(buf)})")

    def pread_device(self, f: Any, dev_buf: Any, offset: int) -> None:
        """Read into a device array (GPUDirect Storage when available)."""
        n = f.pread(dev_buf, dev_buf.nbytes, offset).get()
        if n != dev_buf.nbytes:
            raise OSError(errno.EIO, f"short kvikio read ({n} of {dev_buf.nbytes})")

    def sync(self, f: Any) -> None:
        os.fdatasync(self._fds[id(f)])


def kvikio_usable() -> str | None:
    """``None`` when kvikio and a CUDA device are present, else why not."""
    try:
        import kvikio  # noqa: F401
    except ImportError:
        return "kvikio is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device"
    except ImportError:
        return "torch is not installed"
    return None


def make_backend(choice: str, o_direct: bool) -> IOBackend:
    """The backend named by ``choice`` (``auto``, ``posix`` or ``kvikio``).

    Raises:
        RuntimeError: ``kvikio`` was asked for and cannot be used here.
    """
    if choice in ("auto", "kvikio"):
        why = kvikio_usable()
        if why is None:
            return KvikioBackend(o_direct)
        if choice == "kvikio":
            raise RuntimeError(f"io_backend 'kvikio' requested but unusable: {why}")
        log.debug("nvme: kvikio not used (%s); POSIX backend", why)
    return PosixBackend(o_direct)
