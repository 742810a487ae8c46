"""Optional lossless compression of NVMe extents: codec 1, ``byteplane-zstd``.

The ``codec`` byte of an index record says how a block's extent is stored:

* ``0`` (raw): the block's bytes, zero-padded to a 4 KiB multiple.  Every block
  written with ``compression = "off"`` (the default), and every block the codec
  declined.
* ``1`` (``byteplane-zstd``): the block, read as 16-bit values, split into byte
  planes (:mod:`kernels.byteplane`); the extent holds the low-byte plane as is
  (``nbytes / 2`` bytes), then one zstd frame of the high-byte plane (its header
  carries the content size, ``nbytes / 2``), zero-padded to a 4 KiB multiple.  For
  bf16 the high byte holds the sign and 7 of the 8 exponent bits, which compress well;
  the low byte is mostly mantissa noise, so compressing it costs time for nothing
  (ZipNN's observation).

Rules that keep it safe and cheap:

* Per block, on the tier's writer threads: a block is stored compressed only when
  that saves at least one 4 KiB page of its aligned extent; otherwise raw.  Odd sizes
  (no 16-bit values) and single-page blocks are not even tried; fp8/int8 or random
  data is tried and stays raw.  The record's ``length`` is the stored extent (a 4 KiB
  multiple, smaller than the raw one), ``nbytes`` stays the block's size.
* The record's checksum is always xxh3-64 of the block's *logical* bytes, the value
  clients send at Commit.  A compressed block is decoded into its destination and
  then checked like any other, so a damaged extent (a zstd error, a wrong size, a
  checksum mismatch) is a miss counted in ``checksum_failures``: never wrong bytes,
  never an exception out of an I/O thread.
* Reads understand both codecs whatever the option says, so turning compression off
  keeps compressed blocks readable; compaction copies compressed extents as they are
  (after decoding them once to check them).
"""

from __future__ import annotations

import logging
import mmap
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash
import zstandard

from kernels import byteplane
from kvstore.tiers.base import ChecksumMismatch
from kvstore.tiers.nvme_io import ALIGN, IOBackend, align_up, alloc_aligned
from kvstore.tiers.nvme_options import NvmeOptions
from kvstore.tiers.nvme_segments import Segment, SegmentSet, Slot, SlotState

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kvstore.entry import BlockEntry

log = logging.getLogger("kvstore.tiers.nvme")

CODEC_RAW = 0
CODEC_BYTEPLANE_ZSTD = 1
CODECS = {"off": CODEC_RAW, "byteplane-zstd": CODEC_BYTEPLANE_ZSTD}
"""Option value -> the codec new blocks are tried with."""
KNOWN_CODECS = frozenset(CODECS.values())
_ZEROS = bytes(ALIGN)


class CodecError(ValueError):
    """A compressed extent that cannot be decoded (damaged on disk)."""


def encode_into(src: memoryview, nbytes: int, out: memoryview, cctx: Any) -> int:
    """Encodes ``src[:nbytes]`` as codec 1 into ``out`` (at least ``align_up(nbytes)``).

    Returns:
        The stored extent's length (a 4 KiB multiple, at least one page shorter than
        ``align_up(nbytes)``), or 0 when the block should stay raw (odd size, a single
        page, or too little saved).  ``out`` is scratch in that case.
    """
    raw_len = align_up(nbytes)
    if nbytes % 2 or raw_len < 2 * ALIGN:
        return 0
    half = nbytes // 2
    byteplane.split(src[:nbytes], out=out[:nbytes])
    z = cctx.compress(out[half:nbytes])
    used = half + len(z)
    stored = align_up(used)
    if stored > raw_len - ALIGN:
        return 0
    out[half:used] = z
    out[used:stored] = _ZEROS[: stored - used]
    return stored


def decode_into(
    ext: memoryview, nbytes: int, dst: memoryview, planes: np.ndarray, dctx: Any
) -> None:
    """Decodes a codec-1 extent into ``dst`` (``nbytes``); ``planes`` is scratch of ``nbytes``.

    Memory stays bounded on damaged input: the frame must declare exactly
    ``nbytes / 2`` bytes, and they are decompressed into ``planes``, never into a
    buffer sized by the frame.

    Raises:
        CodecError: the extent is not a valid codec-1 encoding of ``nbytes`` bytes.
        zstandard.ZstdError: the zstd frame is damaged.
    """
    half = nbytes // 2
    if nbytes % 2 or len(ext) <= half or len(dst) != nbytes:
        raise CodecError(f"a codec-1 extent of {len(ext)} B cannot hold a {nbytes} B block")
    frame = ext[half:]
    size = zstandard.get_frame_parameters(frame).content_size
    if size != half:
        raise CodecError(f"zstd frame declares {size} B, the high plane has {half}")
    pv = planes.data[:nbytes]
    try:
        pv[:half] = ext[:half]
        got = 0
        reader = dctx.stream_reader(frame)
        while got < half:
            k = reader.readinto(pv[half + got :])
            if not k:
                break
            got += k
        if got != half:
            raise CodecError(f"zstd frame decoded to {got} B, expected {half}")
        byteplane.merge(pv, out=dst)
    finally:
        pv.release()


class _Scratch(threading.local):
    """Per-thread zstd contexts (not thread-safe) and reusable buffers (bounded: the
    encode buffer by one write request, the planes by the largest block read)."""

    cctx: Any = None
    level = 0
    dctx: Any = None
    enc: mmap.mmap | None = None
    planes: np.ndarray | None = None

    def compressor(self, level: int) -> Any:
        if self.cctx is None or self.level != level:
            self.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
            self.level = level
        return self.cctx

    def decompressor(self) -> Any:
        if self.dctx is None:
            self.dctx = zstandard.ZstdDecompressor()
        return self.dctx

    def enc_buffer(self, nbytes: int) -> mmap.mmap:
        if self.enc is None or len(self.enc) < nbytes:
            if self.enc is not None:
                self.enc.close()
            self.enc = alloc_aligned(nbytes)
        return self.enc

    def planes_buffer(self, nbytes: int) -> np.ndarray:
        if self.planes is None or self.planes.size < nbytes:
            self.planes = np.empty(nbytes, np.uint8)
        return self.planes


_scratch = _Scratch()


class CodecMixin:
    """The compression half of :class:`~kvstore.tiers.nvme.NvmeTier` (state lives there)."""

    name: str
    opts: NvmeOptions
    io: IOBackend
    segs: SegmentSet
    counters: dict[str, int]
    staging: Any
    _lock: threading.Lock
    _flushed: threading.Condition
    _pending: int

    def _write_run(self, run: list[Slot], parts: list[memoryview | None] | None = None) -> None:
        raise NotImplementedError

    def _fail_slots(self, slots: Sequence[Slot], reason: str) -> None:
        raise NotImplementedError

    def _degrade(self, reason: str) -> None:
        raise NotImplementedError

    def _verify(
        self, s: Slot, entry: BlockEntry, dst: memoryview, seg: Segment, off: int
    ) -> ChecksumMismatch | None:
        raise NotImplementedError

    # ------------------------------------------------------------------ writes
    def _write_encoded(self, run: list[Slot]) -> None:
        """A writer thread's path with compression on: checksum and encode each block of
        ``run`` (unplaced, bytes in staging), then place the extents, now that their
        stored sizes are known, and write each contiguous stretch in one request.

        The encoded extents go to this thread's encode buffer (at most the run's raw
        size, so bounded by ``max_write_bytes`` plus a block); staging keeps the
        logical bytes until the write returns, so a read of a block in flight still
        copies them from there.
        """
        total = sum(s.length for s in run)
        enc = memoryview(_scratch.enc_buffer(total))
        cctx = _scratch.compressor(self.opts.compression_level)
        codec = CODECS[self.opts.compression]
        plan: list[tuple[int, int]] = []  # per block: (stored length or 0 for raw, enc offset)
        pos = tried = 0
        try:
            for s in run:
                buf = s.staging
                assert buf is not None
                src = memoryview(buf)
                try:
                    if not s.checksum:
                        s.checksum = xxhash.xxh3_64_intdigest(src[: s.nbytes])
                    stored = 0
                    if s.nbytes % 2 == 0 and s.length >= 2 * ALIGN:
                        tried += 1
                        try:
                            stored = encode_into(src, s.nbytes, enc[pos : pos + s.length], cctx)
                        except Exception:  # noqa: BLE001 - a codec bug: store the block raw
                            log.exception("nvme tier %r: compression failed; stored raw", self.name)
                finally:
                    src.release()
                plan.append((stored, pos))
                pos += stored
            self._place_and_write(run, plan, enc, codec, tried)
        finally:
            enc.release()

    def _place_and_write(
        self, run: list[Slot], plan: list[tuple[int, int]], enc: memoryview, codec: int, tried: int
    ) -> None:
        groups: list[list[int]] = []
        freed: list[Slot] = []
        try:
            with self._lock:
                for i, s in enumerate(run):
                    if s.state == SlotState.FREED:  # freed while queued: nothing to write
                        freed.append(s)
                        continue
                    stored = plan[i][0]
                    seg, off = self.segs.place(stored or s.length)
                    s.length, s.codec = (stored, codec) if stored else (s.length, CODEC_RAW)
                    s.seg, s.off = seg, off
                    seg.add(s)
                    seg.pending += 1
                    last = run[groups[-1][-1]] if groups else None
                    if last is not None and last.seg is seg and last.off + last.length == off:
                        groups[-1].append(i)
                    else:
                        groups.append([i])
                self.counters["compressed_writes"] += sum(
                    1 for g in groups for i in g if plan[i][0]
                )
                self.counters["compress_fallbacks"] += tried - sum(1 for st, _ in plan if st)
                for s in freed:
                    s.pending = False
                    self._pending -= 1
                if freed:
                    self._flushed.notify_all()
        except OSError as exc:
            reason = f"cannot create a segment in {self.segs.dir}: {exc}"
            for s in run:
                with self._lock:
                    buf, s.staging = s.staging, None
                if buf is not None:
                    self.staging.release(buf)
            self._fail_slots([s for s in run if s.pending], reason)
            return
        for s in freed:
            with self._lock:
                buf, s.staging = s.staging, None
            if buf is not None:
                self.staging.release(buf)
        for g in groups:
            parts = [enc[plan[i][1] : plan[i][1] + plan[i][0]] if plan[i][0] else None for i in g]
            self._write_run([run[i] for i in g], parts)

    # ------------------------------------------------------------------ reads
    def _decode_verify(
        self, s: Slot, entry: BlockEntry, ext: memoryview, dst: memoryview, seg: Segment, off: int
    ) -> ChecksumMismatch | None:
        """Decodes the stored extent ``ext`` into ``dst`` and checks the logical bytes.

        Anything wrong with the extent is a :class:`ChecksumMismatch` (a miss, counted),
        never an exception: this runs on the read threads.
        """
        try:
            decode_into(
                ext, s.nbytes, dst, _scratch.planes_buffer(s.nbytes), _scratch.decompressor()
            )
        except Exception as exc:  # noqa: BLE001 - zstd, size or plane errors: damaged bytes
            with self._lock:
                self.counters["reads"] += 1
                self.counters["read_bytes"] += s.nbytes
                self.counters["checksum_failures"] += 1
            log.warning(
                "nvme tier %r: block %s in %s@%d does not decode: %s",
                self.name,
                s.key.hex()[:16],
                seg.path,
                off,
                exc,
            )
            return ChecksumMismatch(
                f"nvme tier {self.name!r}: block {s.key.hex()[:16]} failed to decode"
            )
        with self._lock:
            self.counters["compressed_reads"] += 1
        return self._verify(s, entry, dst, seg, off)

    def _extent_ok(self, s: Slot, ext: memoryview) -> bool:
        """Whether a stored extent holds the block's bytes (compaction checks before copying)."""
        if s.codec == CODEC_RAW:
            return bool(xxhash.xxh3_64_intdigest(ext[: s.nbytes]) == s.checksum)
        out = bytearray(s.nbytes)
        try:
            decode_into(
                ext,
                s.nbytes,
                memoryview(out),
                _scratch.planes_buffer(s.nbytes),
                _scratch.decompressor(),
            )
        except Exception:  # noqa: BLE001 - damaged: not carried forward
            return False
        return bool(xxhash.xxh3_64_intdigest(out) == s.checksum)

    def codec_stats(self) -> dict[str, Any]:
        return {
            "compression": self.opts.compression,
            "compression_level": self.opts.compression_level,
        }
