"""Hierarchy invariants over byte-less tiers: tail-first, demotion, pins, all-or-nothing."""

from __future__ import annotations

import pytest

from kvstore.hierarchy import Hierarchy, Level, Status
from kvstore.keys import Namespace
from kvstore.policies import POLICIES
from kvstore.tiers.base import NullTier

NS = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=4, block_tokens=4)
B = 100  # bytes per block in these tests


def chain(seed: int, n: int) -> list[bytes]:
    return NS.block_keys(list(range(seed * 1000, seed * 1000 + 4 * n)))


def make(caps: list[int], policy: str = "lru", admission: str = "always") -> Hierarchy:
    return Hierarchy(
        [
            Level.build(NullTier(f"t{i}", c * B), policy, admission, block_hint=B)
            for i, c in enumerate(caps)
        ]
    )


def put(h: Hierarchy, keys: list[bytes], owner: int = 1) -> list[Status]:
    st, _ = h.allocate(owner, NS.digest(), B, None, keys)
    new = [k for k, s in zip(keys, st, strict=True) if s == Status.NEW]
    h.commit(owner, new, [0] * len(new))
    return st


@pytest.mark.parametrize("policy", POLICIES.names())
def test_tail_first_single_tier(policy: str) -> None:
    h = make([4], policy)
    a = chain(1, 3)
    put(h, a)
    b = chain(2, 3)
    # Needs 2 evictions from chain a: its tail, never its head first.
    assert put(h, b) == [Status.NEW] * 3
    cached = h.lookup(a)
    assert len(cached) == 1
    for k in a[len(cached) :]:
        assert h.get(k) is None
    # Every cached block's parent is cached.
    for e in h.index.values():
        if e.parent is not None:
            assert e.parent.key in h.index


@pytest.mark.parametrize("policy", POLICIES.names())
def test_demotion_keeps_blocks(policy: str) -> None:
    h = make([2, 100], policy)
    keys = [k for i in range(10) for k in chain(i, 2)]
    for i in range(10):
        assert Status.NO_SPACE not in put(h, chain(i, 2))
    assert all(h.get(k) is not None for k in keys)
    assert h.levels[0].tier.used_bytes <= 2 * B
    # Acquire promotes back into tier 0.
    st, ents = h.acquire(chain(0, 2))
    assert st == [Status.OK, Status.OK]
    assert all(e is not None and e.top == 0 for e in ents)
    h.release([e for e in ents if e is not None])


def test_pinned_never_evicted_and_no_space_is_value() -> None:
    h = make([2])
    a = chain(1, 2)
    put(h, a)
    st, ents = h.acquire(a)
    assert st == [Status.OK, Status.OK]
    st2 = put(h, chain(2, 1))
    assert st2 == [Status.NO_SPACE]
    assert h.levels[0].tier.used_bytes == 2 * B
    h.release([e for e in ents if e is not None])
    assert put(h, chain(2, 1)) == [Status.NEW]


def test_allocate_all_or_nothing() -> None:
    h = make([3])
    a = chain(1, 2)
    put(h, a)
    h.acquire(a)
    st = put(h, chain(2, 2))  # only one slot free: nothing reserved
    assert st == [Status.NO_SPACE, Status.NO_SPACE]
    assert h.levels[0].tier.used_bytes == 2 * B
    assert h.get(chain(2, 2)[0]) is None


def test_pending_invisible_and_owner_checks() -> None:
    h = make([8])
    a = chain(1, 2)
    st, _ = h.allocate(7, NS.digest(), B, None, a)
    assert st == [Status.NEW, Status.NEW]
    assert h.lookup(a) == []
    st2, _ = h.allocate(8, NS.digest(), B, None, a)
    assert st2 == [Status.IN_PROGRESS, Status.IN_PROGRESS]
    assert h.commit(8, a, [0, 0]) == [Status.NOT_OWNER, Status.NOT_OWNER]
    assert h.commit(7, a, [0, 0]) == [Status.OK, Status.OK]
    assert h.commit(7, a, [0, 0]) == [Status.ALREADY_COMMITTED] * 2
    assert len(h.lookup(a)) == 2
    assert h.commit(7, [b"\0" * 32], [0]) == [Status.NOT_FOUND]


def test_abort_frees_room() -> None:
    h = make([2])
    a = chain(1, 2)
    h.allocate(7, NS.digest(), B, None, a)
    assert h.lookup(a) == [] and not h.ready  # pending blocks are invisible
    assert h.abort(7, a) == 2
    assert h.levels[0].tier.used_bytes == 0
    assert not h.index


def test_delete_chain_any_order() -> None:
    h = make([8])
    a = chain(1, 3)
    put(h, a)
    assert h.delete([a[0]]) == [Status.HAS_CHILDREN]
    assert h.delete(list(reversed(a))) == [Status.OK] * 3
    assert not h.index and not h.ready and h.levels[0].tier.used_bytes == 0
    assert h.lookup(a) == []


def test_dedup_present() -> None:
    h = make([8])
    a = chain(1, 2)
    put(h, a)
    assert put(h, a, owner=2) == [Status.PRESENT, Status.PRESENT]
    assert h.levels[0].tier.used_bytes == 2 * B
