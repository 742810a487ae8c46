"""Start-up of the NVMe tier: open the index safely, rebuild the slots, check the disk.

* :func:`open_index` checks ``index/data.mdb`` before mapping it
  (:mod:`~kvstore.tiers.nvme_index_check`).  A damaged index is renamed
  ``data.mdb.damaged-<time>`` and the tier starts empty, with a warning: the
  checksums live in the index, so its segment files cannot be trusted without it
  and are reclaimed.  No block is ever served from them.
* :meth:`StartupMixin._load` rebuilds the slots from the index and reclaims what
  no record names (a warning when that is every segment file).
* :meth:`StartupMixin._check_space`: a disk that is full at start degrades the
  tier (the blocks on disk are served, no new ones stored) instead of failing
  start-up; a capacity larger than the filesystem can hold is warned about.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import lmdb

from kvstore.tiers.nvme_codec import CODEC_BYTEPLANE_ZSTD, CODEC_RAW
from kvstore.tiers.nvme_index import Index, Record
from kvstore.tiers.nvme_index_check import IndexDamaged, check_index, set_aside
from kvstore.tiers.nvme_io import ALIGN, align_up
from kvstore.tiers.nvme_options import NvmeOptions, probe_write
from kvstore.tiers.nvme_segments import SegmentSet, Slot, SlotState

log = logging.getLogger("kvstore.tiers.nvme")


def _length_ok(rec: Record) -> bool:
    """A raw extent is the block's aligned size; a compressed one (codec 1) is a
    4 KiB multiple at least a page shorter.  An unknown codec (a newer build's) is
    dropped like a record naming no data: its bytes cannot be checked here."""
    if rec.codec == CODEC_RAW:
        return rec.length == align_up(rec.nbytes)
    if rec.codec == CODEC_BYTEPLANE_ZSTD:
        raw = align_up(rec.nbytes)
        return rec.nbytes % 2 == 0 and 0 < rec.length <= raw - ALIGN and not rec.length % ALIGN
    return False


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def open_index(index_dir: Path, opts: NvmeOptions, name: str) -> tuple[Index, str]:
    """The tier's index, checked first; and why it is empty when it is new or was reset.

    Raises:
        NvmeIndexError: it cannot be opened, checked or moved aside (the message says
            what to do).
    """
    index_dir.mkdir(exist_ok=True)
    why_empty = ""
    try:
        chk = check_index(index_dir, walk=opts.index_check)
        if not chk.file_bytes:
            why_empty = "is new or empty (no data.mdb, or a 0-byte one)"
        elif chk.walked:
            log.debug(
                "nvme tier %r: index %s checked: %d records, %s, in %.0f ms",
                name,
                index_dir,
                chk.entries,
                human(chk.file_bytes),
                chk.walk_s * 1000,
            )
    except IndexDamaged as exc:
        aside = set_aside(exc.data)
        log.warning(
            "nvme tier %r: %s. Moved it to %s and starting the tier empty: the blocks it "
            "indexed are lost and their segment files are reclaimed (no block is served "
            "without its checksum). Delete %s once it is no longer needed.",
            name,
            exc,
            aside,
            aside,
        )
        why_empty = f"was damaged and moved to {aside}"
    return Index(index_dir, opts.index_map_bytes), why_empty


class StartupMixin:
    """The start-up half of :class:`~kvstore.tiers.nvme.NvmeTier` (state lives there)."""

    name: str
    path: Path
    capacity_bytes: int
    degraded: str | None
    opts: NvmeOptions
    index: Index
    segs: SegmentSet
    counters: dict[str, int]
    _used: int
    _lock: threading.Lock
    _index_empty_why: str

    def _load(self) -> list[Slot]:
        """Rebuild slots from the index; drop records naming nothing; reclaim orphan space."""
        segs = self.segs
        found = segs.scan_files()
        slots: list[Slot] = []
        bad: list[bytes] = []
        for key, raw in self.index.scan():
            try:
                rec = Record.decode(raw)
            except ValueError:
                bad.append(key)
                continue
            seg = found.get(rec.seg)
            if (
                seg is None
                or rec.off % ALIGN
                or not _length_ok(rec)
                or rec.off + rec.length > seg.file_bytes
            ):
                bad.append(key)
                continue
            s = Slot(key, rec.length, rec.nbytes)
            s.state = SlotState.DURABLE
            s.seg, s.off, s.checksum, s.codec = seg, rec.off, rec.checksum, rec.codec
            s.ns, s.parent, s.depth = rec.ns, rec.parent, rec.depth
            seg.add(s)
            self._used += align_up(rec.nbytes)  # capacity counts the raw size
            slots.append(s)
        if bad:
            log.warning(
                "nvme tier %r: dropping %d index records naming no data", self.name, len(bad)
            )
            try:
                self.index.delete_keys(bad)
            except lmdb.Error as exc:  # a full disk: they are skipped again next time
                log.warning("nvme tier %r: cannot drop them now: %s", self.name, exc)
        on_disk = sum(s.file_bytes for s in found.values())
        if not slots and on_disk:
            why = self._index_empty_why or (
                "names no block" if not bad else "names no block that exists"
            )
            log.warning(
                "nvme tier %r: the index %s %s while %d segment files in %s hold %s: "
                "deleting them (their blocks cannot be served without index records)",
                self.name,
                self.index.path / "data.mdb",
                why,
                len(found),
                segs.dir,
                human(on_disk),
            )
        self.counters["recovered_blocks"] = len(slots)
        self.counters["recovered_dropped"] = len(bad)
        self.counters["orphan_bytes_reclaimed"] = segs.adopt(found)
        return slots

    def _check_space(self, full: OSError | None) -> None:
        """Degrade when the disk is still full after the orphans were reclaimed; warn
        when the capacity exceeds what the filesystem can hold."""
        if full is not None:
            full = probe_write(self.path)  # reclaiming orphans may have made room
        try:
            st = os.statvfs(self.path)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        with self._lock:
            disk = self.segs.stats()["disk_bytes"]
        try:
            disk += (self.index.path / "data.mdb").stat().st_size
        except OSError:
            pass
        if full is not None:
            self.degraded = f"disk full at start ({self.path}: {human(free)} free): {full}"
            log.warning(
                "nvme tier %r starts degraded: %s is full (%s free: %s). Serving the %d "
                "blocks on disk, storing no new ones; free space there and restart.",
                self.name,
                self.path,
                human(free),
                full,
                self.counters["recovered_blocks"],
            )
        elif self.capacity_bytes > free + disk:
            log.warning(
                "nvme tier %r: capacity %s exceeds what %s can hold: %s free + %s used by "
                "the tier = %s. The tier degrades (stores no new blocks) when the disk fills.",
                self.name,
                human(self.capacity_bytes),
                self.path,
                human(free),
                human(disk),
                human(free + disk),
            )
