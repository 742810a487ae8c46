"""The block index and the movement of blocks between tiers.

The :class:`Hierarchy` is the daemon's one source of truth about blocks: which
keys exist, in which tiers their bytes are, who pins them, and which are still
being written.  It is synchronous and single-threaded by contract (the daemon
calls it from its event loop; the trace replay calls it directly), which keeps
every invariant checkable without locks:

* Tail-first: a block leaves tier ``t`` only while none of its children sits in
  ``t`` or a faster tier, so a cached prefix never loses its head first.
* Eviction from tier ``t`` demotes to ``t + 1`` (write-back) unless the next
  tier's admission says no; a block with children is always demoted.
* Pinned (acquired) and pending (allocated, uncommitted) blocks never move.
* Out of space is a value (``None`` / a status), never an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from kvstore.acquire import InFlight, acquire_begin, acquire_finish, finish_jobs, read_jobs
from kvstore.entry import PENDING, READY, BlockEntry
from kvstore.hierarchy_types import TOP, Counters, Level, Status
from kvstore.policies import AdmissionPolicy
from kvstore.tiers.base import ChecksumMismatch, Handle, TierIOError, copy_block

__all__ = ["Counters", "Hierarchy", "Level", "Status"]


class Hierarchy:
    """Index of blocks over an ordered list of tiers (fastest first).

    Args:
        levels: the tiers, fastest first.
        write_level: index of the tier where new blocks are allocated and into which
            ``acquire`` promotes (the host-mapped DRAM arena in the daemon).
    """

    def __init__(self, levels: Sequence[Level], write_level: int = 0) -> None:
        if not levels:
            raise ValueError("a hierarchy needs at least one tier")
        self.levels = list(levels)
        self.n = len(self.levels)
        self.write_level = write_level
        self.index: dict[bytes, BlockEntry] = {}
        self.ready: dict[bytes, BlockEntry] = {}  # the READY part of index (Lookup's path)
        self.clock = 0
        self.counters = Counters(hits_by_tier=[0] * self.n, evictions_by_tier=[0] * self.n)
        # Only admissions that override the hook see references (saves a call per
        # block per level on the lookup/allocate hot path).
        self._ref_hooks = [
            lv.admission.on_reference
            for lv in self.levels
            if type(lv.admission).on_reference is not AdmissionPolicy.on_reference
        ]
        self._skips: list[set[BlockEntry]] = [set() for _ in self.levels]
        self._evictable = [self._evictable_pred(t) for t in range(self.n)]
        self.promoting: dict[BlockEntry, InFlight] = {}  # reads in flight (kvstore.acquire)

    # ------------------------------------------------------------------ queries
    def get(self, key: bytes) -> BlockEntry | None:
        return self.index.get(key)

    def lookup(self, keys: Sequence[bytes]) -> list[BlockEntry]:
        """The longest prefix of ``keys`` that is committed, as entries (no pinning)."""
        return self.lookup_tiers(keys)[0]

    def lookup_tiers(self, keys: Sequence[bytes]) -> tuple[list[BlockEntry], bytes]:
        """``lookup`` plus the tier of each hit, one byte each (what Lookup answers)."""
        out = list(map(self.ready.get, keys))  # C-level: several times a Python loop
        if None in out:
            del out[out.index(None) :]
        tops = bytes(map(TOP, out))
        self.counters.note_lookup(len(keys), tops)
        for hook in self._ref_hooks:
            for e in out:
                hook(e)  # type: ignore[arg-type]
        return out, tops  # type: ignore[return-value]  # no None left

    # ------------------------------------------------------------------ writes
    def allocate(
        self,
        owner: int,
        ns: bytes,
        nbytes: int,
        parent_key: bytes | None,
        keys: Sequence[bytes],
        first_depth: int = 0,
    ) -> tuple[list[Status], list[BlockEntry | None]]:
        """Reserve write-tier room for the keys of one chain that are not present.

        ``keys`` is a chain: the parent of ``keys[i]`` is ``keys[i-1]``, the parent of
        ``keys[0]`` is ``parent_key`` (``None`` or unknown: a root at ``first_depth``).
        All-or-nothing: when room for every new key cannot be made, nothing is
        reserved and every new key is reported ``NO_SPACE``.

        Returns:
            Per-key statuses (``NEW``, ``PRESENT``, ``IN_PROGRESS``, ``NO_SPACE``) and
            the entries (the new pending entries, or the existing ones).
        """
        statuses: list[Status] = []
        entries: list[BlockEntry | None] = []
        w = self.write_level
        index = self.index
        get = index.get
        n = self.n
        wtier = self.levels[w].tier
        reserve = wtier.reserve
        new_status = Status.NEW  # enum member lookups are slow; once per call
        parent = get(parent_key) if parent_key else None
        depth = parent.depth + 1 if parent is not None else first_depth
        for k in keys:
            e = get(k)
            if e is not None:
                statuses.append(Status.PRESENT if e.state == READY else Status.IN_PROGRESS)
                entries.append(e)
                if e.state == READY:
                    self.counters.dedup_present += 1
                parent, depth = e, e.depth + 1
                continue
            locs: list[Handle] = [None] * n
            # Positional: cheaper than keywords, one entry per missed block.
            e = BlockEntry(k, ns, nbytes, parent, depth, locs, [0] * n, PENDING, -1, 0, 0, owner)
            # Link first so the parent is protected while we make room for the child.
            index[k] = e
            if parent is not None:
                pc = parent.children
                if pc is None:
                    parent.children = {e}
                else:
                    pc.add(e)
            # _make_room inlined (one call per new block saved on the hot path).
            h = None if wtier.degraded else reserve(nbytes, e)
            if h is None:
                if not wtier.degraded:
                    # Room for this key and every later one not in the index, in one
                    # eviction pass (one victim at a time, as block-by-block would).
                    rest = keys[len(statuses) + 1 :]
                    count = 1 + len(rest) - sum(map(index.__contains__, rest))
                    h = self._evict_for(w, nbytes, e, count)
                if h is None:  # all or nothing: undo this call's new entries
                    self._forget(e)
                    created = [x for x, s in zip(entries, statuses, strict=True) if s == new_status]
                    for c in reversed(created):
                        self._abort_one(c)  # type: ignore[arg-type]  # new: not None
                    self.counters.aborts -= len(created)
                    self.counters.no_space += 1
                    statuses += [new_status] * (len(keys) - len(statuses))
                    entries += [None] * (len(keys) - len(entries))
                    return [Status.NO_SPACE if s == new_status else s for s in statuses], [
                        None if s == new_status else x
                        for s, x in zip(statuses, entries, strict=True)
                    ]
            # _set_loc for a fresh entry (no copy anywhere yet), inlined.
            locs[w] = h
            e.top = w
            if parent is not None:
                parent.kid_tops[w] += 1
            statuses.append(new_status)
            entries.append(e)
            parent = e
            depth += 1
        for hook in self._ref_hooks:
            for e in entries:
                if e is not None:
                    hook(e)
        self.counters.allocations += statuses.count(new_status)
        return statuses, entries

    def commit(self, owner: int, keys: Sequence[bytes], checksums: Sequence[int]) -> list[Status]:
        """Make pending blocks of ``owner`` visible to readers."""
        out: list[Status] = []
        done: list[BlockEntry] = []
        get, ready = self.index.get, self.ready
        ok = Status.OK  # enum member lookups are slow; once per call
        sums = list(map(int, checksums))
        if len(sums) < len(keys):
            sums += [0] * (len(keys) - len(sums))
        self.clock += 1
        now = self.clock
        for k, cs in zip(keys, sums, strict=False):  # sums: at least one per key
            e = get(k)
            if e is None or e.state != PENDING or e.owner != owner:
                if e is None:
                    out.append(Status.NOT_FOUND)
                elif e.state == READY:
                    out.append(Status.ALREADY_COMMITTED)
                else:
                    out.append(Status.NOT_OWNER)
                continue
            e.state = READY
            e.owner = 0
            e.checksum = cs
            e.last_access = now
            ready[k] = e
            done.append(e)
            out.append(ok)
        # Tail first, like acquire/touch: a chain's head is inserted last, so recency
        # orders meet leaves (the blocks that may go) before their parents.
        done.reverse()
        self.levels[self.write_level].policy.on_insert_many(done)
        self.counters.commits += len(done)
        return out

    def abort(self, owner: int, keys: Iterable[bytes]) -> int:
        """Drop pending blocks of ``owner`` (a session that ended before committing)."""
        n = 0
        for k in keys:
            e = self.index.get(k)
            if e is not None and e.state == PENDING and e.owner == owner:
                self._abort_one(e)
                n += 1
        return n

    def _abort_one(self, e: BlockEntry) -> None:
        for t in range(self.n):
            h = e.locs[t]
            if h is not None:
                self.levels[t].tier.free(h)
                e.locs[t] = None
        self._set_top(e, -1)
        self._forget(e)
        self.counters.aborts += 1

    # ------------------------------------------------------------------ reads
    def acquire(
        self, keys: Sequence[bytes], target: int | None = None
    ) -> tuple[list[Status], list[BlockEntry | None]]:
        """Pin committed blocks and promote them into ``target`` (the write tier).

        Promotions from one source tier are read in one batch (``Tier.read_many``, which
        a disk tier runs in parallel).  Entries are touched tail first so that a parent
        stays more recent than its children.  A block whose bytes fail their checksum
        is forgotten and reported ``CHECKSUM_MISMATCH`` (a miss, never wrong bytes).
        A block whose promotion another (asynchronous) acquire has in flight is
        reported ``IN_PROGRESS``.  The phases are in :mod:`kvstore.acquire`; the daemon
        runs the disk reads off its event loop (:mod:`kvstore.promote`).
        """
        plan = acquire_begin(self, keys, target)
        if plan.jobs:
            read_jobs(self, plan, list(plan.jobs))
            finish_jobs(self, plan)
        return acquire_finish(self, plan)

    def release(self, entries: Iterable[BlockEntry]) -> None:
        for e in entries:
            if e.pins <= 0:
                raise AssertionError(f"release of unpinned block {e.key.hex()[:16]}")
            e.pins -= 1

    def touch(self, entries: Sequence[BlockEntry]) -> None:
        """Record a use of resident entries (tail first) without pinning them."""
        self.clock += 1
        now = self.clock
        for e in reversed(entries):
            e.hits += 1
            e.last_access = now
            self.levels[e.top].policy.on_access(e)

    def delete(self, keys: Sequence[bytes]) -> list[Status]:
        """Remove committed, unpinned blocks that have no cached children.

        Deepest first, so deleting a whole chain in one call works in any order.
        """
        order = sorted(
            range(len(keys)),
            key=lambda i: -(e.depth if (e := self.index.get(keys[i])) else -1),
        )
        out = [Status.OK] * len(keys)
        for i in order:
            e = self.index.get(keys[i])
            if e is None:
                out[i] = Status.NOT_FOUND
            elif e.state != READY:
                out[i] = Status.IN_PROGRESS
            elif e.pins:
                out[i] = Status.PINNED
            elif e.children:
                out[i] = Status.HAS_CHILDREN
            else:
                self._drop_all(e)
                self.counters.deleted += 1
        return out

    # ------------------------------------------------------------------ movement
    def evictable(self, e: BlockEntry, t: int) -> bool:
        """Whether ``e`` may leave tier ``t`` now."""
        if e.state != READY or e.pins:
            return False
        if e.top < t:  # a faster copy exists: dropping this one loses nothing
            return True
        kt = e.kid_tops
        for u in range(t + 1):
            if kt[u]:
                return False
        return True

    def _make_room(self, t: int, nbytes: int, e: BlockEntry) -> Handle | None:
        """Reserve room in tier ``t``, evicting by policy; ``None`` when impossible."""
        tier = self.levels[t].tier
        if tier.degraded:
            return None
        h = tier.reserve(nbytes, e)
        return h if h is not None else self._evict_for(t, nbytes, e)

    def _evict_for(self, t: int, nbytes: int, e: BlockEntry, count: int = 1) -> Handle | None:
        """``_make_room`` once a first ``reserve`` failed: evicts until one succeeds and
        there is room for ``count`` blocks of ``nbytes`` (a whole new chain, one pass).
        Victims come one at a time, each chosen once the previous one is gone."""
        lv = self.levels[t]
        tier = lv.tier
        skip = self._skips[t]  # victims that must stay (no room below for them)
        skip.clear()
        stream = lv.policy.stream_victims(self._evictable[t])
        reserve = tier.reserve
        evict = self._evict
        last = t + 1 == self.n
        on_remove, index, ready = lv.policy.on_remove, self.index, self.ready
        c, cap, freed = self.counters, tier.capacity_bytes, []
        h = None
        while h is None:
            # Bytes still to free for ``count`` blocks; at least one victim per round.
            need = count * nbytes - (cap - tier.used_bytes)
            gone = dropped = 0
            for v in stream:
                if last and v.top == t and not v.children and v.state == READY:
                    # Fast path for the common case (one-tier daemon, trace replay): a
                    # leaf whose only copy is in the last tier leaves the hierarchy.
                    # Same effect as _evict (_remove_copy + _forget), inlined.
                    locs = v.locs
                    freed.append(locs[t])  # handles freed once per round
                    locs[t] = None
                    on_remove(v)
                    v.top = -1
                    p = v.parent
                    if p is not None:
                        p.kid_tops[t] -= 1
                        if p.children is not None:
                            p.children.discard(v)
                        v.parent = None
                    key = v.key
                    if index.get(key) is v:
                        del index[key]
                        ready.pop(key, None)
                    dropped += 1
                elif not evict(v, t):
                    skip.add(v)
                    continue
                gone += 1
                need -= v.nbytes
                if need <= 0:
                    break
            c.evictions_by_tier[t] += dropped
            c.dropped += dropped
            tier.free_many(freed)
            freed.clear()
            h = reserve(nbytes, e)
            if gone == 0:
                break
            count = 1  # room was made for all: a failed reserve only retries this one
        skip.clear()
        return h

    def _evictable_pred(self, t: int) -> Callable[[BlockEntry], bool]:
        """``evictable`` for tier ``t``, minus ``_skips[t]``: the policies' predicate.
        Built once per level: it runs once per entry a policy scans (the hottest call)."""
        skip, ready, stop = self._skips[t], READY, t + 1

        def ok0(v: BlockEntry) -> bool:
            if v.state != ready or v.pins or v in skip:
                return False
            return v.top < 0 or not v.kid_tops[0]

        def ok(v: BlockEntry) -> bool:
            if v.state != ready or v.pins or v in skip:
                return False
            return v.top < t or not any(v.kid_tops[:stop])

        return ok0 if t == 0 else ok

    def _evict(self, v: BlockEntry, t: int) -> bool:
        """Move ``v`` out of tier ``t`` (demote or drop).  False if it must stay."""
        locs = v.locs
        has_lower = False
        for u in range(t + 1, self.n):
            if locs[u] is not None:
                has_lower = True
                break
        if v.top == t and not has_lower:
            nxt = t + 1
            must_keep = bool(v.children)
            demoted = False
            if nxt < self.n and (must_keep or self.levels[nxt].admission.admit(v)):
                demoted = self._copy_down(v, t, nxt)
            if not demoted and must_keep:
                return False
        self.counters.evictions_by_tier[t] += 1
        self._remove_copy(v, t)
        if v.top == -1:
            self._forget(v)
            self.counters.dropped += 1
        return True

    def _copy_down(self, v: BlockEntry, t: int, nxt: int) -> bool:
        h2 = self._make_room(nxt, v.nbytes, v)
        if h2 is None:
            return False
        src_t, dst_t = self.levels[t].tier, self.levels[nxt].tier
        try:
            copy_block(v, src_t, v.locs[t], dst_t, h2)
        except (ChecksumMismatch, TierIOError) as exc:
            dst_t.free(h2)
            self._note_io_error(exc)
            return False
        v.locs[nxt] = h2
        self.levels[nxt].policy.on_insert(v)
        self.counters.demotions += 1
        return True

    def _note_io_error(self, exc: Exception) -> None:
        if isinstance(exc, ChecksumMismatch):
            self.counters.checksum_failures += 1
        else:
            self.counters.io_errors += 1

    # ------------------------------------------------------------------ bookkeeping
    def _set_loc(self, e: BlockEntry, t: int, h: Handle) -> None:
        e.locs[t] = h
        if e.top == -1 or t < e.top:
            self._set_top(e, t)

    def _remove_copy(self, e: BlockEntry, t: int) -> None:
        h = e.locs[t]
        if h is None:
            return
        e.locs[t] = None
        if e.state == READY:
            self.levels[t].policy.on_remove(e)
        self.levels[t].tier.free(h)
        if e.top == t:
            new = -1
            for u in range(t + 1, self.n):
                if e.locs[u] is not None:
                    new = u
                    break
            self._set_top(e, new)

    def _set_top(self, e: BlockEntry, new: int) -> None:
        old = e.top
        if old == new:
            return
        e.top = new
        p = e.parent
        if p is not None:
            if old >= 0:
                p.kid_tops[old] -= 1
            if new >= 0:
                p.kid_tops[new] += 1

    def _link(self, e: BlockEntry) -> None:
        p = e.parent
        if p is not None:
            if p.children is None:
                p.children = set()
            p.children.add(e)

    def _unlink(self, e: BlockEntry) -> None:
        p = e.parent
        if p is not None and p.children is not None:
            p.children.discard(e)
            if e.top >= 0:
                p.kid_tops[e.top] -= 1

    def _forget(self, e: BlockEntry) -> None:
        """Remove ``e`` from the index (no copies left).  Orphans its children."""
        self._unlink(e)
        e.parent = None
        if e.children:
            for c in e.children:
                c.parent = None
            e.children = None
        if self.index.get(e.key) is e:
            del self.index[e.key]
            self.ready.pop(e.key, None)

    def _drop_all(self, e: BlockEntry) -> None:
        for t in range(self.n):
            self._remove_copy(e, t)
        self._forget(e)

    # ------------------------------------------------------------------ lifecycle
    def recover(self) -> int:
        """Rebuild entries from persistent tiers (after a restart).  Returns the count."""
        n = 0
        for t, lv in enumerate(self.levels):
            if not lv.tier.persistent:
                continue
            found = sorted(lv.tier.recover(), key=lambda r: r.depth)
            for rb in found:
                e = self.index.get(rb.key)
                if e is None:
                    parent = self.index.get(rb.parent) if rb.parent else None
                    e = BlockEntry(
                        key=rb.key,
                        ns=rb.ns,
                        nbytes=rb.nbytes,
                        parent=parent,
                        depth=rb.depth,
                        locs=[None] * self.n,
                        kid_tops=[0] * self.n,
                        state=READY,
                        checksum=rb.checksum,
                    )
                    self.index[rb.key] = self.ready[rb.key] = e
                    self._link(e)
                    n += 1
                if e.locs[t] is None:
                    self._set_loc(e, t, rb.handle)
                    lv.policy.on_insert(e)
        return n

    def persist_all(self) -> int:
        """Copy every committed block that lives only in volatile tiers down to the first
        persistent tier (``--persist-on-shutdown``).  Returns how many were written."""
        pt = next((t for t, lv in enumerate(self.levels) if lv.tier.persistent), None)
        if pt is None:
            return 0
        n = 0
        for e in sorted(self.index.values(), key=lambda x: x.depth):
            if e.state != READY or e.locs[pt] is not None or e.top < 0 or e.top > pt:
                continue
            if self._copy_down(e, e.top, pt):
                n += 1
        self.levels[pt].tier.flush()  # durable before the daemon exits
        return n

    def resident_blocks(self, t: int) -> int:
        return len(self.levels[t].policy)

    def stats(self) -> dict[str, object]:
        c = self.counters
        return {
            "blocks": len(self.index),
            "counters": {k: getattr(c, k) for k in c.__slots__},  # type: ignore[attr-defined]
            "tiers": [
                {**lv.tier.stats(), "blocks": len(lv.policy), "policy": lv.policy.name}
                for lv in self.levels
            ],
        }
