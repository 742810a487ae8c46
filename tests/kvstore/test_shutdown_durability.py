"""SIGTERM after NVMe checksum failures: the daemon still stops cleanly, NVMe flushed.

A failed read used to leave a view of the DRAM arena alive, so closing the DRAM
tier raised ``BufferError``, the daemon exited 1 and the NVMe tier (closed after
it) never flushed its queued demotions.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvstore import Client
from kvstore.daemon import close_tiers
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS, blocks_for
from tests.kvstore.test_daemon_nvme import TWO_TIER


def _prompt(i: int) -> np.ndarray:
    return np.arange(i * 100_000, i * 100_000 + 16 * 8)  # 8 blocks of 8 KiB


def _corrupt(data: Path, blocks: int) -> None:
    """Flips 4 bytes in ``blocks`` blocks of the first segment, none adjacent."""
    seg = sorted((data / "nvme" / "segments").glob("seg-*.dat"))[0]
    fd = os.open(seg, os.O_RDWR)
    try:
        for b in range(blocks):
            at = b * 5 * NS.block_nbytes + 100
            old = os.pread(fd, 4, at)
            os.pwrite(fd, bytes(x ^ 0xFF for x in old), at)
    finally:
        os.close(fd)


def test_sigterm_after_checksum_failures_stops_cleanly(make_daemon: type[DaemonProc]) -> None:
    d = make_daemon(TWO_TIER).start()
    with Client(d.socket) as c:
        for i in range(100):
            c.store_tokens(NS, _prompt(i), blocks_for(NS, _prompt(i)))
    assert d.stop() == 0
    _corrupt(d.tmp / "data", 3)
    d.start()
    with Client(d.socket) as c:
        for i in range(20):  # one key per call: each corrupt block is read on its own
            for k in NS.block_keys(_prompt(i)):
                if c.acquire([k])[0] is not None:
                    c.release([k])
        assert c.stats()["counters"]["checksum_failures"] == 3
        later = [_prompt(i) for i in range(200, 260)]
        for p in later:
            c.store_tokens(NS, p, blocks_for(NS, p))
        # The newest prompt with blocks demoted: those writes are likely still queued.
        before = [c.lookup(NS.block_keys(p)).tiers for p in later]
        last = max(i for i, t in enumerate(before) if "nvme" in t)
        on_nvme = before[last].count("nvme")
        assert before[last][:on_nvme] == ["nvme"] * on_nvme
    assert d.stop(signal.SIGTERM) == 0, d.log()
    log = d.log()
    assert "BufferError" not in log and "level=ERROR" not in log, log
    assert log.rstrip().endswith("msg=stopped"), log
    d.start()
    with Client(d.socket) as c:
        after = c.lookup(NS.block_keys(later[last]))
        assert after.num_cached >= on_nvme and set(after.tiers) == {"nvme"}


class _FakeTier:
    def __init__(self, name: str, persistent: bool, calls: list[str], fail: bool = False) -> None:
        self.name, self.kind, self.persistent = name, "fake", persistent
        self.calls, self.fail = calls, fail

    def flush(self) -> None:
        self.calls.append(f"flush {self.name}")

    def close(self) -> None:
        self.calls.append(f"close {self.name}")
        if self.fail:
            raise BufferError("cannot close exported pointers exist")


def test_close_tiers_persistent_first_and_all_of_them(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    tiers: list[Any] = [
        _FakeTier("dram", False, calls, fail=True),
        _FakeTier("cxl", False, calls, fail=True),
        _FakeTier("nvme", True, calls),
    ]
    assert close_tiers(tiers) == ["tier 'dram'", "tier 'cxl'"]
    assert calls == [
        "flush nvme", "close nvme", "flush dram", "close dram", "flush cxl", "close cxl"
    ]  # fmt: skip
    assert "tier 'dram' (fake): flush/close failed" in caplog.text


def test_close_tiers_closes_after_a_failed_flush() -> None:
    calls: list[str] = []

    class _BadFlush(_FakeTier):
        def flush(self) -> None:
            super().flush()
            raise OSError("disk gone")

    tiers: list[Any] = [_BadFlush("nvme", True, calls), _FakeTier("dram", False, calls)]
    assert close_tiers(tiers) == ["tier 'nvme'"]
    assert calls == ["flush nvme", "close nvme", "flush dram", "close dram"]
