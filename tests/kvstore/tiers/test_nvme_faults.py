"""NVMe tier faults: kill -9 mid-write, a flipped byte on disk, disk full, I/O errors."""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.hierarchy import Hierarchy, Level, Status
from kvstore.tiers.base import ChecksumMismatch, TierIOError
from kvstore.tiers.nvme import NvmeTier
from kvstore.tiers.nvme_io import align_up
from kvstore.tiers.nvme_segments import SlotState
from tests.conftest import mounted_tmpfs

from .memtier import MemTier
from .nvme_util import NS, bf16_for, data_for, entry, key_of, open_tier, put, read

KB = 1024
REPO = Path(__file__).resolve().parents[3]


# ---------------------------------------------------------------- kill -9


def _kill_rounds(path: Path, rounds: int, seed: int, zstd: bool = False) -> None:
    rng = random.Random(seed)
    must: set[bytes] = set()
    wrote = 0
    for rnd in range(rounds):
        err = path.parent / f"writer-{rnd}.err"
        with open(err, "w") as errf:
            p = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.kvstore.tiers.nvme_crash_writer",
                    str(path),
                    str(rnd),
                    *(["zstd"] if zstd else []),
                ],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=errf,
                text=True,
            )
        assert p.stdout is not None
        # One reader owns the pipe (mixing readline() and communicate() loses lines).
        lines: list[str] = []
        reader = threading.Thread(target=lines.extend, args=(p.stdout,))
        reader.start()
        deadline = time.monotonic() + 30
        while not lines and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lines and lines[0].startswith("R "), err.read_text()
        assert lines[0].split()[2] == "0", "the writer dropped index records at start"
        time.sleep(rng.uniform(0.2, 0.8))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        reader.join(timeout=30)
        p.stdout.close()
        assert p.returncode == -signal.SIGKILL, err.read_text()
        for line in lines:
            assert not line.startswith("X "), line
            if line.startswith("D "):
                ks = {bytes.fromhex(x) for x in line.split()[1:]}
                must |= ks
                wrote += len(ks)
            elif line.startswith("F "):
                must.discard(bytes.fromhex(line[2:]))
        _check_consistent(path, must, zstd)
    assert wrote > 0, "the writer never got to flush: the test proved nothing"


def _check_consistent(path: Path, must: set[bytes], zstd: bool = False) -> None:
    t = open_tier(path, background_compaction=False)
    try:
        found = {rb.key: rb for rb in t.recover()}
        missing = must - set(found)
        assert not missing, f"{len(missing)} flushed blocks lost"
        for k, rb in found.items():
            # read_into verifies the checksum; compare with the true bytes too.
            want = (bf16_for if zstd else data_for)(k, rb.nbytes)
            assert read(t, rb.handle, entry(k, rb.nbytes, rb.checksum)) == want
        st = t.stats()
        if zstd:  # the crash test covered compressed blocks
            assert st["compressed_blocks"] > 0 or not found
        assert t.index.count() == len(found)
        # Disk: the stored extents; capacity: each block's raw aligned size.
        assert st["live_bytes"] == sum(rb.handle.length for rb in found.values())
        assert st["used_bytes"] == sum(align_up(rb.nbytes) for rb in found.values())
        if not zstd:
            assert st["live_bytes"] == st["used_bytes"]
        files = list((path / "segments").glob("seg-*.dat"))
        assert len(files) == st["segments"]
        assert sum(f.stat().st_size for f in files) == st["disk_bytes"]
        t.compact(min_dead_ratio=1e-9)  # orphans and holes: all reclaimable
        st = t.stats()
        assert st["disk_bytes"] == st["live_bytes"], st
    finally:
        t.close()


def test_sigkill_while_writing_repeatedly(tmp_path: Path) -> None:
    _kill_rounds(tmp_path / "t", rounds=3, seed=1)


def test_sigkill_while_writing_compressed(tmp_path: Path) -> None:
    _kill_rounds(tmp_path / "t", rounds=2, seed=3, zstd=True)


@pytest.mark.slow
def test_sigkill_while_writing_many_rounds(tmp_path: Path) -> None:
    _kill_rounds(tmp_path / "t", rounds=15, seed=2)


# ---------------------------------------------------------------- corruption


def _flip_byte(h: Any, at: int = 100) -> None:
    fd = os.open(h.seg.path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, h.off + at)
        os.pwrite(fd, bytes([b[0] ^ 0x40]), h.off + at)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_flipped_byte_is_a_checksum_mismatch(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t")
    try:
        blocks = [put(t, key_of(i), 64 * KB) for i in range(4)]
        t.flush()
        _flip_byte(blocks[1][0])
        with pytest.raises(ChecksumMismatch):
            read(t, blocks[1][0], blocks[1][1])
        dsts = [bytearray(64 * KB) for _ in blocks]
        res = t.read_many(
            [(h, e, memoryview(d)) for (h, e, _), d in zip(blocks, dsts, strict=True)]
        )
        assert isinstance(res[1], ChecksumMismatch)
        assert res[0] is None and res[2] is None and res[3] is None
        assert bytes(dsts[2]) == blocks[2][2]
        assert t.stats()["checksum_failures"] == 2
    finally:
        t.close()


def _two_level(tmp_path: Path, dram_blocks: int, nbytes: int, **opts: Any) -> Hierarchy:
    mem = MemTier("dram", dram_blocks * nbytes)
    nv = open_tier(tmp_path / "t", **opts)
    return Hierarchy([Level.build(mem, block_hint=nbytes), Level.build(nv, block_hint=nbytes)])


def _store(h: Hierarchy, keys: list[bytes], nbytes: int, parent: bytes | None = None) -> None:
    st, ents = h.allocate(1, NS, nbytes, parent, keys)
    assert Status.NO_SPACE not in st
    new = [e for s, e in zip(st, ents, strict=True) if s == Status.NEW]
    for e in new:
        assert e is not None
        h.levels[0].tier.view(e.locs[0])[:] = data_for(e.key, nbytes)
    h.commit(1, [e.key for e in new if e is not None], [])


def test_flipped_byte_through_hierarchy_is_a_miss(tmp_path: Path) -> None:
    nb = 64 * KB
    h = _two_level(tmp_path, 2, nb)
    nv = h.levels[1].tier
    assert isinstance(nv, NvmeTier)
    try:
        keys = [key_of(i) for i in range(6)]
        for k in keys:
            _store(h, [k], nb)  # independent roots; the oldest are demoted to NVMe
        nv.flush()
        victim = h.get(keys[0])
        assert victim is not None and victim.top == 1
        vh = victim.locs[1]
        _flip_byte(vh)
        st, ents = h.acquire([keys[0], keys[1]])
        assert st == [Status.CHECKSUM_MISMATCH, Status.OK]
        assert h.counters.checksum_failures == 1
        assert h.get(keys[0]) is None  # forgotten: a miss, never wrong bytes
        assert vh.state == SlotState.FREED  # and its NVMe space given back
        e1 = ents[1]
        assert e1 is not None
        assert bytes(h.levels[0].tier.view(e1.locs[0])) == data_for(keys[1], nb)
    finally:
        nv.close()
    nv = open_tier(tmp_path / "t")
    try:  # the forgotten block's record is gone from the index too
        assert keys[0] not in {rb.key for rb in nv.recover()}
    finally:
        nv.close()


# ---------------------------------------------------------------- disk full, I/O errors


def _enospc(*a: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_injected_disk_full_degrades_the_tier(tmp_path: Path, caplog: Any) -> None:
    nb = 64 * KB
    h = _two_level(tmp_path, 2, nb)
    nv = h.levels[1].tier
    assert isinstance(nv, NvmeTier)
    try:
        keys = [key_of(i) for i in range(8)]
        for k in keys[:4]:
            _store(h, [k], nb)
        nv.flush()
        on_disk = [k for k in keys[:4] if h.get(k).top == 1]  # type: ignore[union-attr]
        assert on_disk
        nv.io.pwritev = _enospc  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="kvstore.tiers.nvme"):
            _store(h, [keys[4]], nb)  # demotes one more block: its write fails
            nv.flush()
        assert nv.degraded and "No space left on device" in nv.degraded
        assert "degraded" in caplog.text
        st = nv.stats()
        # Every block demoted after the disk filled (now only on NVMe) is lost.
        lost = [k for k in keys[:4] if k not in on_disk and h.get(k).top == 1]  # type: ignore[union-attr]
        assert lost
        assert st["degraded"] and st["io_errors"] == len(lost)
        # The hierarchy stops demoting: further evictions drop instead.
        demotions = h.counters.demotions
        for k in keys[5:]:
            _store(h, [k], nb)
        assert h.counters.demotions == demotions
        assert nv.reserve(nb, entry(key_of(100), nb)) is None
        # Blocks written before the failure still read back.
        st2, got = h.acquire(on_disk[:1])
        assert st2 == [Status.OK]
        assert got[0] is not None
        assert bytes(h.levels[0].tier.view(got[0].locs[0])) == data_for(on_disk[0], nb)
        h.release([got[0]])
        # The block whose write failed is a miss, not an error forever.
        st3, _ = h.acquire(lost)  # nothing pinned: no entry comes back
        assert st3 == [Status.NOT_FOUND] * len(lost) and h.get(lost[0]) is None
        assert h.counters.io_errors == len(lost)
    finally:
        nv.close()


def test_injected_read_and_sync_errors(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t")
    try:
        h, e, _ = put(t, key_of(1), 64 * KB)
        t.flush()

        def eio(*a: Any) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        real_pread = t.io.pread
        t.io.pread = eio  # type: ignore[method-assign]
        with pytest.raises(TierIOError, match="Input/output error"):
            read(t, h, e)
        t.io.pread = real_pread  # type: ignore[method-assign]
        t.io.sync = eio  # type: ignore[method-assign]
        h2, e2, _ = put(t, key_of(2), 64 * KB)
        t.flush()
        assert h2.state == SlotState.FAILED
        assert t.degraded and "fdatasync" in t.degraded
        with pytest.raises(TierIOError, match="block lost"):
            read(t, h2, e2)
        assert t.stats()["io_errors"] == 2
    finally:
        t.io.sync = os.fdatasync  # type: ignore[method-assign]
        t.close()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "mnt", "3m") as mnt:
        yield mnt


def test_real_disk_full_on_tiny_tmpfs(tiny_tmpfs: Path) -> None:
    nb = 256 * KB
    t = open_tier(tiny_tmpfs / "t", capacity=64 << 20)
    try:
        written = []
        for i in range(40):
            if t.degraded:
                break
            written.append(put(t, key_of(i), nb))
            t.flush()
        assert t.degraded, "3 MiB of tmpfs should have filled"
        assert (
            "No space left" in t.degraded or "MDB_MAP_FULL" in t.degraded or "space" in t.degraded
        )
        assert t.reserve(nb, entry(key_of(999), nb)) is None
        good = [b for b in written if b[0].state == SlotState.DURABLE]
        assert good
        for h, e, data in good:
            assert read(t, h, e) == data
    finally:
        t.close()


def test_a_bug_in_the_write_path_fails_the_block_not_flush(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t")
    try:

        def boom(*a: Any) -> None:
            raise RuntimeError("bug")

        t.io.pwritev = boom  # type: ignore[method-assign]
        h, e, _ = put(t, key_of(1), 64 * KB)
        t.flush()  # returns: the crashed write is failed, not pending forever
        assert h.state == SlotState.FAILED and t.degraded and "bug" in t.degraded
        with pytest.raises(TierIOError):
            read(t, h, e)
    finally:
        t.close()
