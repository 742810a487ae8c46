"""The DRAM arena for model weights: one pre-faulted shared-memory file.

Resident models are extents of this file; clients map their model's extent.  One
arena reused across models, rather than a fresh file per model, because first touch
of fresh pages is the bottleneck on small VMs (measured here: ~0.5 GB/s to allocate
shmem pages and ~0.1-0.4 GB/s to fault them in, against a 1.5-2.3 GB/s disk): the
arena pays that once, in the background at start, and every later load runs at disk
speed.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import mmap
import os
import re
import secrets
import threading
import time
from pathlib import Path

from loader.errors import ModelStoreError
from loader.paths import user_path
from loader.physmem import (
    MADV_POPULATE_WRITE,
    contiguous_runs,
    one_cpu,
    soak_limit,
    soaked_small_blocks,
)

EXTENT_ALIGN = 64 << 10
_PREFAULT_STEP = 64 << 20
log = logging.getLogger(__name__)

ARENA_SOAK_ORDER = 8
"""Free blocks below 2 MiB (up to 2**8 pages) are held aside while the arena is faulted in."""
SCATTERED_RUNS = 64
"""An arena with more physically contiguous runs per 4 MiB than this (a mean run under
64 KiB) is scattered: its pages are given back and faulted in again, once, if no model
has used it yet.  Good arenas measured here had 5-11; a scattered one, 258, and loads
into it ran at 0.78 of the disk's direct read instead of ~0.9."""
REFAULT_TRIES = 1


class ExtentAllocator:
    """First-fit allocator of aligned extents with coalescing frees."""

    def __init__(self, size: int, align: int = EXTENT_ALIGN) -> None:
        self.size, self.align = size, align
        self._free: list[tuple[int, int]] = [(0, size)] if size else []
        self.used_ever = False  # any extent handed out since creation

    def _round(self, n: int) -> int:
        return max(self.align, (n + self.align - 1) // self.align * self.align)

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a free extent of ``nbytes`` (rounded up), or None."""
        need = self._round(nbytes)
        for i, (off, size) in enumerate(self._free):
            if size >= need:
                self.used_ever = True
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, size - need)
                return off
        return None

    def free(self, offset: int, nbytes: int) -> None:
        size = self._round(nbytes)
        i = bisect.bisect_left(self._free, (offset, 0))
        if (i > 0 and self._free[i - 1][0] + self._free[i - 1][1] > offset) or (
            i < len(self._free) and offset + size > self._free[i][0]
        ):
            raise ValueError(f"double free of extent at {offset}")
        self._free.insert(i, (offset, size))
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
            self._free[i] = (offset, size + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]

    @property
    def free_bytes(self) -> int:
        return sum(s for _, s in self._free)

    @property
    def largest_free(self) -> int:
        return max((s for _, s in self._free), default=0)


class ModelArena:
    """A shared-memory file of ``size`` bytes mapped by the daemon.

    Args:
        shm_dir: a tmpfs folder (``/dev/shm``).
        size: bytes (rounded up to the extent alignment).
        prefault: touch every page in a background thread.
        alloc_lock: the lock its owner holds around ``allocator`` calls; the pre-fault
            thread holds it to check that no extent was ever handed out before it gives
            a scattered arena's pages back.
    """

    def __init__(
        self,
        shm_dir: str | os.PathLike[str],
        size: int,
        prefault: bool = True,
        alloc_lock: threading.Lock | None = None,
    ) -> None:
        size = (size + EXTENT_ALIGN - 1) // EXTENT_ALIGN * EXTENT_ALIGN
        self.size = size
        d = user_path(shm_dir)
        _remove_stale(d)
        self.path = d / f"kvstore-models-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise ModelStoreError(f"cannot create the model arena in {d}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            self.path.unlink(missing_ok=True)
            raise ModelStoreError(f"cannot map the model arena: {exc.strerror}") from None
        finally:
            os.close(fd)
        self._mv = memoryview(self._map)
        self.allocator = ExtentAllocator(size)
        self.prefaulted = 0
        self.soaked = 0  # bytes of scattered free pages held aside while pre-faulting
        # Mean physically contiguous runs per 4 MiB once pre-faulted (None: unknown)
        self.runs_per_4mib: int | None = None
        self.prefault_seconds = 0.0
        self.refaults = 0  # times a scattered arena was given back and faulted in again
        self._alloc_lock = alloc_lock if alloc_lock is not None else threading.Lock()
        self._stop = threading.Event()
        self._prefault_done = threading.Event()
        self._thread: threading.Thread | None = None
        if prefault:
            self._thread = threading.Thread(
                target=self._prefault, name="loader-prefault", daemon=True
            )
            self._thread.start()
        else:
            self._prefault_done.set()

    def _prefault(self) -> None:
        # Yield the CPU to loads and to the KV path: this is background work.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        # The kernel's scattered free pages go to a throw-away mapping meanwhile, so
        # the arena gets contiguous ones: direct reads into scattered pages are split
        # into more requests and ran up to 3.7x slower here (loader/physmem.py).
        t0 = time.perf_counter()
        try:
            for attempt in range(1 + REFAULT_TRIES):
                # Every small free block, up to a quarter of available memory (soak_limit).
                limit = soak_limit(self.size)
                # On one CPU throughout: free pages are cached per CPU, so pages held
                # aside on one CPU would leave the other CPU's scattered cache to the arena.
                with one_cpu(), soaked_small_blocks(limit, ARENA_SOAK_ORDER) as self.soaked:
                    self._prefault_pages()
                if self._stop.is_set():
                    return
                # What the hold achieved (root only): reported in the daemon's stats.
                self.runs_per_4mib = runs = contiguous_runs(self._map)
                if runs is None or runs <= SCATTERED_RUNS or attempt == REFAULT_TRIES:
                    return
                if not self._give_back_unused():
                    return  # a model uses it already: keep what it has
                log.info(
                    "model arena: %d contiguous runs per 4 MiB (scattered pages slow direct "
                    "reads): faulting it in again",
                    runs,
                )
        finally:
            self.prefault_seconds = time.perf_counter() - t0
            self._prefault_done.set()

    def _give_back_unused(self) -> bool:
        """Frees every page of the arena if no extent was ever handed out (so nothing,
        and no client, can hold bytes in it); True when it did."""
        with self._alloc_lock:
            if self.allocator.used_ever:
                return False
            self._map.madvise(mmap.MADV_REMOVE, 0, self.size)  # punches the shm file
            self.prefaulted = 0
            self.refaults += 1
            return True

    def _prefault_pages(self) -> None:
        # From the top down: the first pages the kernel gives are its least contiguous
        # (smallest free blocks first), and extents are allocated first-fit from offset
        # 0, so the first models loaded land on the most contiguous memory.
        for off in reversed(range(0, self.size, _PREFAULT_STEP)):
            if self._stop.is_set():
                return
            n = min(_PREFAULT_STEP, self.size - off)
            try:
                self._map.madvise(MADV_POPULATE_WRITE, off, n)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                # Older kernel: write one byte per page (already zero, stays zero).
                for p in range(off, off + n, mmap.PAGESIZE):
                    self._mv[p] = self._mv[p]
            self.prefaulted += n

    def wait_prefaulted(self, timeout: float | None = None) -> bool:
        return self._prefault_done.wait(timeout)

    def view(self, offset: int, nbytes: int) -> memoryview:
        """A writable view of ``[offset, offset+nbytes)``; release it when done."""
        return self._mv[offset : offset + nbytes]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)
        try:
            self._mv.release()
            self._map.close()
        except BufferError:
            # A caller still holds a view; the mapping goes when that view is freed.
            pass


def _remove_stale(shm_dir: Path) -> None:
    """Removes arenas left by daemons that died without cleaning up (``kill -9``)."""
    for p in shm_dir.glob("kvstore-models-*"):
        m = re.match(r"kvstore-models-(\d+)-", p.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except PermissionError:
            pass
