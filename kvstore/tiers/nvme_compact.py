"""Compaction of the NVMe tier: reclaim the space of freed blocks.

A sealed segment whose freed share reaches ``compact_min_dead_ratio`` has its live
blocks copied to the end of the active segment (verified on the way: a block that
fails its checksum is not carried forward but becomes a miss), made durable, and
their index records moved in one transaction (each move conditional on the record
still naming the old extent).  Once the deletes queued before are applied, the file
is unlinked; its descriptor closes when the last reader lets go, so a block read
during compaction is always read whole from one place or the other.

Back-pressure: a ``write`` that finds the segment files over
:meth:`CompactionMixin.disk_limit` waits for the pending writes to become durable
and for compaction to catch up, so sustained turnover cannot pile up dead space.
"""

from __future__ import annotations

import threading
import time

from kvstore.tiers.nvme_index import DeleteIf, Index, MoveIf, Op
from kvstore.tiers.nvme_io import ALIGN, IOBackend
from kvstore.tiers.nvme_options import NvmeOptions
from kvstore.tiers.nvme_segments import Segment, SegmentSet, Slot, SlotState


class CompactionMixin:
    """The compaction half of :class:`~kvstore.tiers.nvme.NvmeTier` (state lives there)."""

    opts: NvmeOptions
    io: IOBackend
    index: Index
    segs: SegmentSet
    counters: dict[str, int]
    _lock: threading.Lock
    _db_lock: threading.Lock
    _compact_lock: threading.Lock
    _compact_wake: threading.Event
    _compacted: threading.Condition  # on _lock: a segment was retired
    _compactor: threading.Thread | None
    capacity_bytes: int
    _closed: bool
    _pending: int
    degraded: str | None
    _stalled_at = -1  # segments_deleted when a wait last found compaction stuck

    def _degrade(self, reason: str) -> None:
        raise NotImplementedError

    def _barrier(self) -> None:
        raise NotImplementedError

    def _extent_ok(self, s: Slot, ext: memoryview) -> bool:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def disk_limit(self) -> float:
        """Disk use above which a write waits for compaction (back-pressure).

        At steady state every sealed segment not yet due for compaction is less than
        ``compact_min_dead_ratio`` dead, so the segments hold at most
        ``capacity / (1 - ratio)``, plus the active segment and the ones being
        compacted (two segments of slack).  Turnover faster than compaction would
        pile dead segments up beyond that; the writer waits for them instead.
        """
        ratio = self.opts.compact_min_dead_ratio
        if ratio >= 1:
            return float("inf")  # only wholly dead segments are compacted: no bound
        return self.capacity_bytes / (1 - ratio) + 2 * self.opts.segment_bytes

    def _wait_for_compaction(self) -> None:
        """Called by ``write`` when the segments exceed :meth:`disk_limit`: wait while
        compaction makes progress (or run it here without a background compactor).
        Gives up as soon as there is nothing to compact or a round frees nothing, so it
        never waits for what cannot happen."""
        limit = self.disk_limit()
        if self._stalled_at == self.counters["segments_deleted"]:
            return  # no segment retired since the last wait found compaction stuck
        t0 = time.monotonic()
        with self._lock:
            self.counters["compaction_waits"] += 1
        while not self._closed and not self.degraded and self.segs.disk_bytes > limit:
            if self._pending:
                # A segment is compacted only once its writes are durable: under heavy
                # turnover, blocks die before the group commit has indexed them.
                self.flush()
            if self._compactor is None:
                if not self.compact():
                    self._stalled_at = self.counters["segments_deleted"]
                    break
                continue
            with self._lock:
                if not self.segs.candidates(self.opts.compact_min_dead_ratio):
                    break
                before = self.segs.disk_bytes
                self._compact_wake.set()
                self._compacted.wait(timeout=1.0)
                if self.segs.disk_bytes >= before:  # nothing retired within a second
                    self._stalled_at = self.counters["segments_deleted"]
                    break
        with self._lock:
            self.counters["compaction_wait_ms"] += int((time.monotonic() - t0) * 1000)

    def compact(self, min_dead_ratio: float | None = None) -> int:
        """Compact sealed segments whose dead share is at least ``min_dead_ratio``.

        Returns:
            Bytes of segment files deleted.
        """
        ratio = self.opts.compact_min_dead_ratio if min_dead_ratio is None else min_dead_ratio
        if self._closed:
            return 0
        reclaimed = 0
        with self._compact_lock:
            with self._lock:
                todo = self.segs.candidates(ratio)
                if self.degraded:  # copies would fail (a full disk): only delete dead files
                    todo = [s for s in todo if s.live == 0]
            for seg in todo:
                reclaimed += self._compact_segment(seg)
        return reclaimed

    def _compact_segment(self, seg: Segment) -> int:
        with self._lock:
            if seg.pending or not seg.sealed:
                return 0
            moving = [s for s in seg.slots if s.state == SlotState.DURABLE]
        moves: list[tuple[Slot, Segment | None, int]] = []
        buf = self.io.bounce(max((s.length for s in moving), default=ALIGN))
        try:
            for s in moving:
                mv = memoryview(buf)[: s.length]
                try:
                    self.io.pread(seg.f, mv, s.off)
                    if not self._extent_ok(s, mv):  # compressed extents: decoded to check
                        moves.append((s, None, 0))  # corrupt: not carried forward
                        continue
                    with self._lock:
                        nseg, noff = self.segs.place(s.length)
                        nseg.pending += 1
                    moves.append((s, nseg, noff))
                    self.io.pwrite(nseg.f, mv, noff)
                finally:
                    mv.release()
            for dseg in {m[1] for m in moves if m[1] is not None}:
                self.segs.make_durable(dseg)
        except OSError as exc:
            with self._lock:
                for s, mseg, _ in moves:
                    if mseg is not None:
                        mseg.pending -= 1
                        mseg.dead += s.length
            self._degrade(f"compaction of {seg.path} failed: {exc}")
            return 0
        ops: list[Op] = []
        with self._db_lock:
            with self._lock:
                for s, to, noff in moves:
                    alive = s.state == SlotState.DURABLE and s.seg is seg
                    if to is None:
                        if alive:  # later reads raise ChecksumMismatch: a miss
                            s.state = SlotState.CORRUPT
                            s.why = "checksum mismatch (found by compaction)"
                            self.counters["checksum_failures"] += 1
                            seg.kill(s)
                            s.seg = None
                            ops.append(DeleteIf(s.key, seg.id, s.off))
                        continue
                    to.pending -= 1
                    if alive:
                        old_off = s.off
                        seg.kill(s)
                        s.seg, s.off = to, noff
                        to.add(s)
                        ops.append(MoveIf(s.key, s.record(), seg.id, old_off))
                    else:
                        to.dead += s.length  # freed while being copied: garbage now
            try:
                self.index.apply(ops)
            except Exception as exc:  # noqa: BLE001 - any lmdb.Error: keep the old file
                self._degrade(f"index write failed during compaction: {exc}")
                return 0
        # Deletes of blocks freed from this segment are queued: apply them first.
        self._barrier()
        with self._lock:
            size = self.segs.retire(seg)
            self.counters["compactions"] += 1
            self.counters["compacted_bytes"] += sum(s.length for s, n, _ in moves if n)
            self.counters["segments_deleted"] += 1
            self._compacted.notify_all()
        return size

    def _compact_loop(self) -> None:
        while not self._closed:
            self._compact_wake.wait(timeout=5.0)
            self._compact_wake.clear()
            if self._closed:
                return
            self.compact()
