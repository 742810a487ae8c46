"""Adversarial, over the wire: client processes churn a daemon whose DRAM tier holds a
fraction of the working set (constant eviction, demotion to NVMe, promotion back,
compaction, drops at the bottom) while others hold leases across that churn, delete
and re-store, prefetch, and die with garbage written into uncommitted slots.  Every
byte any of them reads is checked against ``content(key)``.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from kvstore import Client, LeaseLost
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS, content, popen_client

# NS blocks are 8 KiB: DRAM holds 96 of them, NVMe 384; the workers use 60 sequences
# of 8 blocks (480), so blocks are demoted, promoted, compacted and dropped all along.
CHURN = """
[server]
lease_timeout_s = 30.0

[[tiers]]
name = "dram"
kind = "dram"
capacity = "768KiB"
options = { slab_bytes = "64KiB" }

[[tiers]]
name = "nvme"
kind = "nvme"
capacity = "3MiB"
options = { segment_bytes = "1MiB", compact_min_dead_ratio = 0.2, commit_interval_ms = 2 }
"""

PRELUDE = """
import os, sys, time
import numpy as np
import pytest
from kvstore import Client, KVStoreError, ResourceExhausted
from tests.kvstore.helpers import NS, blocks_for, content

SEQS = [np.arange(i * 100_000, i * 100_000 + 16 * 8) for i in range(60)]
WANT = {{}}

def want(k):
    if k not in WANT:
        WANT[k] = content(k, NS.block_nbytes)
    return WANT[k]

def check(keys, arrays):
    for k, a in zip(keys, arrays, strict=True):
        if not np.array_equal(a, want(k)):
            print("MISMATCH", k.hex(), flush=True)
            os._exit(3)
    return len(keys)

seed = {seed}
rng = np.random.default_rng(seed)
deadline = time.monotonic() + {seconds}
"""

MIXED = (
    PRELUDE
    + """
checked = 0
with Client({socket!r}, name=f"mixed-{{seed}}") as c:
    while time.monotonic() < deadline:
        s = SEQS[int(rng.integers(len(SEQS)))]
        r = rng.random()
        try:
            if r < 0.4:
                c.store_tokens(NS, s, blocks_for(NS, s), checksums=bool(rng.random() < 0.7))
            elif r < 0.5:
                keys = NS.block_keys(s)
                c.delete(keys[int(rng.integers(len(keys))):])
            elif r < 0.6:
                c.prefetch(NS.block_keys(s))
            elif r < 0.7:
                keys = NS.block_keys(s)
                views = c.acquire(keys)
                got = [(k, v) for k, v in zip(keys, views) if v is not None]
                checked += check([k for k, _ in got], [np.frombuffer(v, np.uint8) for _, v in got])
                c.release([k for k, _ in got])
            else:
                with c.load_tokens(NS, s) as lease:
                    checked += check(lease.keys, lease.arrays)
        except ResourceExhausted:
            pass
print("ok", checked, flush=True)
"""
)

HOLDER = (
    PRELUDE
    + """
# Holds a lease on one sequence while reading many others (each read promotes, so
# evicts and demotes), re-checking the held bytes after every one.
checked = held = 0
with Client({socket!r}, name="holder") as c:
    while time.monotonic() < deadline:
        s = SEQS[int(rng.integers(len(SEQS)))]
        try:
            c.store_tokens(NS, s, blocks_for(NS, s))
        except ResourceExhausted:
            continue
        with c.load_tokens(NS, s) as lease:
            snap = [bytes(a) for a in lease.arrays]
            for _ in range(8):
                o = SEQS[int(rng.integers(len(SEQS)))]
                try:
                    with c.load_tokens(NS, o) as other:
                        checked += check(other.keys, other.arrays)
                    c.store_tokens(NS, o, blocks_for(NS, o))
                except ResourceExhausted:
                    pass
                checked += check(lease.keys, lease.arrays)
                assert [bytes(a) for a in lease.arrays] == snap
                held += len(lease.keys)
print("ok", checked, held, flush=True)
"""
)

DOOMED = (
    PRELUDE
    + """
# Allocates a sequence, fills its slots with garbage, says so, and waits to be killed.
c = Client({socket!r}, name="doomed")
# Half the time a sequence that no one else writes (60..79): never committed, never served.
i = int(rng.integers(60, 80)) if rng.random() < 0.5 else int(rng.integers(60))
s = np.arange(i * 100_000, i * 100_000 + 16 * 8)
keys = NS.block_keys(s)
try:
    allocs = c.allocate(NS, keys)
except ResourceExhausted:
    allocs = []
n = 0
for a in allocs:
    if a.view is not None:
        np.frombuffer(a.view, np.uint8)[:] = 0xEE
        n += 1
print("ready", n, flush=True)
time.sleep(60)
"""
)


def test_churn_with_held_leases_and_killed_writers(make_daemon: type[DaemonProc]) -> None:
    d = make_daemon(CHURN).start()
    secs = 8.0
    procs = [popen_client(MIXED.format(seed=i, socket=d.socket, seconds=secs)) for i in range(3)]
    procs.append(popen_client(HOLDER.format(seed=99, socket=d.socket, seconds=secs)))
    killed = garbage_slots = 0
    t_end = time.monotonic() + secs - 1.0
    i = 0
    while time.monotonic() < t_end or killed < 3:  # 3 at least, on a slow machine too
        p = popen_client(DOOMED.format(seed=1000 + i, socket=d.socket, seconds=0))
        assert p.stdout is not None
        line = p.stdout.readline().split()
        assert line and line[0] == "ready", p.communicate(timeout=10)
        garbage_slots += int(line[1])
        time.sleep(0.05)
        p.send_signal(signal.SIGKILL)  # dies with its garbage written, never committed
        p.communicate(timeout=10)  # (closes its pipes)
        killed += 1
        i += 1
    checked = held = 0
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"worker failed ({p.returncode}): {out}\n{err[-3000:]}"
        f = out.split()
        checked += int(f[1])
        held += int(f[2]) if len(f) > 2 else 0
    # Finally, every block still served (DRAM or promoted from NVMe) is byte-exact.
    with Client(d.socket) as c:
        final = 0
        for j in range(80):
            s = np.arange(j * 100_000, j * 100_000 + 16 * 8)
            if j >= 60:  # only ever written by the killed writers: nothing of it is served
                assert c.lookup_tokens(NS, s) == 0
                assert all(v is None for v in c.acquire(NS.block_keys(s)))
                continue
            with c.load_tokens(NS, s) as lease:
                for k, a in zip(lease.keys, lease.arrays, strict=True):
                    assert np.array_equal(a, content(k, NS.block_nbytes)), k.hex()
                final += len(lease.keys)
        st = c.stats()
    cn = st["counters"]
    assert cn["demotions"] > 100 and cn["promotions"] > 50 and cn["dropped"] > 0
    assert cn["checksum_failures"] == 0 and cn["io_errors"] == 0
    assert killed >= 3 and garbage_slots > 0 and cn["aborts"] >= garbage_slots
    assert checked > 1000 and held > 200 and final > 0
    assert d.alive()
    print(
        f"checked {checked} blocks ({checked * NS.block_nbytes >> 20} MiB), held-lease "
        f"rechecks {held}, final {final}, killed {killed} writers ({garbage_slots} garbage "
        f"slots), demotions {cn['demotions']}, promotions {cn['promotions']}, "
        f"dropped {cn['dropped']}, compactions {st['tiers'][1].get('compactions')}"
    )


# 64 blocks of DRAM and nothing below: an unpinned block is dropped, its slot reused.
DRAM_ONLY = """
[[tiers]]
name = "dram"
kind = "dram"
capacity = "512KiB"
policy = "lru"
options = { slab_bytes = "64KiB" }
"""


def _six_blocks(
    make_daemon: type[DaemonProc],
) -> tuple[DaemonProc, np.ndarray, list[bytes], list[np.ndarray]]:
    """A DRAM-only daemon, and a 6-block sequence: its tokens, keys and contents."""
    seq = np.arange(16 * 6)
    keys = NS.block_keys(seq)
    return make_daemon(DRAM_ONLY).start(), seq, keys, [content(k, NS.block_nbytes) for k in keys]


def _flood(c: Client, first: int, n: int) -> None:
    """Stores ``n`` sequences of 4 blocks: every unpinned block is evicted."""
    for i in range(first, first + n):
        s = np.arange(i * 100_000, i * 100_000 + 64)
        c.store_tokens(NS, s, [content(k, NS.block_nbytes) for k in NS.block_keys(s)])


def test_overlapping_pins_of_one_session_each_keep_their_bytes(
    make_daemon: type[DaemonProc],
) -> None:
    """One session pins the same blocks several ways (two leases, the low-level acquire
    twice); giving back some of them must leave the rest pinned through a flood that
    reuses every free slot."""
    d, seq, keys, want = _six_blocks(make_daemon)
    with Client(d.socket) as c, Client(d.socket) as other:
        c.store_tokens(NS, seq, want)
        l1 = c.load_tokens(NS, seq)
        l2 = c.load_tokens(NS, seq)
        v1 = c.acquire(keys)
        v2 = c.acquire(keys[:3])
        assert len(l1.keys) == len(l2.keys) == 6 and all(v is not None for v in v1 + v2)
        views = [np.frombuffer(v, np.uint8) for v in v1 if v is not None]
        a1, a2 = list(l1.arrays), list(l2.arrays)  # same slots: kept intact by the others

        def intact() -> None:
            for a, b, v, w_ in zip(a1, a2, views, want, strict=True):
                assert np.array_equal(a, w_) and np.array_equal(b, w_) and np.array_equal(v, w_)

        steps = [
            lambda: l1.close(),
            lambda: c.release(keys[:3]),
            lambda: c.release(keys),
        ]
        for i, step in enumerate(steps):
            step()
            _flood(other, 1000 + 40 * i, 40)  # 160 blocks through a 64-block arena
            if i < 2:
                intact()  # l2 (and v1 until its release) still pinned
            else:
                for a, w_ in zip(a2, want, strict=True):
                    assert np.array_equal(a, w_)
        l2.close()
        _flood(other, 2000, 40)
        assert c.lookup_tokens(NS, seq) == 0  # unpinned now: the flood took its slots


def test_a_lease_whose_session_ended_says_so_at_release(make_daemon: type[DaemonProc]) -> None:
    """reconnect() to a live daemon (also what a call does on UNAVAILABLE, CANCELLED or
    an unknown session) ends the old session and its pins: the daemon may reuse their
    slots while the lease's views still point at them.  Closing that lease raises
    LeaseLost, so the engine discards what it read instead of using another block's
    bytes; the low-level release() says the same."""
    d, seq, keys, want = _six_blocks(make_daemon)
    with Client(d.socket) as c, Client(d.socket) as other:
        c.store_tokens(NS, seq, want)
        lease = c.load_tokens(NS, seq)
        c.reconnect()
        _flood(other, 1000, 40)
        changed = sum(not np.array_equal(a, w_) for a, w_ in zip(lease.arrays, want, strict=True))
        assert changed > 0  # the hazard is real: these views now show other blocks
        with pytest.raises(LeaseLost, match="6 pin"):
            lease.close()
        lease.close()  # once only

        c.store_tokens(NS, seq, want)
        with pytest.raises(LeaseLost), c.load_tokens(NS, seq):
            c.reconnect()
        views = c.acquire(keys[:2])
        assert all(v is not None for v in views)
        c.reconnect()
        with pytest.raises(LeaseLost, match="2 pin"):
            c.release(keys[:2])
        # An exception in flight is not replaced by the release's LeaseLost.
        with pytest.raises(ZeroDivisionError), c.load_tokens(NS, seq):
            c.reconnect()
            raise ZeroDivisionError
        assert c.stats()["sessions"]["pins"] == 0
