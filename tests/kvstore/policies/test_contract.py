"""One contract suite run over every registered eviction policy."""

from __future__ import annotations

import random
import time

import pytest

from kvstore.entry import READY, BlockEntry
from kvstore.hierarchy import Hierarchy, Level, Status
from kvstore.keys import Namespace
from kvstore.policies import ADMISSIONS, DEFAULT_POLICY, POLICIES, EvictionPolicy
from kvstore.tiers.base import NullTier

NS = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=4, block_tokens=4)
B = 100


def entry(i: int, parent: BlockEntry | None = None) -> BlockEntry:
    return BlockEntry(
        key=i.to_bytes(32, "big"),
        ns=b"n",
        nbytes=B,
        parent=parent,
        depth=parent.depth + 1 if parent else 0,
        locs=[None],
        kid_tops=[0],
        state=READY,
    )


def make_policy(name: str, cap: int = 64) -> EvictionPolicy:
    return POLICIES.get(name)(cap)


ALL = POLICIES.names()


def test_registry_lists_the_issue_policies() -> None:
    assert {"lru", "lfu", "s3fifo", "arc", "chain"} <= set(ALL)
    assert DEFAULT_POLICY in ALL


@pytest.mark.parametrize("name", ALL)
def test_bookkeeping(name: str) -> None:
    p = make_policy(name)
    es = [entry(i) for i in range(10)]
    for e in es:
        p.on_insert(e)
    assert len(p) == 10
    for e in es[:5]:
        p.on_access(e)
    assert len(p) == 10
    p.on_remove(es[3])
    assert len(p) == 9
    p.on_remove(es[3])  # a second removal is harmless
    assert len(p) == 9
    assert es[3] not in p.victims(10, lambda e: True)
    for e in es:
        p.on_remove(e)
    assert len(p) == 0
    assert p.victims(3, lambda e: True) == []


@pytest.mark.parametrize("name", ALL)
def test_victims_respect_evictable_and_do_not_mutate(name: str) -> None:
    p = make_policy(name)
    es = [entry(i) for i in range(50)]
    for e in es:
        p.on_insert(e)
    for e in es[::3]:
        p.on_access(e)
    protected = set(es[::2])
    for n in (1, 4, 30):
        v = p.victims(n, lambda e: e not in protected)
        assert 1 <= len(v) <= n  # fewer than n is allowed, none is not
        assert not set(v) & protected
        assert len(set(v)) == len(v)
        assert len(p) == 50  # naming victims changes nothing resident
    # Asking repeatedly (as the hierarchy does) reaches every evictable entry.
    named: set[BlockEntry] = set()
    for _ in range(50):
        v = p.victims(4, lambda e: e not in protected and e not in named)
        if not v:
            break
        named.update(v)
    assert named == set(es) - protected
    assert p.victims(5, lambda e: False) == []
    assert len(p) == 50


@pytest.mark.parametrize("name", ALL)
def test_many_non_evictable_entries_stay_fast(name: str) -> None:
    n = 20_000
    p = make_policy(name, n)
    es = [entry(i) for i in range(n)]
    for e in es:
        p.on_insert(e)
    free = set(es[-200:])  # the hottest few only
    t0 = time.perf_counter()
    got: list[BlockEntry] = []
    for i in range(200):
        v = p.victims(1 + i % 4, lambda e: e in free and e not in got)
        assert v and v[0] in free
        got.append(v[0])
    # 200 victims among 20k entries: without rotation this is 4M predicate calls.
    assert time.perf_counter() - t0 < 2.0
    assert p.victims(1, lambda e: e in free and e not in got) == []


def _hierarchy(name: str, cap_blocks: int, hint: int | None = None) -> Hierarchy:
    hint = cap_blocks if hint is None else hint
    pol = POLICIES.get(name)(hint)  # the size hint may be wrong: blocks of any size
    return Hierarchy([Level(NullTier("t0", cap_blocks * B), pol, ADMISSIONS.get("always")(hint))])


@pytest.mark.parametrize("hint", [40, 2, 640], ids=["right-hint", "hint-too-small", "hint-too-big"])
@pytest.mark.parametrize("name", ALL)
def test_through_hierarchy_tail_first_and_capacity(name: str, hint: int) -> None:
    rng = random.Random(7)
    cap = 40
    h = _hierarchy(name, cap, hint)
    roots = [NS.block_keys(list(range(s * 10_000, s * 10_000 + 4 * 12))) for s in range(30)]
    for _ in range(400):
        chain = roots[rng.randrange(len(roots))][: rng.randint(1, 12)]
        found = h.lookup(chain)
        k = len(found)
        pinned: list[BlockEntry] = []
        if k:
            st, got = h.acquire(chain[:k])
            assert st == [Status.OK] * k
            pinned = [e for e in got if e is not None]
        if k < len(chain):
            st, _ = h.allocate(1, NS.digest(), B, chain[k - 1] if k else None, chain[k:], k)
            new = [kk for kk, s in zip(chain[k:], st, strict=True) if s == Status.NEW]
            h.commit(1, new, [0] * len(new))
        h.release(pinned)
        assert h.levels[0].tier.used_bytes <= cap * B
        assert len(h.levels[0].policy) == len(h.index) <= cap
        # Lookup's fast path reads ``ready``: exactly the committed entries of the index.
        assert h.ready == {k: e for k, e in h.index.items() if e.state == READY}
        for e in h.index.values():  # prefix-closed: every cached block's parent is cached
            if e.depth > 0:
                assert e.parent is not None and h.index.get(e.parent.key) is e.parent
    assert h.counters.evictions_by_tier[0] > 0


@pytest.mark.parametrize("name", ALL)
def test_pinned_chain_is_never_named(name: str) -> None:
    h = _hierarchy(name, 8)
    a = NS.block_keys(list(range(4 * 6)))
    st, _ = h.allocate(1, NS.digest(), B, None, a)
    h.commit(1, a, [0] * len(a))
    _, got = h.acquire(a)
    b = NS.block_keys(list(range(1000, 1000 + 4 * 3)))
    st, _ = h.allocate(1, NS.digest(), B, None, b)
    assert st == [Status.NO_SPACE] * 3  # room for 2 of 3 blocks: all or nothing
    assert all(h.get(k) is not None for k in a)
    h.release([e for e in got if e is not None])


def _fed_pair(name: str) -> tuple[list[EvictionPolicy], list[BlockEntry], set[BlockEntry]]:
    """Two policies fed alike with 60 entries (some chained), and a protected set."""
    rng = random.Random(3)
    ps = [make_policy(name, 40), make_policy(name, 40)]
    roots: list[BlockEntry] = []
    es: list[BlockEntry] = []
    for i in range(60):
        parent = rng.choice(roots) if roots and rng.random() < 0.5 else None
        e = entry(i, parent)
        (roots if parent is None else es).append(e)
        for p in ps:
            p.on_insert(e)
    for e in rng.sample(roots + es, 30):
        for p in ps:
            p.on_access(e)
    return ps, roots + es, set(rng.sample(roots + es, 15))


@pytest.mark.parametrize("name", ALL)
def test_stream_victims_drains_every_evictable_entry(name: str) -> None:
    ps, everything, protected = _fed_pair(name)
    p = ps[0]
    gone: set[BlockEntry] = set()

    def ok(e: BlockEntry) -> bool:
        return e not in protected and e not in gone

    for v in p.stream_victims(ok):
        assert ok(v)  # evictable when yielded, never twice
        p.on_remove(v)
        gone.add(v)
    assert gone == set(everything) - protected
    assert len(p) == len(protected)


OWN_STREAM = [n for n in ALL if POLICIES.get(n).stream_victims is not EvictionPolicy.stream_victims]


@pytest.mark.parametrize("name", OWN_STREAM)
def test_own_stream_victims_matches_victims_of_one(name: str) -> None:
    # One policy asked victims(1) again after each removal, the other's stream read
    # one victim at a time, each removed before the next: the same victims.
    ps, everything, protected = _fed_pair(name)
    gone: set[BlockEntry] = set()

    def ok(e: BlockEntry) -> bool:
        return e not in protected and e not in gone

    got: list[list[BlockEntry]] = [[], []]
    while v := ps[0].victims(1, ok):
        got[0].append(v[0])
        ps[0].on_remove(v[0])
        gone.add(v[0])
    gone.clear()
    for v2 in ps[1].stream_victims(ok):
        got[1].append(v2)
        ps[1].on_remove(v2)
        gone.add(v2)
    assert got[0] == got[1]
    assert set(got[0]) == set(everything) - protected


@pytest.mark.parametrize("name", ALL)
def test_on_insert_many_matches_on_insert(name: str) -> None:
    rng = random.Random(5)
    ps = [make_policy(name, 30), make_policy(name, 30)]
    live: list[BlockEntry] = []
    for step in range(40):
        # Chains of fresh entries, some with keys seen before (policies with a history).
        chain = [entry(rng.randrange(200)) for _ in range(rng.randint(1, 6))]
        chain = [e for e in chain if all(x.key != e.key for x in live)]
        chain = list({e.key: e for e in chain}.values())
        for e in chain:
            ps[0].on_insert(e)
        ps[1].on_insert_many(chain)
        live += chain
        for e in rng.sample(live, min(3, len(live))):
            for p in ps:
                p.on_access(e)
        while len(live) > 25:
            v = ps[0].victims(1, lambda e: True)
            assert v == ps[1].victims(1, lambda e: True)
            for p in ps:
                p.on_remove(v[0])
            live.remove(v[0])
        assert len(ps[0]) == len(ps[1]) == len(live), step
