"""Keeping the kernel's scattered free pages out of memory that direct reads land in.

Linux hands out single pages from its *smallest* free blocks first.  So a large
buffer faulted in now starts with whatever scattered pages are free (left over from
page cache drops and short-lived processes), and only then gets pages split from
large blocks, which come out physically contiguous and in order.  An ``O_DIRECT``
read into scattered pages needs a scatter-gather segment per run of contiguous
pages, and a virtio disk takes at most 254 segments per request (4 MiB requests need
runs of 4+ pages), so the block layer splits it into more, smaller requests.

Measured on the development VM (1 GB read, 64 x 8 MiB in flight, same process): the
first gigabyte of a freshly faulted 2.4 GB buffer took 266-304 requests and
0.46-0.70 s; its second gigabyte, and a buffer faulted after it, 264 requests (all
4 MiB) and 0.40-0.44 s.  The model arena's first extent, where the first model
loads, was the slow one; which is why the load's speed changed from one daemon
process to the next.

:func:`soaked_small_blocks` takes those small free blocks (``/proc/buddyinfo``) into
a throw-away anonymous mapping while the caller faults in its buffer, then gives
them back.  Requests stop being split at runs of 32 KiB (order 3, the default), but
runs of 64-512 KiB still read slower than runs of megabytes here, so the model arena
holds aside every free block below 2 MiB (``loader.arena.ARENA_SOAK_ORDER``).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import statistics
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil

MADV_POPULATE_WRITE = 23  # Linux >= 5.14; not exported by Python 3.11's mmap module
SMALL_BUFFER = 256 << 20
"""Buffers below this hold aside at most twice their size (not worth seconds at start)."""
SMALL_ORDER = 3
"""Free blocks of at most 2**3 pages (32 KiB) count as scattered."""


def small_free_bytes(
    max_order: int = SMALL_ORDER, buddyinfo: str | Path = "/proc/buddyinfo"
) -> int:
    """Bytes the kernel holds free in blocks of at most ``2**max_order`` pages.

    Sums every zone of every node in ``/proc/buddyinfo`` (one line per zone: free
    block counts by order).  0 when the file is missing or unreadable (not Linux,
    or a sandbox): then nothing is soaked.
    """
    try:
        text = Path(buddyinfo).read_text()
    except OSError:
        return 0
    total = 0
    for line in text.splitlines():
        head, _, counts = line.partition("zone")
        fields = counts.split()
        if not head.startswith("Node") or len(fields) < 2:
            continue
        for order, count in enumerate(fields[1 : max_order + 2]):
            if not count.isdigit():
                break
            total += int(count) * (mmap.PAGESIZE << order)
    return total


def soak_limit(nbytes: int) -> int:
    """How many bytes of small free blocks to hold aside while a buffer of ``nbytes``
    is faulted in: all there are, up to a quarter of available memory.

    Not a multiple of the buffer's size: a partial hold takes the smallest blocks and
    leaves the next ones to the buffer, and right after another process gave memory
    back (a benchmark's buffers, an earlier hold) those are single scattered pages.
    Measured on the development VM (2026-12-01, 1 GB buffer, 3.5 GB of small blocks):
    holding 0.5 GB left the buffer 1,024 runs per 4 MiB (every page apart) and its
    direct reads took 1,316 requests per GB and 3x as long as into a buffer faulted
    while every small block was held (3 runs, 268 requests).  A buffer under
    ``SMALL_BUFFER`` holds at most twice its size.
    """
    cap = psutil.virtual_memory().available // 4
    return min(2 * nbytes, cap) if nbytes < SMALL_BUFFER else cap


@contextlib.contextmanager
def soaked_small_blocks(
    limit: int, max_order: int = SMALL_ORDER, buddyinfo: str | Path = "/proc/buddyinfo"
) -> Iterator[int]:
    """Holds up to ``limit`` bytes of the kernel's free blocks of at most
    ``2**max_order`` pages for the duration of the ``with`` block (fault the buffer in
    inside it); yields the bytes held.  They are returned to the kernel on exit,
    exceptions included."""
    n = min(small_free_bytes(max_order, buddyinfo), max(0, limit))
    n -= n % mmap.PAGESIZE
    soak = _hold(n) if n > 0 else None
    try:
        yield len(soak) if soak is not None else 0
    finally:
        if soak is not None:
            soak.close()


def _hold(n: int) -> mmap.mmap | None:
    """``n`` bytes of single pages, faulted in; ``None`` when the kernel will not
    (then the caller goes on without: holding pages aside is an optimisation)."""
    try:
        soak = mmap.mmap(-1, n)
    except OSError:
        return None
    # Single pages, never huge ones: a huge page would come from a large block,
    # the memory this is meant to leave to the caller.
    with contextlib.suppress(AttributeError, OSError):
        soak.madvise(mmap.MADV_NOHUGEPAGE)
    try:
        soak.madvise(MADV_POPULATE_WRITE)
    except OSError:
        # No MADV_POPULATE_WRITE (Linux < 5.14) or no memory for it: hold nothing
        # rather than touch pages one by one into an out-of-memory kill.
        soak.close()
        return None
    return soak


@contextlib.contextmanager
def one_cpu() -> Iterator[int]:
    """Runs the calling thread on one CPU for the ``with`` block; yields the CPU, or
    -1 when affinity cannot be set (then nothing changes).

    The kernel keeps a cache of free single pages per CPU, refilled from (and
    filled with pages freed on) that CPU.  Holding pages aside and then faulting a
    buffer in on the same CPU means the buffer is served from what the hold left:
    large blocks.  Measured: with the two steps free to run on either of 2 CPUs,
    2 of 6 fresh daemons still read into scattered pages (440 and 662 requests per
    GB instead of 264, 1.3-3.7x slower).
    """
    tid = threading.get_native_id()
    try:
        before = os.sched_getaffinity(tid)
        cpu = min(before)
        os.sched_setaffinity(tid, {cpu})
    except (AttributeError, OSError, ValueError):
        yield -1
        return
    try:
        yield cpu
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, before)


_PFN_MASK = (1 << 55) - 1  # bits 0-54 of a /proc/self/pagemap entry: the page frame


def contiguous_runs(
    buf: mmap.mmap, samples: int = 256, window: int = 4 << 20, pagemap: str = "/proc/self/pagemap"
) -> int | None:
    """How scattered the pages of ``buf`` (faulted in) are: the mean number of
    physically contiguous runs per ``window`` bytes (a 4 MiB read's scatter-gather
    segments; a virtio disk splits a request above 254), over up to ``samples``
    windows spread evenly over ``buf``.

    ``None`` where the kernel does not show page frames (``/proc/self/pagemap`` reads
    zeros without ``CAP_SYS_ADMIN``) or has no such file.
    """
    page = mmap.PAGESIZE
    per = window // page
    nwin = len(buf) // window
    if nwin == 0:
        return None
    anchor = (ctypes.c_char * 1).from_buffer(buf)
    try:
        base = ctypes.addressof(anchor) // page
    finally:
        del anchor  # the export would keep ``buf`` from closing
    step = max(1, nwin // samples)
    runs: list[int] = []
    try:
        with open(pagemap, "rb") as f:
            for w in range(0, nwin, step):
                f.seek((base + w * per) * 8)
                pfns = [e & _PFN_MASK for e in struct.unpack(f"{per}Q", f.read(per * 8))]
                if not all(pfns):
                    return None  # no frames shown (not privileged) or a page not present
                runs.append(run_count(pfns))
    except (OSError, struct.error):
        return None
    # The mean, rounded up: a scattered stretch shows (a median would hide it).
    return math.ceil(statistics.fmean(runs))


def run_count(pfns: list[int]) -> int:
    """Runs of consecutive page frames in ``pfns`` (pages in virtual order)."""
    return 1 + sum(1 for a, b in zip(pfns, pfns[1:], strict=False) if b != a + 1) if pfns else 0
