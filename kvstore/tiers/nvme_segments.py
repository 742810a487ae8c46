"""Segment files and block slots of the NVMe tier.

A :class:`Slot` is the tier's handle for one block: where its bytes are (which
compaction may change), what recovery needs to know about it, and how far its
write has got.  A :class:`Segment` is one append-only file; a :class:`SegmentSet`
places new extents at the end of the active segment, seals it when full, and
deletes retired ones once no reader holds them.

Nothing here locks: the tier calls every mutating method under its own lock.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
from enum import IntEnum
from pathlib import Path
from typing import Any

from kvstore.tiers.nvme_index import Record
from kvstore.tiers.nvme_io import IOBackend

log = logging.getLogger(__name__)

_SEG_RE = re.compile(r"^seg-(\d{8})\.dat$")


class SlotState(IntEnum):
    RESERVED = 0  # room counted, no bytes yet
    WRITING = 1  # bytes in a staging buffer, pwrite queued or running
    WRITTEN = 2  # bytes in the segment file, not yet fdatasync'ed and indexed
    DURABLE = 3  # synced and in the index: survives a crash
    FAILED = 4  # the write (or a later check) failed: unreadable
    FREED = 5  # given back
    CORRUPT = 6  # failed its checksum when compaction read it: a miss


class Slot:
    """The NVMe tier's handle of one block (identity-hashed)."""

    __slots__ = (
        "key",
        "length",
        "nbytes",
        "state",
        "seg",
        "off",
        "checksum",
        "codec",
        "ns",
        "parent",
        "depth",
        "staging",
        "pending",
        "why",
    )

    def __init__(self, key: bytes, length: int, nbytes: int) -> None:
        self.key = key
        self.length = length  # the extent on disk: align_up(nbytes), smaller when compressed
        self.nbytes = nbytes
        self.state = SlotState.RESERVED
        self.seg: Segment | None = None
        self.off = 0
        self.checksum = 0  # xxh3-64 of the block's logical bytes, whatever the codec
        self.codec = 0  # how the extent is stored (kvstore.tiers.nvme_codec)
        self.ns = b""
        self.parent: bytes | None = None
        self.depth = 0
        self.staging: mmap.mmap | None = None
        self.pending = False  # counted in the tier's writes-not-yet-durable
        self.why = ""

    def record(self) -> Record:
        assert self.seg is not None
        return Record(
            self.seg.id,
            self.off,
            self.length,
            self.nbytes,
            self.checksum,
            self.codec,
            self.depth,
            self.ns,
            self.parent,
        )

    def __repr__(self) -> str:
        where = f"{self.seg.id}@{self.off}" if self.seg is not None else "-"
        return f"Slot({self.key.hex()[:12]}, {self.state.name}, {where})"


class Segment:
    """One append-only segment file."""

    __slots__ = (
        "id",
        "path",
        "f",
        "size",
        "file_bytes",
        "live",
        "dead",
        "pending",
        "readers",
        "sealed",
        "retired",
        "dir_synced",
        "slots",
        "zblocks",
        "zbytes",
        "zdisk",
    )

    def __init__(self, seg_id: int, path: Path, f: Any, file_bytes: int) -> None:
        self.id = seg_id
        self.path = path
        self.f = f
        self.size = 0  # bytes placed (the append offset)
        self.file_bytes = file_bytes  # size found on disk at start
        self.live = 0
        self.dead = 0
        self.pending = 0  # writes placed here and not yet durable
        self.readers = 0
        self.sealed = False
        self.retired = False
        self.dir_synced = True
        self.slots: set[Slot] = set()
        self.zblocks = self.zbytes = self.zdisk = 0  # live compressed blocks (codec != 0)

    def add(self, s: Slot) -> None:
        self.slots.add(s)
        self.live += s.length
        if s.codec:
            self.zblocks += 1
            self.zbytes += s.nbytes
            self.zdisk += s.length

    def kill(self, s: Slot) -> None:
        """``s``'s extent here became garbage (freed, failed or moved away)."""
        self.slots.discard(s)
        self.live -= s.length
        self.dead += s.length
        if s.codec:
            self.zblocks -= 1
            self.zbytes -= s.nbytes
            self.zdisk -= s.length

    def dead_ratio(self) -> float:
        return self.dead / self.size if self.size else 0.0


class SegmentSet:
    """The segment files of one tier directory."""

    def __init__(self, directory: Path, io: IOBackend, segment_bytes: int) -> None:
        self.dir = directory
        self.io = io
        self.segment_bytes = segment_bytes
        self.segs: dict[int, Segment] = {}
        self.active: Segment | None = None
        self.next_id = 1
        self.disk_bytes = 0  # sum of the segments' sizes (checked on every write)

    def _path(self, seg_id: int) -> Path:
        return self.dir / f"seg-{seg_id:08d}.dat"

    def scan_files(self) -> dict[int, Segment]:
        """Open every segment file found at start (sealed: new writes go to a new file)."""
        found: dict[int, Segment] = {}
        for p in sorted(self.dir.iterdir()):
            m = _SEG_RE.match(p.name)
            if not m:
                continue
            seg_id = int(m.group(1))
            f = self.io.open(p, create=False)
            seg = Segment(seg_id, p, f, p.stat().st_size)
            seg.sealed = True
            found[seg_id] = seg
            self.next_id = max(self.next_id, seg_id + 1)
        return found

    def adopt(self, found: dict[int, Segment]) -> int:
        """Keep segments holding indexed blocks; delete or cut off what nothing names.

        Extents written before a crash but never indexed are orphans: a file with no
        indexed block is deleted, a tail past the last indexed extent is truncated,
        and holes in the middle count as dead space for compaction.

        Returns:
            Bytes of disk given back.
        """
        reclaimed = 0
        for seg in found.values():
            end = max((s.off + s.length for s in seg.slots), default=0)
            if end == 0:
                reclaimed += seg.file_bytes
                self.io.close_file(seg.f)
                seg.path.unlink()
                continue
            if seg.file_bytes > end:
                os.truncate(seg.path, end)
                reclaimed += seg.file_bytes - end
            seg.size = end
            seg.dead = end - seg.live
            self.disk_bytes += end
            self.segs[seg.id] = seg
        if reclaimed:
            log.info("nvme: reclaimed %d orphaned bytes in %s", reclaimed, self.dir)
        return reclaimed

    def place(self, length: int) -> tuple[Segment, int]:
        """Room for an extent at the end of the active segment (a new one when full).

        Raises:
            OSError: a new segment file could not be created.
        """
        seg = self.active
        if seg is None or (seg.size and seg.size + length > self.segment_bytes):
            if seg is not None:
                seg.sealed = True
            seg_id = self.next_id
            path = self._path(seg_id)
            f = self.io.open(path, create=True)
            self.next_id += 1
            seg = Segment(seg_id, path, f, 0)
            seg.dir_synced = False
            self.segs[seg_id] = seg
            self.active = seg
        off = seg.size
        seg.size += length
        self.disk_bytes += length
        return seg, off

    def make_durable(self, seg: Segment) -> None:
        """``fdatasync`` the segment (and, once, its directory entry)."""
        self.io.sync(seg.f)
        if not seg.dir_synced:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            seg.dir_synced = True

    def candidates(self, min_dead_ratio: float) -> list[Segment]:
        """Sealed, settled segments worth compacting, most dead space first."""
        out = [
            s
            for s in self.segs.values()
            if s.sealed
            and not s.pending
            and s.size
            and (s.live == 0 or s.dead_ratio() >= min_dead_ratio)
        ]
        out.sort(key=lambda s: -s.dead)
        return out

    def retire(self, seg: Segment) -> int:
        """Delete a segment whose blocks all moved or died; returns its size."""
        del self.segs[seg.id]
        self.disk_bytes -= seg.size
        seg.retired = True
        seg.path.unlink(missing_ok=True)
        self.maybe_close(seg)
        return seg.size

    def maybe_close(self, seg: Segment) -> None:
        if seg.retired and not seg.readers and seg.f is not None:
            self.io.close_file(seg.f)
            seg.f = None

    def stats(self) -> dict[str, int]:
        segs = self.segs.values()
        return {
            "segments": len(self.segs),
            "disk_bytes": sum(s.size for s in segs),
            "live_bytes": sum(s.live for s in segs),
            "dead_bytes": sum(s.dead for s in segs),
            "compressed_blocks": sum(s.zblocks for s in segs),
            "compressed_bytes": sum(s.zbytes for s in segs),
            "compressed_disk_bytes": sum(s.zdisk for s in segs),
        }

    def close(self) -> None:
        for s in self.segs.values():
            if s.f is not None:
                self.io.close_file(s.f)
                s.f = None
        self.segs.clear()
        self.disk_bytes = 0
        self.active = None
