"""Promotions from NVMe with the reads on a thread (kvstore.promote), in one process.

The NVMe tier's ``read_many`` is gated by an event, so "the read is in flight" is a
state the test holds, not a timing guess.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.hierarchy import Hierarchy, Status
from kvstore.promote import Promoter
from kvstore.tiers.base import ChecksumMismatch

from .nvme_util import data_for
from .test_nvme_hierarchy import NB, build, chain, nvme, store_chain

DRAM_BLOCKS = 8


class Gate:
    """Holds every ``read_many`` of the NVMe tier until opened; counts the calls."""

    def __init__(self, h: Hierarchy, fail: bool = False) -> None:
        t = nvme(h)
        self.real = t.read_many
        self.open = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        self.threads: set[str] = set()
        self.fail = fail
        t.read_many = self.read_many  # type: ignore[method-assign]

    def read_many(self, items: Any) -> list[Exception | None]:
        if threading.current_thread() is threading.main_thread():  # the synchronous path
            return list(self.real(items))
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        assert self.open.wait(10)
        if self.fail:
            return [ChecksumMismatch("test") for _ in items]
        return list(self.real(items))

    async def until_entered(self) -> None:
        for _ in range(500):
            if self.entered.is_set():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no read started")


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Hierarchy]:
    hier = build(tmp_path / "t", dram_blocks=DRAM_BLOCKS)
    yield hier
    nvme(hier).close()


def _setup(h: Hierarchy) -> tuple[list[bytes], list[bytes]]:
    """A chain demoted to NVMe, and a chain resident in DRAM."""
    cold, hot = chain(1, 4), chain(2, 4)
    store_chain(h, cold)
    store_chain(h, chain(3, 4))
    store_chain(h, hot)
    assert all(h.index[k].top == 1 for k in cold)
    assert all(h.index[k].top == 0 for k in hot)
    return cold, hot


def _check(h: Hierarchy, keys: list[bytes], ents: list[Any]) -> None:
    for k, e in zip(keys, ents, strict=True):
        assert e is not None and e.top == 0
        assert bytes(h.levels[0].tier.view(e.locs[0])) == data_for(k, NB)


def _consistent(h: Hierarchy) -> None:
    """No leaked DRAM room: what is used is what the resident blocks take."""
    assert h.levels[0].tier.used_bytes == h.resident_blocks(0) * NB
    assert not h.promoting


def test_dram_hits_stay_synchronous(h: Hierarchy) -> None:
    _, hot = _setup(h)

    async def go() -> None:
        p = Promoter(h)
        plan, task = p.start(hot)
        assert task is None and not plan.jobs and p._pool is None
        st, ents = await p.acquire(hot)
        assert st == [Status.OK] * 4
        h.release([e for e in ents if e is not None])

    asyncio.run(go())


def test_loop_serves_while_reading(h: Hierarchy) -> None:
    cold, hot = _setup(h)
    gate = Gate(h)

    async def go() -> None:
        p = Promoter(h)
        task = asyncio.create_task(p.acquire(cold))
        await gate.until_entered()
        assert p.in_flight == 1 and len(h.promoting) == 4
        # The read is stuck on its thread; the index keeps answering on the loop.
        assert len(h.lookup(hot)) == 4 and len(h.lookup(cold)) == 4
        st, ents = await p.acquire(hot)
        assert st == [Status.OK] * 4
        h.release([e for e in ents if e is not None])
        assert not task.done()
        gate.open.set()
        st, ents = await task
        assert st == [Status.OK] * 4
        _check(h, cold, ents)
        h.release([e for e in ents if e is not None])

    asyncio.run(go())
    assert gate.calls == 1 and all(n.startswith("kvstore-promote") for n in gate.threads)
    assert h.counters.promotions == 4
    _consistent(h)


def test_same_keys_twice_read_once(h: Hierarchy) -> None:
    cold, _ = _setup(h)
    gate = Gate(h)

    async def go() -> None:
        p = Promoter(h)
        a = asyncio.create_task(p.acquire(cold))
        await gate.until_entered()
        b = asyncio.create_task(p.acquire(cold[:2]))
        await asyncio.sleep(0.05)
        assert not b.done()  # waits for a's read, does not read again
        assert h.levels[0].tier.used_bytes <= DRAM_BLOCKS * NB
        gate.open.set()
        (sa, ea), (sb, eb) = await a, await b
        assert sa == [Status.OK] * 4 and sb == [Status.OK] * 2
        _check(h, cold, ea)
        _check(h, cold[:2], eb)
        assert [h.index[k].pins for k in cold] == [2, 2, 1, 1]
        h.release([e for e in ea + eb if e is not None])
        # The synchronous acquire (trace replay) meets no promotion in flight now.
        st, ents = h.acquire(cold)
        assert st == [Status.OK] * 4
        h.release([e for e in ents if e is not None])

    asyncio.run(go())
    assert gate.calls == 1 and h.counters.promotions == 4
    assert all(h.index[k].pins == 0 for k in cold)
    _consistent(h)


def test_sync_acquire_of_a_key_in_flight_is_in_progress(h: Hierarchy) -> None:
    cold, _ = _setup(h)
    gate = Gate(h)

    async def go() -> None:
        p = Promoter(h)
        a = asyncio.create_task(p.acquire(cold[:2]))
        await gate.until_entered()
        st, ents = h.acquire(cold[1:3])  # cold[2] is not in flight: read on the spot
        assert st == [Status.IN_PROGRESS, Status.OK]
        assert ents[0] is None and ents[1] is not None
        h.release([ents[1]])
        gate.open.set()
        sa, ea = await a
        assert sa == [Status.OK] * 2
        h.release([e for e in ea if e is not None])

    asyncio.run(go())
    assert all(h.index[k].pins == 0 for k in cold)
    _consistent(h)


def test_pinned_and_unevictable_during_read(h: Hierarchy) -> None:
    cold, _ = _setup(h)
    gate = Gate(h)

    async def go() -> None:
        p = Promoter(h)
        a = asyncio.create_task(p.acquire(cold))
        await gate.until_entered()
        assert h.delete(cold) == [Status.PINNED] * 4
        # Fill DRAM with new chains: everything else is evicted (demoted to NVMe on
        # this thread while the read runs on another), never the blocks being read
        # nor their reserved slots.
        for i in range(10, 13):
            store_chain(h, chain(i, 2))
        assert h.counters.evictions_by_tier[0] > 0
        assert all(h.index[k].top == 1 and h.index[k].locs[0] is None for k in cold)
        gate.open.set()
        st, ents = await a
        assert st == [Status.OK] * 4
        _check(h, cold, ents)
        h.release([e for e in ents if e is not None])

    asyncio.run(go())
    _consistent(h)
    for i in range(10, 13):
        st, ents = h.acquire(chain(i, 2))
        assert st == [Status.OK] * 2
        _check(h, chain(i, 2), ents)
        h.release([e for e in ents if e is not None])


def test_failed_read_reaches_the_waiter_too(h: Hierarchy) -> None:
    cold, _ = _setup(h)
    gate = Gate(h, fail=True)

    async def go() -> None:
        p = Promoter(h)
        a = asyncio.create_task(p.acquire(cold[2:]))
        await gate.until_entered()
        b = asyncio.create_task(p.acquire(cold))
        await asyncio.sleep(0.01)
        gate.open.set()
        (sa, _), (sb, eb) = await a, await b
        assert sa == [Status.CHECKSUM_MISMATCH] * 2
        # b read cold[:2] itself (fails too: the gate fails every read), waited on a
        # for the rest.
        assert sb == [Status.CHECKSUM_MISMATCH] * 4 and eb == [None] * 4

    asyncio.run(go())
    assert gate.calls == 2 and h.counters.checksum_failures == 4
    assert not any(k in h.index for k in cold)
    _consistent(h)  # the reserved slots were freed


def test_cancelled_caller_releases_its_pins(h: Hierarchy) -> None:
    cold, _ = _setup(h)
    gate = Gate(h)

    async def go() -> None:
        p = Promoter(h)
        a = asyncio.create_task(p.acquire(cold))
        await gate.until_entered()
        a.cancel()
        await asyncio.sleep(0.01)
        assert a.cancelled() and p.in_flight == 1  # the promotion goes on
        assert all(h.index[k].pins == 1 for k in cold)
        gate.open.set()
        await p.drain()
        p.close()

    asyncio.run(go())
    assert all(h.index[k].pins == 0 and h.index[k].top == 0 for k in cold)
    _consistent(h)
