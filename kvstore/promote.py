"""Acquire and Prefetch promotions with the disk reads off the event loop.

The hierarchy is single-threaded: only the event loop touches it.  A promotion
from a tier with ``threaded_reads`` (the NVMe tier) is split
(:mod:`kvstore.acquire`): the loop pins the keys and reserves their DRAM slots,
a worker thread reads into those slots (touching no index state), and the loop
publishes the result.  Meanwhile every other call is served.  What makes that safe:

* The entries are pinned, so nothing evicts, demotes or deletes them during the
  read; their reserved slots are in no policy yet, so nothing evicts those.
* A second acquire of a key being read waits for that read (``Hierarchy.promoting``)
  instead of reserving and reading it again, and gets the same outcome.
* The reads and the publication run in a task of their own that the caller's
  cancellation does not reach (``asyncio.shield``): it always completes.  A caller
  that is gone by then (cancelled RPC, closed session) has its pins released
  instead of recorded.
* :meth:`Promoter.drain` (daemon shutdown) waits for every task before the tiers
  close.

An acquire with nothing to read from such a tier completes synchronously, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from kvstore.acquire import AcquirePlan, acquire_begin, acquire_finish, finish_jobs, read_jobs
from kvstore.entry import BlockEntry
from kvstore.hierarchy_types import Status

if TYPE_CHECKING:
    from kvstore.hierarchy import Hierarchy

log = logging.getLogger(__name__)

Outcome = tuple[list[Status], list[BlockEntry | None]]


class Promoter:
    """Runs acquires whose reads go to a thread.  One per daemon, used on its loop.

    Args:
        h: the hierarchy (mutated only on the loop thread).
        threads: worker threads for reads (each mostly waits on the tier's own
            read threads, so a few suffice).
    """

    def __init__(self, h: Hierarchy, threads: int = 4) -> None:
        self.h = h
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None  # made at the first threaded read
        self._tasks: set[asyncio.Task[Outcome]] = set()
        self.offloaded = 0  # acquires whose reads ran on a thread

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def start(self, keys: Sequence[bytes]) -> tuple[AcquirePlan, asyncio.Task[Outcome] | None]:
        """Phase 1 (and the reads that stay on the loop).

        Returns:
            The plan, and ``None`` when it is ready for :func:`acquire_finish` now;
            else a task that completes it and returns its outcome (pins included:
            the caller owns them once the task is done, see :meth:`release_when_done`).
        """
        h = self.h
        plan = acquire_begin(h, keys)
        threaded: list[int] = []
        if plan.jobs:
            local: list[int] = []
            for src in plan.jobs:
                (threaded if h.levels[src].tier.threaded_reads else local).append(src)
            if local:
                read_jobs(h, plan, local)
            if not threaded:
                finish_jobs(h, plan)
        if not threaded and all(tok.done for _, _, tok in plan.waits):
            return plan, None
        task = asyncio.get_running_loop().create_task(self._complete(plan, threaded))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return plan, task

    async def _complete(self, plan: AcquirePlan, threaded: list[int]) -> Outcome:
        h = self.h
        if threaded:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kvstore-promote")
            self.offloaded += 1
            fut = self._pool.submit(read_jobs, h, plan, threaded)
            # Never give up on the thread: it writes into the reserved slots.
            while not fut.done():
                try:
                    await asyncio.shield(asyncio.wrap_future(fut))
                except asyncio.CancelledError:
                    log.warning("promotion cancelled while reading; finishing it first")
            finish_jobs(h, plan)
        for tok in {id(tok): tok for _, _, tok in plan.waits}.values():
            if not tok.done:
                await tok.wait()
        return acquire_finish(h, plan)

    async def acquire(self, keys: Sequence[bytes]) -> Outcome:
        """``Hierarchy.acquire`` with the reads off the loop.  If the caller is
        cancelled, the promotion still completes and its pins are released."""
        plan, task = self.start(keys)
        if task is None:
            return acquire_finish(self.h, plan)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self.release_when_done(task)
            raise

    def release_when_done(self, task: asyncio.Task[Outcome]) -> None:
        """Unpin what ``task`` acquires, once it is done (its caller is gone)."""

        def _release(t: asyncio.Task[Outcome]) -> None:
            if t.cancelled() or t.exception() is not None:
                return
            self.h.release([e for e in t.result()[1] if e is not None])

        task.add_done_callback(_release)

    async def drain(self) -> None:
        """Wait for every promotion in flight (shutdown, before the tiers close)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
            await asyncio.sleep(0)  # let their done callbacks (releases) run

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
