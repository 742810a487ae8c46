"""No view of the DRAM arena outlives a failed promotion; the arena closes regardless.

A failed NVMe read used to leave the arena slice it read into alive in a reference
cycle (the exception's traceback -> the read's frame -> the exception), so the daemon
could not unmap its arena at shutdown after any checksum failure (``BufferError``).
"""

from __future__ import annotations

import errno
import gc
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.hierarchy import Hierarchy, Level, Status
from kvstore.tiers.dram import DramTier
from kvstore.tiers.nvme import NvmeTier
from tests.kvstore.tiers.nvme_util import NS, data_for, key_of, open_tier

NB = 64 << 10  # one block; the arena holds two


@pytest.fixture
def no_gc() -> Iterator[None]:
    """The daemon runs with the collector tuned down: only refcounting frees views."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _hierarchy(tmp_path: Path) -> tuple[Hierarchy, DramTier, NvmeTier]:
    dram = DramTier("dram", 2 * NB, slab_bytes=NB, prefault=False)
    nv = open_tier(tmp_path / "nvme")
    h = Hierarchy([Level.build(dram, block_hint=NB), Level.build(nv, block_hint=NB)])
    return h, dram, nv


def _store(h: Hierarchy, dram: DramTier, key: bytes) -> None:
    st, ents = h.allocate(1, NS, NB, None, [key])
    assert st == [Status.NEW]
    e = ents[0]
    assert e is not None
    dram.view(e.locs[0])[:] = data_for(key, NB)
    h.commit(1, [key], [])


def _on_nvme(h: Hierarchy, nv: NvmeTier, n: int) -> list[bytes]:
    """Stores ``n + 2`` independent blocks: the first ``n`` are demoted to NVMe."""
    keys = [key_of(i, salt=7) for i in range(n + 2)]
    for k in keys:
        _store(h, h.levels[0].tier, k)  # type: ignore[arg-type]
    nv.flush()
    gone = keys[:n]
    assert all(h.get(k).top == 1 for k in gone)  # type: ignore[union-attr]
    return gone


def _flip(slot: Any) -> None:
    fd = os.open(slot.seg.path, os.O_RDWR)
    try:
        b = os.pread(fd, 4, slot.off + 100)
        os.pwrite(fd, bytes(x ^ 0xFF for x in b), slot.off + 100)
    finally:
        os.close(fd)


def _assert_no_views(dram: DramTier) -> None:
    """Unmaps the arena by hand: raises BufferError if any view of it is alive."""
    dram.arena.view.release()
    dram.arena.mm.close()


def test_checksum_failure_leaves_no_arena_view(tmp_path: Path, no_gc: None) -> None:
    h, dram, nv = _hierarchy(tmp_path)
    try:
        bad = _on_nvme(h, nv, 3)
        for k in bad:
            _flip(h.get(k).locs[1])  # type: ignore[union-attr]
        for k in bad:  # one by one: each is a single read (read_into raises)
            assert h.acquire([k])[0] == [Status.CHECKSUM_MISMATCH]
        assert h.counters.checksum_failures == 3
        _assert_no_views(dram)
    finally:
        nv.close()


def test_read_errors_leave_no_arena_view(tmp_path: Path, no_gc: None) -> None:
    h, dram, nv = _hierarchy(tmp_path)
    try:
        keys = _on_nvme(h, nv, 2)

        def eio(*a: Any) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        nv.io.read_extent = eio  # type: ignore[method-assign]
        nv.io.preadv = eio  # type: ignore[method-assign]
        for k in keys:
            assert h.acquire([k])[0] == [Status.NOT_FOUND]
        assert h.counters.io_errors == 2
        assert all(h.get(k) is None for k in keys)  # no copy left: forgotten, a miss
        _assert_no_views(dram)
    finally:
        nv.close()


def test_unexpected_read_crash_leaves_no_arena_view(
    tmp_path: Path, no_gc: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pytest keeps every log record, with its traceback: the daemon's handlers do not.
    monkeypatch.setattr(logging.getLogger("kvstore.acquire"), "disabled", True)
    h, dram, nv = _hierarchy(tmp_path)
    try:
        keys = _on_nvme(h, nv, 1)

        def crash(items: Any) -> Any:
            dst = items[0][2]
            raise RuntimeError(f"bug reading into {len(dst)} B")

        nv.read_many = crash  # type: ignore[method-assign]
        assert h.acquire(keys)[0] == [Status.NOT_FOUND]
        _assert_no_views(dram)
    finally:
        nv.close()


def test_dram_close_collects_cycles_holding_views(no_gc: None) -> None:
    dram = DramTier("dram", 2 * NB, slab_bytes=NB, prefault=False)
    cycle: list[Any] = [dram.view((0, NB))]
    cycle.append(cycle)  # only the collector can free it
    del cycle
    dram.close()  # no BufferError
    assert dram.arena.mm.closed
    dram.close()  # idempotent


def test_dram_close_tolerates_a_live_view(caplog: pytest.LogCaptureFixture) -> None:
    dram = DramTier("dram", 2 * NB, slab_bytes=NB, prefault=False)
    held = dram.view((0, NB))
    with caplog.at_level(logging.WARNING, logger="kvstore.tiers.dram"):
        dram.close()  # no BufferError: the mapping is left to the process's exit
    assert "still has views" in caplog.text
    assert not dram.arena.mm.closed
    held.release()


def test_tier_reads_keep_no_view_in_a_cycle(tmp_path: Path, no_gc: None) -> None:
    # The NVMe tier itself: a failed read leaves ``dst`` only where the caller can
    # drop it (no exception <-> frame cycle), and read_many's results hold no frame.
    from kvstore.tiers.base import ChecksumMismatch
    from tests.kvstore.tiers.nvme_util import put

    nv = open_tier(tmp_path / "nvme")
    try:
        blocks = [put(nv, key_of(i, salt=9), NB) for i in range(2)]
        nv.flush()
        for h, _e, _ in blocks:
            _flip(h)
        buf = bytearray(NB)
        dst = memoryview(buf)
        with pytest.raises(ChecksumMismatch):
            nv.read_into(blocks[0][0], blocks[0][1], dst)
        dst.release()  # ours; a cycle would still hold a slice of it
        buf.extend(b"x")  # BufferError if any view of ``buf`` is alive
        bufs = [bytearray(NB) for _ in blocks]
        results = nv.read_many(
            [(h, e, memoryview(b)) for (h, e, _), b in zip(blocks, bufs, strict=True)]
        )
        assert all(isinstance(r, ChecksumMismatch) for r in results)
        for b in bufs:
            b.extend(b"x")  # the results (kept alive here) hold no view
    finally:
        nv.close()
