"""Batched reads of the NVMe tier: many blocks in flight, adjacent ones in one request.

``read_many`` is how the hierarchy promotes many NVMe-resident blocks at once
(Acquire, Prefetch).  Blocks that lie back to back on disk and whose destination
buffers are page-aligned whole pages (the DRAM arena's slots are) are read with one
``preadv`` per run of up to ``read_run_bytes``; the rest one by one; all on the
tier's read threads.  Compressed blocks (codec 1) join runs whatever their buffers:
their extents are read into the thread's bounce buffer in the same request and
decoded into the destination there.  Every block is verified against its checksum
on its own, so one bad block in a run fails alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from kvstore.tiers.base import ChecksumMismatch, TierIOError
from kvstore.tiers.nvme_io import IOBackend, is_aligned
from kvstore.tiers.nvme_options import NvmeOptions
from kvstore.tiers.nvme_segments import Segment, SegmentSet, Slot, SlotState

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry


class BatchReadMixin:
    """The batched-read half of :class:`~kvstore.tiers.nvme.NvmeTier` (state lives there)."""

    name: str
    opts: NvmeOptions
    io: IOBackend
    segs: SegmentSet
    counters: dict[str, int]
    _lock: threading.Lock
    _rpool: ThreadPoolExecutor

    def read_into(self, handle: Slot, entry: BlockEntry, dst: memoryview | None) -> None:
        raise NotImplementedError

    def _verify(
        self, s: Slot, entry: BlockEntry, dst: memoryview, seg: Segment, off: int
    ) -> ChecksumMismatch | None:
        raise NotImplementedError

    def _decode_verify(
        self, s: Slot, entry: BlockEntry, ext: memoryview, dst: memoryview, seg: Segment, off: int
    ) -> ChecksumMismatch | None:
        raise NotImplementedError

    def _try_read(self, s: Slot, entry: BlockEntry, dst: memoryview) -> Exception | None:
        try:
            self.read_into(s, entry, dst)
        except (ChecksumMismatch, TierIOError) as exc:
            # Without its traceback: the frames hold ``dst`` (a view of the arena) and
            # the future holding this result, a cycle that would pin the arena.
            return exc.with_traceback(None)
        return None

    def _read_run(self, run: list[tuple[Slot, BlockEntry, memoryview]]) -> list[Exception | None]:
        """Blocks that lie back to back on disk, read by one ``preadv`` into their buffers."""
        first = run[0][0]
        with self._lock:
            seg, off = first.seg, first.off
            pos, ok = off, seg is not None
            for s, _, _ in run:  # compaction may have moved some since they were grouped
                if s.state not in (SlotState.WRITTEN, SlotState.DURABLE) or s.seg is not seg:
                    ok = False
                    break
                ok = ok and s.off == pos
                pos += s.length
            if ok and seg is not None:
                seg.readers += 1
            codecs = [s.codec for s, _, _ in run]
        if not ok or seg is None:
            return [self._try_read(*it) for it in run]
        # Compressed extents land in this thread's bounce buffer, the rest in place.
        nb = sum(s.length for (s, _, _), c in zip(run, codecs, strict=True) if c)
        bounce = memoryview(self.io.bounce(nb))[:nb] if nb else None
        exts: list[memoryview | None] = []
        bpos = 0
        for (s, _, _), c in zip(run, codecs, strict=True):
            if c and bounce is not None:
                exts.append(bounce[bpos : bpos + s.length])
                bpos += s.length
            else:
                exts.append(None)
        try:
            iov = [d if x is None else x for (_, _, d), x in zip(run, exts, strict=True)]
            try:
                self.io.preadv(seg.f, iov, off)
            except OSError as exc:
                with self._lock:
                    self.counters["io_errors"] += len(run)
                msg = f"nvme tier {self.name!r}: read of {seg.path}@{off}: {exc}"
                return [TierIOError(msg) for _ in run]
            finally:
                del iov
                with self._lock:
                    seg.readers -= 1
                    self.segs.maybe_close(seg)
                    self.counters["read_requests"] += 1
            out: list[Exception | None] = []
            pos = off
            for (s, e, d), x in zip(run, exts, strict=True):
                if x is None:
                    out.append(self._verify(s, e, d, seg, pos))
                else:
                    out.append(self._decode_verify(s, e, x, d, seg, pos))
                pos += s.length
            return out
        finally:
            for x in exts:
                if x is not None:
                    x.release()
            if bounce is not None:
                bounce.release()

    def read_many(
        self, items: Sequence[tuple[Slot, BlockEntry, memoryview]]
    ) -> list[Exception | None]:
        """Read many blocks in parallel on the read threads.

        Blocks that lie back to back on disk and whose buffers are page-aligned and a
        whole number of pages long are read with one ``preadv`` per run of up to
        ``read_run_bytes``.

        Returns:
            One result per item: ``None`` (read and verified), or the
            :class:`ChecksumMismatch` / :class:`TierIOError` that item raised.
        """
        if self.opts.read_delay_ms:
            time.sleep(self.opts.read_delay_ms / 1000)  # tests: a slow disk, deterministically
        with self._lock:
            self.counters["read_many_calls"] += 1
            # Where each block is now (compaction may move them; _read_run re-checks).
            where = [(s.seg, s.off) for s, _, _ in items]
            packed = [s.codec != 0 for s, _, _ in items]
        direct: list[int] = []
        jobs: list[list[int]] = []
        for i, (s, _, d) in enumerate(items):
            if where[i][0] is not None and (packed[i] or (len(d) == s.length and is_aligned(d))):
                direct.append(i)
            else:
                jobs.append([i])
        direct.sort(key=lambda i: (where[i][0].id, where[i][1]))  # type: ignore[union-attr]
        cap = self.opts.read_run_bytes
        run: list[int] = []
        size = 0
        for i in direct:
            s = items[i][0]
            seg, off = where[i]
            if run:
                lseg, loff = where[run[-1]]
                llen = items[run[-1]][0].length
                if seg is lseg and off == loff + llen and size + s.length <= cap:
                    run.append(i)
                    size += s.length
                    continue
                jobs.append(run)
            run, size = [i], s.length
        if run:
            jobs.append(run)
        futs = [
            self._rpool.submit(self._read_run, [items[i] for i in job])
            if len(job) > 1
            else self._rpool.submit(lambda it: [self._try_read(*it)], items[job[0]])
            for job in jobs
        ]
        out: list[Exception | None] = [None] * len(items)
        for job, f in zip(jobs, futs, strict=True):
            for i, r in zip(job, f.result(), strict=True):
                out[i] = r
        return out
