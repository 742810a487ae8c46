"""The three phases of :meth:`Hierarchy.acquire`, usable apart.

``acquire_begin`` (index thread) pins the keys, reserves room in the target tier
for those that are not there and plans one read job per source tier;
``read_jobs`` does the reads (only tier read methods on handles reserved for this
plan, so a thread may run it for tiers with ``threaded_reads``);
``finish_jobs`` and ``acquire_finish`` (index thread again) publish the copies,
or undo what failed, and touch the entries.  The synchronous
:meth:`Hierarchy.acquire` runs the three back to back; the daemon runs the reads
of a disk tier on a thread (:mod:`kvstore.promote`) so that other calls are
served meanwhile.

While a plan's reads are in flight its entries are in ``Hierarchy.promoting``: a
later acquire of one of them pins it and waits for that plan (``AcquirePlan.waits``)
instead of reserving and reading it a second time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstore.entry import READY, BlockEntry
from kvstore.hierarchy_types import Status
from kvstore.tiers.base import ChecksumMismatch, Handle, TierIOError, copy_block

if TYPE_CHECKING:
    from kvstore.hierarchy import Hierarchy

log = logging.getLogger(__name__)

Job = tuple[int, BlockEntry, Handle]  # (index in the call's keys, entry, target-tier handle)


class InFlight:
    """The promotions of one plan, while their reads run; later acquires wait on it."""

    __slots__ = ("done", "failed", "_future")

    def __init__(self) -> None:
        self.done = False
        self.failed: dict[BlockEntry, Status] = {}  # the status of each failed promotion
        self._future: asyncio.Future[None] | None = None

    def wait(self) -> asyncio.Future[None]:
        """A future of the running loop, done once the promotions are published."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            if self.done:
                self._future.set_result(None)
        return self._future

    def resolve(self) -> None:
        self.done = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)


@dataclass(slots=True)
class AcquirePlan:
    """One acquire between its phases."""

    target: int
    statuses: list[Status]
    entries: list[BlockEntry | None]
    jobs: dict[int, list[Job]] = field(default_factory=dict)  # by source tier
    results: dict[int, list[Exception | None]] = field(default_factory=dict)
    waits: list[tuple[int, BlockEntry, InFlight]] = field(default_factory=list)
    token: InFlight | None = None  # set when the plan has jobs


def acquire_begin(h: Hierarchy, keys: Sequence[bytes], target: int | None = None) -> AcquirePlan:
    """Phase 1: pin, reserve, plan.  Keys already in the target tier are done."""
    t_to = h.write_level if target is None else target
    n = len(keys)
    plan = AcquirePlan(t_to, [Status.OK] * n, [None] * n)
    statuses, entries, jobs = plan.statuses, plan.entries, plan.jobs
    get, promoting = h.index.get, h.promoting
    for i, k in enumerate(keys):
        e = get(k)
        if e is None or e.state != READY:
            statuses[i] = Status.NOT_FOUND
            continue
        e.pins += 1  # pinned first: nothing below can evict it while we make room
        if e.locs[t_to] is not None:
            entries[i] = e
            continue
        tok = promoting.get(e)
        if tok is not None:  # another plan (or this one) is reading it already
            plan.waits.append((i, e, tok))
            continue
        hd = h._make_room(t_to, e.nbytes, e)
        if hd is None:
            e.pins -= 1
            h.counters.no_space += 1
            statuses[i] = Status.NO_SPACE
            continue
        if plan.token is None:
            plan.token = InFlight()
        promoting[e] = plan.token
        jobs.setdefault(e.top, []).append((i, e, hd))
    return plan


def read_jobs(h: Hierarchy, plan: AcquirePlan, sources: Sequence[int]) -> None:
    """Phase 2 for the jobs of ``sources``: reads into the reserved handles.

    Touches no index state, so it may run on a thread while the index thread goes
    on (for sources whose tier has ``threaded_reads``).  Never raises: an
    unexpected error becomes every job's result.
    """
    for src in sources:
        batch = plan.jobs[src]
        try:
            results = _read_batch(h, src, plan.target, batch)
        except Exception as exc:  # noqa: BLE001 - must not leave the plan half-done
            log.exception("promotion of %d blocks from tier %d failed", len(batch), src)
            results = [exc] * len(batch)
        for err in results:
            if err is not None:
                _drop_traceback(err)
        plan.results[src] = results


def _drop_traceback(exc: BaseException) -> None:
    """Detaches the tracebacks of ``exc`` and of the exceptions it chains.

    A read error's traceback holds the frames of the failed read, and so the arena
    slice it read into: kept in a plan, or in a reference cycle through a frame
    (``bad = ...; raise bad`` or a list of results in that frame), that slice
    outlives the read until the cycle collector runs, and the DRAM tier cannot unmap
    its arena at shutdown.  Only the exception (type and message) is needed here.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += (e.__cause__, e.__context__)


def _read_batch(h: Hierarchy, src: int, dst: int, batch: list[Job]) -> list[Exception | None]:
    src_t, dst_t = h.levels[src].tier, h.levels[dst].tier
    if src_t.stores_bytes and dst_t.stores_bytes and dst_t.host_mapped:
        return list(src_t.read_many([(e.locs[src], e, dst_t.view(hd)) for _, e, hd in batch]))
    out: list[Exception | None] = []
    for _, e, hd in batch:
        try:
            copy_block(e, src_t, e.locs[src], dst_t, hd)
            out.append(None)
        except (ChecksumMismatch, TierIOError) as exc:
            out.append(exc)
    return out


def finish_jobs(h: Hierarchy, plan: AcquirePlan) -> None:
    """Phase 3a: publish the copies read (or undo the failed ones); wakes the waiters."""
    t_to = plan.target
    statuses, entries, promoting = plan.statuses, plan.entries, h.promoting
    failed = plan.token.failed if plan.token is not None else {}
    for src, batch in plan.jobs.items():
        for (i, e, hd), err in zip(batch, plan.results[src], strict=True):
            promoting.pop(e, None)
            if err is None:
                h._set_loc(e, t_to, hd)
                h.levels[t_to].policy.on_insert(e)
                h.counters.promotions += 1
                entries[i] = e
                continue
            h.levels[t_to].tier.free(hd)
            e.pins -= 1
            st = Status.NOT_FOUND
            if isinstance(err, (ChecksumMismatch, TierIOError)):
                h._note_io_error(err)
                # A copy that fails its checksum, or that the tier cannot read (its
                # write failed, the disk errs), is no copy: drop it, report a miss.
                h._remove_copy(e, src)
                if e.top == -1:
                    h._forget(e)
                if isinstance(err, ChecksumMismatch):
                    st = Status.CHECKSUM_MISMATCH
            else:
                h.counters.io_errors += 1  # a bug, not the disk: keep the copy
            statuses[i] = failed[e] = st
    plan.jobs.clear()
    if plan.token is not None:
        plan.token.resolve()


def acquire_finish(h: Hierarchy, plan: AcquirePlan) -> tuple[list[Status], list[BlockEntry | None]]:
    """Phase 3b: the outcome of the waits, then touch (tail first) and count.

    A wait on a plan still in flight (only the synchronous ``acquire`` can meet one)
    is unpinned and reported ``IN_PROGRESS``."""
    statuses, entries, t_to = plan.statuses, plan.entries, plan.target
    for i, e, tok in plan.waits:
        st = tok.failed.get(e) if tok.done else Status.IN_PROGRESS
        if st is None and e.locs[t_to] is not None:
            entries[i] = e
        else:
            e.pins -= 1
            statuses[i] = st if st is not None else Status.NOT_FOUND
    plan.waits.clear()
    h.clock += 1
    now = h.clock
    on_access = [lv.policy.on_access for lv in h.levels]
    for x in reversed(entries):
        if x is not None:
            x.hits += 1
            x.last_access = now
            on_access[x.top](x)
    h.counters.acquires += len(entries)
    return statuses, entries
