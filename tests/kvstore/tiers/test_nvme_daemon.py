"""The NVMe tier under the real daemon: demotion over the wire, restart, kill -9."""

from __future__ import annotations

import time

import numpy as np

from kvstore import Client, Namespace

from ..conftest import DaemonProc
from ..helpers import blocks_for, content

CFG = """
[[tiers]]
name = "dram"
kind = "dram"
capacity = "1MiB"
options = { slab_bytes = "64KiB" }

[[tiers]]
name = "nvme"
kind = "nvme"
capacity = "64MiB"
options = { segment_bytes = "1MiB", staging_bytes = "1MiB" }
"""
NS = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=128, block_tokens=64)  # 32 KiB
SEQS = [np.arange(i * 10_000, i * 10_000 + 64 * 8) for i in range(10)]  # 2.5 MiB in all


def _check_all(c: Client, whole: bool) -> int:
    """Reads back every cached prefix and compares bytes; returns the cached tokens."""
    total = 0
    for s in SEQS:
        n = c.lookup_tokens(NS, s) // 64
        if whole:
            assert n == 8
        keys = NS.block_keys(s)[:n]
        views = c.acquire(keys)  # promotes from NVMe into the arena
        for k, v in zip(keys, views, strict=True):
            assert v is not None
            assert np.array_equal(np.frombuffer(v, np.uint8), content(k, NS.block_nbytes))
        c.release(keys)
        total += n * 64
    return total


def test_demote_restart_and_persist(make_daemon: type[DaemonProc]) -> None:
    d = make_daemon(CFG, args=("--persist-on-shutdown",)).start()
    with Client(d.socket) as c:
        for s in SEQS:
            c.store_tokens(NS, s, blocks_for(NS, s))
        st = c.stats()
        assert st["counters"]["dropped"] == 0 and st["counters"]["demotions"] > 0
        nv = st["tiers"][1]
        assert nv["kind"] == "nvme" and nv["io_backend"] == "posix" and not nv["degraded"]
        _check_all(c, whole=True)
    assert d.stop() == 0
    d2 = make_daemon(CFG, sub="d").start()  # same data dir
    with Client(d2.socket) as c:
        assert _check_all(c, whole=True) == 10 * 8 * 64
        assert c.stats()["tiers"][1]["recovered_blocks"] == 80


def test_kill9_then_restart_serves_only_right_bytes(make_daemon: type[DaemonProc]) -> None:
    d = make_daemon(CFG).start()
    with Client(d.socket) as c:
        for s in SEQS:
            c.store_tokens(NS, s, blocks_for(NS, s))
    time.sleep(0.2)  # past a group commit or two (commit_interval_ms = 20)
    d.kill()
    d2 = make_daemon(CFG, sub="d").start()
    with Client(d2.socket) as c:
        # DRAM-only blocks are gone; what the NVMe tier indexed reads back exactly.
        assert _check_all(c, whole=False) > 0
        assert c.stats()["counters"]["checksum_failures"] == 0
