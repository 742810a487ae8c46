"""The NVMe tier: a persistent, crash-safe block store in append-only segment files.

Layout under ``path``: ``segments/seg-NNNNNNNN.dat`` (every extent 4 KiB-aligned),
``index/`` (LMDB: key -> :class:`~kvstore.tiers.nvme_index.Record`) and ``LOCK``.

Life of a block (the handle is a :class:`Slot`, which compaction may move):

1. ``reserve`` counts its aligned size against the capacity.
2. ``write`` (event-loop thread) copies the bytes into a staging buffer from a
   bounded pool -- waiting for one when all are in flight -- places the extent at the
   end of the active segment and hands the ``pwritev`` to an I/O thread.  When the
   segment files exceed their bound (turnover faster than compaction) it first
   waits for compaction (``CompactionMixin.disk_limit``).  With ``compression`` on,
   the I/O thread places the extent instead, once it has encoded the block and
   knows its stored size (:mod:`~kvstore.tiers.nvme_codec`).
3. The committer thread batches finished writes: ``fdatasync`` of their segments,
   then one LMDB transaction that points the index at them.  The index never names
   bytes that are not durable, so after ``kill -9`` every indexed block reads back
   exactly (and a checksum on every read catches whatever the disk does later).
4. ``free`` turns the extent into dead space and queues a conditional index
   delete.  Compaction copies the live blocks of mostly-dead sealed segments
   forward, moves their index records in one transaction, and deletes the file once
   no reader holds it.

Thread contract: ``reserve/write/free/read_into/read_many/flush/compact`` may be
called from the hierarchy's thread; the tier's own threads touch shared state only
under ``self._lock``.  ``read_into``/``read_many`` may also run on another thread
(the daemon's promotions) concurrently with the rest on other slots.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from kvstore.config import ConfigError, TierConfig
from kvstore.tiers.base import TIERS, ChecksumMismatch, RecoveredBlock, Tier, TierIOError
from kvstore.tiers.nvme_codec import CodecMixin
from kvstore.tiers.nvme_compact import CompactionMixin
from kvstore.tiers.nvme_index import DeleteIf, NvmeIndexError, Op, Put
from kvstore.tiers.nvme_io import IOBackend, StagingPool, align_up, make_backend
from kvstore.tiers.nvme_io import probe_o_direct as _probe_o_direct
from kvstore.tiers.nvme_options import NvmeDirError, NvmeOptions, open_dir, take_dir_lock
from kvstore.tiers.nvme_read import BatchReadMixin
from kvstore.tiers.nvme_segments import Segment, SegmentSet, Slot, SlotState
from kvstore.tiers.nvme_start import StartupMixin, open_index

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry

log = logging.getLogger(__name__)

__all__ = ["NvmeDirError", "NvmeOptions", "NvmeTier", "Slot"]


# CodecMixin first: its methods override the stubs the other mixins declare.
@TIERS.register("nvme")
class NvmeTier(CodecMixin, BatchReadMixin, CompactionMixin, StartupMixin, Tier):
    """Blocks in segment files on a local disk, indexed in LMDB; survives restarts.

    Args:
        name: tier name in the config.
        capacity_bytes: bound on the live bytes (each block counts its 4 KiB-aligned size).
        path: the tier's directory (created when missing unless ``create_dir`` is off).
        options: tunables (see :class:`NvmeOptions`).

    Raises:
        NvmeDirError: the directory is missing, unwritable or used by another process.
        ConfigError: ``o_direct = true`` or ``io_backend = "kvikio"`` cannot be honoured.
    """

    kind = "nvme"
    persistent = True
    threaded_reads = True  # state is under self._lock; compaction already races reads

    def __init__(
        self, name: str, capacity_bytes: int, path: Path, options: NvmeOptions | None = None
    ) -> None:
        super().__init__(name, capacity_bytes)
        self.opts = o = options or NvmeOptions()
        o.validate(f"tier {name!r}")
        self.path, full = open_dir(Path(path), o.create_dir)  # full: start degraded
        self._lock_fd = take_dir_lock(self.path)
        self._closed = False
        try:
            seg_dir = self.path / "segments"
            seg_dir.mkdir(exist_ok=True)
            can_direct = _probe_o_direct(seg_dir)
            if o.o_direct is True and not can_direct and full is None:
                raise ConfigError(f"tier {name!r}: o_direct = true but {seg_dir} refuses O_DIRECT")
            self.o_direct = can_direct and o.o_direct is not False
            try:
                self.io: IOBackend = make_backend(o.io_backend, self.o_direct)
            except RuntimeError as exc:
                raise ConfigError(f"tier {name!r}: {exc}") from exc
            try:
                self.index, self._index_empty_why = open_index(self.path / "index", o, name)
            except NvmeIndexError as exc:
                raise NvmeDirError(str(exc)) from exc
            except OSError as exc:
                raise NvmeDirError(f"cannot open the nvme tier at {self.path}: {exc}") from exc
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._lock = threading.Lock()
        self._flushed = threading.Condition(self._lock)
        self._compacted = threading.Condition(self._lock)
        self._disk_limit = self.disk_limit()
        self.segs = SegmentSet(seg_dir, self.io, o.segment_bytes)
        self._used = 0
        self._pending = 0  # writes issued, not yet durable (or failed)
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "writes write_bytes write_requests reads read_bytes read_requests reads_from_staging read_many_calls "
                "checksum_failures io_errors fsyncs index_txns compactions compacted_bytes "
                "compaction_waits compaction_wait_ms "
                "segments_deleted recovered_blocks recovered_dropped orphan_bytes_reclaimed "
                "compressed_writes compress_fallbacks compressed_reads"
            ).split(),
            0,
        )
        try:
            self._recovered = self._load()
        except OSError as exc:
            self.segs.close()
            self.index.close()
            os.close(self._lock_fd)
            raise NvmeDirError(f"cannot load the nvme tier at {self.path}: {exc}") from exc
        self._check_space(full)
        self.staging = StagingPool(o.staging_bytes)
        self._wq: collections.deque[Slot] = collections.deque()
        self._wq_cv = threading.Condition()
        self._stop_writers = False
        self._writers = [
            threading.Thread(target=self._writer_loop, name=f"{name}-w{i}", daemon=True)
            for i in range(o.io_threads)
        ]
        for th in self._writers:
            th.start()
        self._rpool = ThreadPoolExecutor(o.read_threads, thread_name_prefix=f"{name}-r")
        self._commit_q: queue.SimpleQueue[Slot | DeleteIf | threading.Event | None] = (
            queue.SimpleQueue()
        )
        self._db_lock = threading.Lock()  # one index writer at a time, in queue order
        self._compact_lock = threading.Lock()
        self._committer = threading.Thread(
            target=self._commit_loop, name=f"{name}-commit", daemon=True
        )
        self._committer.start()
        self._compact_wake = threading.Event()
        self._compactor: threading.Thread | None = None
        if o.background_compaction:
            self._compactor = threading.Thread(
                target=self._compact_loop, name=f"{name}-compact", daemon=True
            )
            self._compactor.start()
        log.info(
            "nvme tier %r at %s: %d blocks recovered, backend %s, O_DIRECT %s",
            name,
            self.path,
            len(self._recovered),
            self.io.name,
            "on" if self.o_direct else "off",
        )

    @classmethod
    def from_config(cls, cfg: TierConfig, data_dir: Path) -> NvmeTier:
        """Options: ``path`` (default ``<data_dir>/nvme``) and the fields of :class:`NvmeOptions`.

        Raises:
            ConfigError: an unknown option or bad value (naming it); ``NvmeDirError``
                (a ``ConfigError``) when the directory cannot be used.
        """
        where = f"tier {cfg.name!r}"
        opts = NvmeOptions.from_dict(dict(cfg.options), where)
        raw_path = cfg.options.get("path", "")
        if not isinstance(raw_path, str):
            raise ConfigError(f"{where}.options.path: expected a string, got {raw_path!r}")
        path = Path(raw_path).expanduser() if raw_path else Path(data_dir) / "nvme"
        return cls(cfg.name, cfg.capacity, path, opts)

    # ------------------------------------------------------------------ start-up
    def recover(self) -> Iterable[RecoveredBlock]:
        """Every block the index held at start (call once, before new writes)."""
        out = [
            RecoveredBlock(s.key, s.ns, s.parent, s.depth, s.nbytes, s.checksum, s)
            for s in self._recovered
            if s.state == SlotState.DURABLE
        ]
        self._recovered = []
        return out

    # ------------------------------------------------------------------ accounting
    @property
    def used_bytes(self) -> int:
        return self._used

    def reserve(self, nbytes: int, entry: BlockEntry) -> Slot | None:
        length = align_up(nbytes)
        if length > self.capacity_bytes:
            raise ValueError(f"block of {nbytes} B exceeds tier {self.name!r} capacity")
        if self.degraded or self._closed:
            return None
        with self._lock:
            if self._used + length > self.capacity_bytes:
                return None
            self._used += length
        return Slot(entry.key, length, nbytes)

    def free(self, handle: Slot) -> None:
        s = handle
        with self._lock:
            st = s.state
            if st == SlotState.FREED:
                raise ValueError(f"nvme tier {self.name!r}: double free of {s.key.hex()[:16]}")
            s.state = SlotState.FREED
            self._used -= align_up(s.nbytes)  # reserved raw size; s.length may be smaller
            seg = s.seg
            if seg is not None:
                seg.kill(s)
                if st == SlotState.DURABLE:
                    self._commit_q.put(DeleteIf(s.key, seg.id, s.off))
                if seg.sealed and seg.dead_ratio() >= self.opts.compact_min_dead_ratio:
                    self._compact_wake.set()

    # ------------------------------------------------------------------ writes
    def write(self, handle: Slot, entry: BlockEntry, src: memoryview | None) -> None:
        s = handle
        if src is None:
            raise ValueError(f"nvme tier {self.name!r} stores bytes; write() needs src")
        if s.state != SlotState.RESERVED:
            raise ValueError(f"nvme tier {self.name!r}: write to a slot in state {s.state.name}")
        src = memoryview(src).cast("B")
        if len(src) != s.nbytes:
            raise ValueError(f"write of {len(src)} B into a slot of {s.nbytes} B")
        if self.segs.disk_bytes > self._disk_limit:  # turnover outruns compaction
            self._wait_for_compaction()
        buf = self.staging.acquire(s.length)  # waits when all staging is in flight
        mv = memoryview(buf)
        mv[: s.nbytes] = src
        mv.release()
        s.ns, s.depth, s.checksum = entry.ns, entry.depth, entry.checksum
        s.parent = entry.parent.key if entry.parent is not None else None
        if self.opts.compression != "off":  # placed by a writer thread, once encoded
            with self._lock:
                s.staging, s.state, s.pending = buf, SlotState.WRITING, True
                self._pending += 1
            with self._wq_cv:
                self._wq.append(s)
                self._wq_cv.notify()
            return
        try:
            with self._lock:
                seg, off = self.segs.place(s.length)
                s.seg, s.off, s.staging = seg, off, buf
                s.state = SlotState.WRITING
                seg.add(s)
                seg.pending += 1
                s.pending = True
                self._pending += 1
        except OSError as exc:
            self.staging.release(buf)
            self._degrade(f"cannot create a segment in {self.segs.dir}: {exc}")
            raise TierIOError(f"nvme tier {self.name!r}: {exc}") from exc
        with self._wq_cv:
            self._wq.append(s)
            self._wq_cv.notify()

    def _writer_loop(self) -> None:
        """Take the longest contiguous run of queued extents and write it in one request.

        Extents are placed back to back in ``write`` order, so under load a run
        covers many blocks: few large requests run much faster than many 2 MiB ones.
        """
        while True:
            with self._wq_cv:
                while not self._wq and not self._stop_writers:
                    self._wq_cv.wait()
                if not self._wq:
                    return
                run = [self._wq.popleft()]
                size = run[0].length
                encode = self.opts.compression != "off"  # extents not placed yet
                while self._wq and size < self.opts.max_write_bytes:
                    nxt, last = self._wq[0], run[-1]
                    if not encode and (
                        nxt.seg is not last.seg or nxt.off != last.off + last.length
                    ):
                        break
                    run.append(self._wq.popleft())
                    size += nxt.length
            try:
                self._write_encoded(run) if encode else self._write_run(run)
            except Exception as exc:  # noqa: BLE001 - a bug here must not hang flush()
                log.exception("nvme tier %r: write of %d blocks crashed", self.name, len(run))
                for s in run:
                    with self._lock:
                        buf, s.staging = s.staging, None
                    if buf is not None:
                        self.staging.release(buf)
                self._fail_slots([s for s in run if s.pending], f"write crashed: {exc!r}")

    def _write_run(self, run: list[Slot], parts: list[memoryview | None] | None = None) -> None:
        """Writes a run of placed extents in one request: the staging buffers, or where
        ``parts`` has a view (an encoded extent, checksum already taken), that view."""
        bufs = [s.staging for s in run]
        views = [memoryview(b) for b in bufs if b is not None]
        assert len(views) == len(run) and run[0].seg is not None
        err = ""  # a message, not the exception: its traceback would pin the buffers
        try:
            for s, mv in zip(run, views, strict=True):
                if not s.checksum:
                    s.checksum = xxhash.xxh3_64_intdigest(mv[: s.nbytes])
            iov = [
                p if p is not None else mv[: s.length]
                for s, mv, p in zip(run, views, parts or [None] * len(run), strict=True)
            ]
            self.io.pwritev(run[0].seg.f, iov, run[0].off)
        except OSError as exc:
            err = str(exc)
        finally:
            for mv in views:
                mv.release()
        with self._lock:
            for s in run:
                s.staging = None
                if not err:
                    self.counters["writes"] += 1
                    self.counters["write_bytes"] += s.nbytes
                    if s.state == SlotState.WRITING:
                        s.state = SlotState.WRITTEN
            self.counters["write_requests"] += 1
        for b in bufs:
            assert b is not None
            self.staging.release(b)
        if err:
            self._fail_slots(run, f"write to {run[0].seg.path} failed: {err}")
            return
        for s in run:
            self._commit_q.put(s)

    def _fail_slots(self, slots: Sequence[Slot], reason: str) -> None:
        """Writes that will never be durable: unreadable, counted, the tier degraded."""
        with self._lock:
            for s in slots:
                seg = s.seg
                if s.pending:
                    s.pending = False
                    self._pending -= 1
                    if seg is not None:
                        seg.pending -= 1
                if s.state != SlotState.FREED:
                    s.state = SlotState.FAILED
                    s.why = reason
                    if seg is not None:
                        seg.kill(s)
                        s.seg = None
                self.counters["io_errors"] += 1
            self._flushed.notify_all()
        self._degrade(reason)

    def _degrade(self, reason: str) -> None:
        with self._lock:
            first = not self.degraded
            if first:
                self.degraded = reason
        if first:
            log.warning("nvme tier %r degraded (no new blocks): %s", self.name, reason)

    # ------------------------------------------------------------------ committer
    def _commit_loop(self) -> None:
        q = self._commit_q
        linger = self.opts.commit_interval_ms / 1000
        while True:
            items = [q.get()]
            # Group commit: every fdatasync and LMDB commit flushes the device, so
            # gather what arrives within the interval into one, unless someone waits.
            deadline = time.monotonic() + linger
            while True:
                if any(x is None or isinstance(x, threading.Event) for x in items[-1:]):
                    left = 0.0
                else:
                    left = deadline - time.monotonic()
                try:
                    items.append(q.get(timeout=left) if left > 0 else q.get_nowait())
                except queue.Empty:
                    break
            stop = None in items
            batch = [x for x in items if x is not None]
            try:
                self._commit_batch(batch)
            except Exception as exc:  # noqa: BLE001 - a dead committer would hang every flush
                log.exception("nvme tier %r: commit failed", self.name)
                slots = [x for x in batch if isinstance(x, Slot) and x.pending]
                self._fail_slots(slots, f"commit failed: {exc!r}")
                for x in batch:
                    if isinstance(x, threading.Event):
                        x.set()
            if stop:
                return

    def _commit_batch(self, items: list[Slot | DeleteIf | threading.Event]) -> None:
        slots = [x for x in items if isinstance(x, Slot)]
        failed: list[Slot] = []
        for seg in {s.seg for s in slots if s.seg is not None}:
            try:
                self.segs.make_durable(seg)
                self.counters["fsyncs"] += 1
            except OSError as exc:
                bad = [s for s in slots if s.seg is seg]
                failed += bad
                self._fail_slots(bad, f"fdatasync of {seg.path} failed: {exc}")
        ops: list[Op] = []
        with self._db_lock:
            with self._lock:
                for x in items:
                    if isinstance(x, DeleteIf):
                        ops.append(x)
                    elif isinstance(x, Slot) and x not in failed:
                        if x.state == SlotState.WRITTEN:
                            x.state = SlotState.DURABLE
                            ops.append(Put(x.key, x.record()))
            if ops:
                try:
                    self.index.apply(ops)
                    self.counters["index_txns"] += 1
                except Exception as exc:  # noqa: BLE001 - any lmdb.Error: degrade, keep serving
                    self._degrade(f"index write failed: {exc}")
        with self._lock:
            for x in items:
                if isinstance(x, Slot) and x not in failed and x.pending:
                    x.pending = False
                    if x.seg is not None:
                        x.seg.pending -= 1
                    self._pending -= 1
            self._flushed.notify_all()
        for x in items:
            if isinstance(x, threading.Event):
                x.set()

    def _barrier(self) -> None:
        """Wait until everything queued to the committer so far is applied."""
        ev = threading.Event()
        self._commit_q.put(ev)
        ev.wait()

    def flush(self) -> None:
        """Block until every write issued so far is durable and indexed."""
        if self._closed:
            return
        while True:
            self._barrier()  # ends any lingering group commit now
            with self._lock:
                if not self._pending:
                    return
                self._flushed.wait(timeout=self.opts.commit_interval_ms / 1000)

    # ------------------------------------------------------------------ reads
    def read_into(self, handle: Slot, entry: BlockEntry, dst: memoryview | None) -> None:
        s = handle
        if dst is None or len(dst) != s.nbytes:
            raise ValueError(
                f"read of a {s.nbytes} B block into {None if dst is None else len(dst)} B"
            )
        with self._lock:
            st = s.state
            if st == SlotState.WRITING and s.staging is not None:
                # Still in flight: the staging buffer holds the bytes.
                dst[:] = memoryview(s.staging)[: s.nbytes]
                self.counters["reads_from_staging"] += 1
                return
            if st == SlotState.CORRUPT:
                self.counters["checksum_failures"] += 1
                raise ChecksumMismatch(
                    f"nvme tier {self.name!r}: block {s.key.hex()[:16]}: {s.why}"
                )
            if st == SlotState.FAILED:
                raise TierIOError(f"nvme tier {self.name!r}: block lost: {s.why}")
            if st not in (SlotState.WRITTEN, SlotState.DURABLE) or s.seg is None:
                raise ValueError(f"nvme tier {self.name!r}: read of a slot in state {st.name}")
            seg, off, codec = s.seg, s.off, s.codec
            seg.readers += 1
        # A compressed extent is read into this thread's bounce buffer, then decoded.
        ext = memoryview(self.io.bounce(s.length))[: s.length] if codec else None
        try:
            try:
                if ext is not None:
                    self.io.pread(seg.f, ext, off)
                else:
                    self.io.read_extent(seg.f, off, s.length, dst)
                with self._lock:
                    self.counters["read_requests"] += 1
            except OSError as exc:
                with self._lock:
                    self.counters["io_errors"] += 1
                msg = f"nvme tier {self.name!r}: read of {seg.path}@{off}: {exc}"
                raise TierIOError(msg) from exc
            finally:
                with self._lock:
                    seg.readers -= 1
                    self.segs.maybe_close(seg)
            if ext is None:
                bad = self._verify(s, entry, dst, seg, off)
            else:
                bad = self._decode_verify(s, entry, ext, dst, seg, off)
        finally:
            if ext is not None:
                ext.release()
        if bad is not None:
            try:
                raise bad
            finally:  # no frame -> exception -> traceback -> frame cycle (holds ``dst``)
                del bad

    def _verify(
        self, s: Slot, entry: BlockEntry, dst: memoryview, seg: Segment, off: int
    ) -> ChecksumMismatch | None:
        """Checks the bytes read into ``dst``; counts the read (and the failure)."""
        csum = xxhash.xxh3_64_intdigest(dst)
        ok = csum == s.checksum and (not entry.checksum or entry.checksum == s.checksum)
        with self._lock:
            self.counters["reads"] += 1
            self.counters["read_bytes"] += s.nbytes
            if not ok:
                self.counters["checksum_failures"] += 1
        if ok:
            return None
        log.warning(
            "nvme tier %r: checksum mismatch for block %s in %s@%d",
            self.name,
            s.key.hex()[:16],
            seg.path,
            off,
        )
        return ChecksumMismatch(
            f"nvme tier {self.name!r}: block {s.key.hex()[:16]} failed its checksum"
        )

    # ------------------------------------------------------------------ lifecycle
    def stats(self) -> dict[str, Any]:
        with self._lock:
            st = super().stats()
            st.update(
                path=str(self.path),
                io_backend=self.io.name,
                o_direct=self.o_direct,
                pending_writes=self._pending,
                staging_bytes=self.opts.staging_bytes,
                staging_in_use_bytes=self.staging.in_use_bytes,
                staging_waits=self.staging.waits,
                **self.codec_stats(),
                **self.segs.stats(),
                **self.counters,
            )
        return st

    def close(self) -> None:
        """Flush, stop the threads and release the directory.  Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._compact_wake.set()
        if self._compactor is not None:
            self._compactor.join()
        with self._wq_cv:
            self._stop_writers = True
            self._wq_cv.notify_all()
        for th in self._writers:
            th.join()
        self._rpool.shutdown(wait=True)
        self._commit_q.put(None)
        self._committer.join()
        with self._lock:
            self.segs.close()
        self.index.close()
        self.staging.close()
        os.close(self._lock_fd)
