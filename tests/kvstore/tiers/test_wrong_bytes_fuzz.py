"""Adversarial: can a reader ever see wrong bytes?  A seeded random mix of every verb
over a real shared-memory DRAM arena (slots are reused) and a small NVMe tier with
background compaction, promotions read on a thread (:class:`~kvstore.promote.Promoter`)
while the loop goes on storing, evicting, demoting, deleting and re-storing.

Every block's bytes are ``content(key)``.  Checked all along:

* a lease's bytes, when it is taken, while other work churns, and when it is
  released: same slot, same bytes (pinned blocks never move, their slot is not reused);
* every committed DRAM-resident block, on a periodic full scan (a slot handed to two
  blocks, or written by an aborted or pending writer, shows up here);
* no two blocks share a DRAM slot; pending blocks are never acquired;
* NVMe-only blocks read back whole (or, with corruption injected, fail their checksum:
  a miss, never wrong bytes);
* after a restart every recovered block reads back its bytes or is a checksum miss.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from kvstore.entry import PENDING, READY, BlockEntry
from kvstore.hierarchy import Hierarchy, Level, Status
from kvstore.promote import Promoter
from kvstore.tiers.base import ChecksumMismatch
from kvstore.tiers.dram import DramTier
from kvstore.tiers.nvme import NvmeTier
from tests.kvstore.helpers import content

from .nvme_util import open_tier

NSID = b"f" * 32
CHAINS, DEPTH = 24, 6


def _key(c: int, i: int) -> bytes:
    return xxhash.xxh3_128_digest(f"fuzz:{c}:{i}".encode()) * 2


KEYS = [[_key(c, i) for i in range(DEPTH)] for c in range(CHAINS)]


def _stride(nb: int) -> int:
    return (nb + 4095) // 4096 * 4096


def build(path: Path, nb: int, policy: str, **nvme_opts: Any) -> Hierarchy:
    st = _stride(nb)
    dram = DramTier("dram", st * 32, slab_bytes=st * 4, prefault=False)  # 32 slots
    opts: dict[str, Any] = {
        "compact_min_dead_ratio": 0.2,  # compaction runs all the time
        "commit_interval_ms": 2.0,
        "read_delay_ms": 1.0,  # widens the window of reads on the promotion thread
    }
    opts.update(nvme_opts)
    nv = open_tier(path, capacity=st * 80, **opts)  # 80 blocks: drops at the bottom too
    return Hierarchy(
        [Level.build(dram, policy, block_hint=nb), Level.build(nv, policy, block_hint=nb)]
    )


def _dram(h: Hierarchy) -> DramTier:
    t = h.levels[0].tier
    assert isinstance(t, DramTier)
    return t


def _nvme(h: Hierarchy) -> NvmeTier:
    t = h.levels[1].tier
    assert isinstance(t, NvmeTier)
    return t


@dataclass
class Stats:
    verified_blocks: int = 0
    verified_bytes: int = 0
    lease_checks: int = 0
    scans: int = 0
    checksum_misses: int = 0
    ops: dict[str, int] = field(default_factory=dict)


class Fuzz:
    def __init__(self, h: Hierarchy, nb: int, seed: int, corrupt: bool = False) -> None:
        self.h, self.nb, self.corrupt = h, nb, corrupt
        self.rng = np.random.default_rng(seed)
        self.p = Promoter(h, threads=2)
        self.leases: list[list[tuple[BlockEntry, Any]]] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.pending: list[tuple[int, list[bytes], list[BlockEntry]]] = []
        self.s = Stats()
        self.want = {k: content(k, nb).tobytes() for ks in KEYS for k in ks}

    # ------------------------------------------------------------------ checks
    def check_bytes(self, e: BlockEntry, handle: Any) -> None:
        got = bytes(_dram(self.h).view(handle))
        assert got == self.want[e.key], f"wrong bytes in DRAM for {e.key.hex()[:12]}"
        self.s.verified_blocks += 1
        self.s.verified_bytes += len(got)

    def scan(self) -> None:
        """Every committed DRAM block has its bytes; no slot is shared; NVMe reads verify."""
        self.s.scans += 1
        seen: dict[int, bytes] = {}
        nvme_only = []
        for e in list(self.h.index.values()):
            hd = e.locs[0]
            if hd is not None:
                assert hd[0] not in seen, f"DRAM slot {hd[0]} held by two blocks"
                seen[hd[0]] = e.key
                if e.state == READY:
                    self.check_bytes(e, hd)
            elif e.state == READY and e.locs[1] is not None:
                nvme_only.append(e)
        for i in self.rng.permutation(len(nvme_only))[:8]:
            e = nvme_only[int(i)]
            buf = bytearray(e.nbytes)
            try:
                _nvme(self.h).read_into(e.locs[1], e, memoryview(buf))
            except ChecksumMismatch:
                assert self.corrupt, "checksum mismatch without corruption"
                self.s.checksum_misses += 1
                continue
            assert bytes(buf) == self.want[e.key], f"wrong bytes from NVMe {e.key.hex()[:12]}"
            self.s.verified_blocks += 1
            self.s.verified_bytes += len(buf)

    def take(self, statuses: list[Status], ents: list[BlockEntry | None]) -> None:
        """A finished acquire: check and hold its pins as a lease."""
        held = []
        for st, e in zip(statuses, ents, strict=True):
            if e is None:
                assert st != Status.OK
                if st == Status.CHECKSUM_MISMATCH:
                    assert self.corrupt, "checksum mismatch without corruption"
                    self.s.checksum_misses += 1
                continue
            assert e.state == READY and e.pins > 0 and e.locs[0] is not None
            self.check_bytes(e, e.locs[0])
            held.append((e, e.locs[0]))
        self.leases.append(held)

    def release(self, i: int) -> None:
        for e, hd in self.leases.pop(i):
            assert e.locs[0] is hd, "a pinned block moved"
            self.check_bytes(e, hd)
            self.s.lease_checks += 1
            self.h.release([e])

    def harvest(self) -> None:
        for t in [t for t in self.tasks if t.done()]:
            self.tasks.remove(t)
            self.take(*t.result())

    # ------------------------------------------------------------------ verbs
    def chain(self) -> list[bytes]:
        c = int(self.rng.integers(CHAINS))
        return KEYS[c][: int(self.rng.integers(1, DEPTH + 1))]

    def store(self, owner: int) -> None:
        keys = self.chain()
        st, ents = self.h.allocate(owner, NSID, self.nb, None, keys)
        new = [e for s, e in zip(st, ents, strict=True) if s == Status.NEW and e is not None]
        for e in new:  # garbage first: a pending slot must never be served
            _dram(self.h).view(e.locs[0])[:] = b"\xee" * self.nb
        for x in ents:  # pending (ours or another writer's): invisible to readers
            if x is not None and x.state == PENDING:
                assert self.h.acquire([x.key])[0] == [Status.NOT_FOUND]
        if new:
            self.pending.append((owner, [e.key for e in new], new))

    def finish_store(self) -> None:
        owner, keys, ents = self.pending.pop(int(self.rng.integers(len(self.pending))))
        if self.rng.random() < 0.15:  # the writer gives up (or died): garbage aborted
            assert self.h.abort(owner, keys) == len(keys)
            return
        sums = []
        for e in ents:
            assert e.state == PENDING and e.locs[0] is not None, "a pending slot moved"
            _dram(self.h).view(e.locs[0])[:] = self.want[e.key]
            sums.append(xxhash.xxh3_64_intdigest(self.want[e.key]))
        if self.rng.random() < 0.3:
            sums = []  # no checksums from the client: the NVMe tier computes its own
        assert self.h.commit(owner, keys, sums) == [Status.OK] * len(keys)

    def acquire(self) -> None:
        plan, task = self.p.start(self.chain())
        if task is None:
            from kvstore.acquire import acquire_finish

            self.take(*acquire_finish(self.h, plan))
        else:
            self.tasks.append(task)

    def prefetch(self) -> None:
        plan, task = self.p.start(self.chain())
        if task is not None:
            self.p.release_when_done(task)
        else:
            from kvstore.acquire import acquire_finish

            _, ents = acquire_finish(self.h, plan)
            self.h.release([e for e in ents if e is not None])

    def delete(self) -> None:
        keys = self.chain()
        self.h.delete(keys[int(self.rng.integers(len(keys))) :])

    def flip(self) -> None:
        """Flips one byte somewhere in a segment file (the disk lies)."""
        segs = [p for p in (_nvme(self.h).path / "segments").iterdir() if p.stat().st_size]
        if not segs:
            return
        p = segs[int(self.rng.integers(len(segs)))]
        with p.open("r+b") as f:
            off = int(self.rng.integers(p.stat().st_size))
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x5A]) if b else b"")

    async def run(self, steps: int) -> Stats:
        owners = (11, 12, 13)
        for step in range(steps):
            r = self.rng.random()
            op = (
                "store" if r < 0.28
                else "finish" if r < 0.45
                else "acquire" if r < 0.62
                else "release" if r < 0.74
                else "delete" if r < 0.82
                else "prefetch" if r < 0.90
                else "sleep"
            )  # fmt: skip
            if op == "store":
                self.store(owners[int(self.rng.integers(3))])
            elif op == "finish" and self.pending:
                self.finish_store()
            elif op == "acquire" and len(self.leases) + len(self.tasks) < 8:
                self.acquire()
            elif op == "release" and self.leases:
                self.release(int(self.rng.integers(len(self.leases))))
            elif op == "delete":
                self.delete()
            elif op == "prefetch":
                self.prefetch()
            else:
                await asyncio.sleep(0.002)
            if self.corrupt and step % 40 == 39:
                self.flip()
            await asyncio.sleep(0)
            self.harvest()
            if step % 50 == 49:
                self.scan()
            self.s.ops[op] = self.s.ops.get(op, 0) + 1
        await self.p.drain()
        self.harvest()
        while self.leases:
            self.release(0)
        while self.pending:
            self.finish_store()
        self.scan()
        assert all(e.pins == 0 for e in self.h.index.values()), "a pin leaked"
        self.p.close()
        return self.s


def _recovered_read_back(path: Path, nb: int, policy: str, corrupt: bool) -> tuple[int, int]:
    """Reopen the tier after the run: every recovered block is its bytes, or a miss."""
    h = build(path, nb, policy)
    try:
        n = h.recover()
        ok = bad = 0
        for k in list(h.index):
            st, ents = h.acquire([k])
            if st == [Status.OK]:
                e = ents[0]
                assert e is not None
                assert bytes(_dram(h).view(e.locs[0])) == content(k, nb).tobytes()
                h.release([e])
                ok += 1
            else:
                assert st[0] in (Status.CHECKSUM_MISMATCH, Status.NOT_FOUND, Status.NO_SPACE)
                bad += st[0] == Status.CHECKSUM_MISMATCH
        assert corrupt or bad == 0
        assert n > 0
        return ok, bad
    finally:
        _nvme(h).close()
        _dram(h).close()


@pytest.mark.parametrize(
    ("nb", "policy", "seed"),
    [(8192, "lru", 1), (8192 + 256, "arc", 2), (8192, "chain", 3), (8192 + 256, "s3fifo", 4)],
)
def test_random_churn_never_serves_wrong_bytes(
    tmp_path: Path, nb: int, policy: str, seed: int
) -> None:
    h = build(tmp_path / "nv", nb, policy)
    try:
        s = asyncio.run(Fuzz(h, nb, seed).run(3000))
        c = h.counters
        nv = _nvme(h)
        nv.flush()
        # The run really churned: demotions, promotions on the thread, drops, deletes.
        assert c.demotions > 50 and c.promotions > 20 and c.dropped > 0 and c.deleted > 0
        assert nv.counters["compactions"] > 0 or nv.counters["segments_deleted"] > 0
        assert s.lease_checks > 50 and s.scans >= 30
    finally:
        _nvme(h).close()
        _dram(h).close()
    ok, _ = _recovered_read_back(tmp_path / "nv", nb, policy, corrupt=False)
    assert ok > 0
    print(f"verified {s.verified_blocks} blocks ({s.verified_bytes >> 20} MiB); {s.ops}")


def _churn_then_stop(
    path: Path, nb: int, seed: int, steps: int, corrupt: bool = False
) -> tuple[Any, Hierarchy]:
    """Random churn on a fresh DRAM + NVMe hierarchy, flushed, then both tiers closed
    (a daemon that stopped): the fuzz's stats and the hierarchy."""
    h = build(path, nb, "lru")
    try:
        s = asyncio.run(Fuzz(h, nb, seed, corrupt=corrupt).run(steps))
        _nvme(h).flush()
    finally:
        _nvme(h).close()
        _dram(h).close()
    return s, h


def test_random_churn_with_a_lying_disk_is_misses_not_wrong_bytes(tmp_path: Path) -> None:
    nb = 8192
    s, h = _churn_then_stop(tmp_path / "nv", nb, 7, 1500, corrupt=True)
    # Flip many more bytes while it is down, then restart: misses, never wrong bytes.
    for p in (tmp_path / "nv" / "segments").iterdir():
        size = p.stat().st_size
        with p.open("r+b") as f:
            for off in range(4096 + 17, size, 3 * 4096):
                f.seek(off)
                b = f.read(1)
                f.seek(off)
                f.write(bytes([b[0] ^ 0xFF]))
    ok, bad = _recovered_read_back(tmp_path / "nv", nb, "lru", corrupt=True)
    assert bad > 0
    assert s.checksum_misses + h.counters.checksum_failures > 0
    print(f"verified {s.verified_blocks} blocks; {s.checksum_misses} misses; restart {ok}/{bad}")


def test_torn_segment_tail_after_crash_is_dropped_or_verified(tmp_path: Path) -> None:
    """A segment file cut short (a torn write the index still names) never serves."""
    nb = 8192
    _churn_then_stop(tmp_path / "nv", nb, 9, 400)
    for p in (tmp_path / "nv" / "segments").iterdir():
        size = p.stat().st_size
        if size > 3 * 4096:
            os.truncate(p, size - 4096 - 100)  # cut inside the last extent
    ok, _ = _recovered_read_back(tmp_path / "nv", nb, "lru", corrupt=True)
    assert ok > 0
