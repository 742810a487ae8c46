"""NVMe tier: turnover faster than compaction is slowed down, not let pile up dead space."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import pytest

from kvstore.tiers.nvme import NvmeTier

from .nvme_util import key_of, open_tier, put

KB = 1024
MB = 1 << 20


def _turnover(t: NvmeTier, total: int, nb: int) -> int:
    """LRU-like churn of ``total`` bytes through the tier; returns the peak disk use."""
    live: collections.deque[Any] = collections.deque()
    peak = 0
    for i in range(total // nb):
        while live and t.used_bytes + nb > t.capacity_bytes:
            t.free(live.popleft())
        h, _, _ = put(t, key_of(i), nb)
        live.append(h)
        peak = max(peak, t.segs.disk_bytes)
    t.flush()
    return peak


def _slow_compaction(t: NvmeTier, monkeypatch: Any, delay: float) -> None:
    real = t._compact_segment

    def slow(seg: Any) -> int:
        time.sleep(delay)  # a disk slower than the writer
        return real(seg)

    monkeypatch.setattr(t, "_compact_segment", slow)


@pytest.mark.parametrize("background", [True, False])
def test_disk_use_stays_bounded_when_turnover_outruns_compaction(
    tmp_path: Path, monkeypatch: Any, background: bool
) -> None:
    cap, nb = 4 * MB, 64 * KB
    t = open_tier(
        tmp_path / "t",
        capacity=cap,
        segment_bytes=MB,
        staging_bytes=2 * MB,
        compact_min_dead_ratio=0.25,
        background_compaction=background,
    )
    try:
        _slow_compaction(t, monkeypatch, 0.02)
        limit = t.disk_limit()
        assert limit == cap / 0.75 + 2 * MB
        peak = _turnover(t, 48 * MB, nb)
        st = t.stats()
        # One write may be placed before the check that follows it.
        assert peak <= limit + nb, (peak, limit, st)
        assert st["compaction_waits"] > 0 and st["compactions"] > 0
        for h in list(t.segs.segs.values()):
            assert h.size == sum(s.length for s in h.slots) + h.dead
        assert st["disk_bytes"] == t.segs.disk_bytes
    finally:
        t.close()


def test_a_stuck_compactor_does_not_stall_every_write(tmp_path: Path, monkeypatch: Any) -> None:
    t = open_tier(tmp_path / "t", capacity=2 * MB, segment_bytes=MB, compact_min_dead_ratio=0.25)
    try:
        monkeypatch.setattr(t, "_compact_segment", lambda seg: 0)  # never frees anything
        t0 = time.monotonic()
        peak = _turnover(t, 16 * MB, 64 * KB)
        assert time.monotonic() - t0 < 10
        assert peak > t.disk_limit()  # no bound without compaction...
        assert t.stats()["compaction_waits"] == 1  # ...and one wait found that out
    finally:
        t.close()
