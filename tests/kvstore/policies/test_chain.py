"""``chain``: its hot paths are inlined copies of one another; they must stay alike."""

from __future__ import annotations

import copy
import random

import pytest

from kvstore.entry import READY, BlockEntry
from kvstore.policies.chain import ChainPolicy


def entry(i: int, parent: BlockEntry | None = None) -> BlockEntry:
    e = BlockEntry(
        key=i.to_bytes(32, "big"),
        ns=b"n",
        nbytes=1,
        parent=parent,
        depth=parent.depth + 1 if parent else 0,
        locs=[None],
        kid_tops=[0],
        state=READY,
    )
    if parent is not None:
        parent.children = (parent.children or set()) | {e}
    return e


def state(p: ChainPolicy) -> tuple[object, ...]:
    """Everything the policy decides by, with entries as their keys."""
    return (
        [[(e.key, m) for e, m in seg.items()] for seg in p._segs],
        list(p._history.items()),
        p._dist,
        p._clock,
        p._now,
        p._refs,
        p._window,
        p._lru_mode,
        p.capacity_blocks,
        p._hist_limit,
    )


def test_a_reuse_is_the_same_through_on_access_and_through_the_history() -> None:
    """on_access and on_insert_many (a block back from the history) share one rule."""
    a, b = ChainPolicy(64), ChainPolicy(64)
    for p in (a, b):
        p.on_insert_many([entry(i) for i in range(10)])
    x_a, x_b = entry(100), entry(100)
    a.on_insert(x_a)
    b.on_insert(x_b)
    for p in (a, b):
        p.on_insert_many([entry(i) for i in range(10, 15)])
    a.on_access(x_a)  # a reuse while resident ...
    b.on_remove(x_b)  # ... and one after it left: the same distances and placement
    b.on_insert(entry(100))
    assert [list(s.values()) for s in a._segs] == [list(s.values()) for s in b._segs]
    assert a._dist == b._dist
    assert (a._clock, a._now, a._refs) == (b._clock, b._now, b._refs)


def test_first_reference_goes_to_the_window_unless_a_branch_point() -> None:
    p = ChainPolicy(64)
    root = entry(0)
    entry(1, root)
    p.on_insert(root)
    assert root in p._segs[0]
    branch = entry(2)
    entry(3, branch)
    entry(4, branch)
    p.on_insert(branch)
    assert branch in p._segs[1]
    assert p._segs[1][branch][1] == 1  # still referenced once


@pytest.mark.parametrize("seed", range(4))
def test_stream_victims_names_what_victims_1_names(seed: int) -> None:
    """stream_victims inlines _cold_ends: one victim at a time it must agree with
    victims(1, ...) (compared on a copy, in the same state), LRU mode included."""
    rng = random.Random(seed)
    hint = rng.choice([8, 40, 200])  # a hint off by 5x on either side is rescaled
    p = ChainPolicy(hint)
    blocked: set[bytes] = set()

    def evictable(e: BlockEntry) -> bool:
        return e.key not in blocked

    resident: list[BlockEntry] = []
    keys = list(range(120))
    for step in range(3000):
        op = rng.random()
        if op < 0.5 or len(resident) < 10:
            k = rng.choice(keys)
            if all(e.key != k.to_bytes(32, "big") for e in resident):
                e = entry(k)
                if rng.random() < 0.1:  # a few branch points
                    entry(1000 + step, e)
                    entry(2000 + step, e)
                p.on_insert(e)
                resident.append(e)
        elif op < 0.75:
            p.on_access(rng.choice(resident))
        else:
            blocked = {e.key for e in resident if rng.random() < 0.3}
            twin = copy.deepcopy(p)
            want = twin.victims(1, evictable)
            got = next(p.stream_victims(evictable), None)
            assert [e.key for e in want] == ([got.key] if got is not None else [])
            assert state(twin) == state(p)
            if got is not None:
                p.on_remove(got)
                resident.remove(got)
        if step % 500 == 0:
            p._lru_mode = not p._lru_mode  # both modes, whatever the trace measured


def test_rescale_bounds_are_the_observed_capacity_rule() -> None:
    """``_held_min`` / ``_held_max`` stand for ``2 * held < cap or held > 2 * cap``."""
    for cap in range(1, 70):
        p = ChainPolicy(cap)
        for held in range(0, 3 * cap + 2):
            off = held < p._held_min or held > p._held_max
            assert off == (2 * held < cap or held > 2 * cap), (cap, held)


def test_the_window_grows_at_most_twofold_per_period_and_shrinks_at_once() -> None:
    """A larger split is approached by doubling (growing evicts reused blocks from
    main at once); a smaller split, or LRU mode and back, is taken at once."""
    p = ChainPolicy(64 * 32)  # width 64 blocks, window floor 32
    start = p._window
    sizes = []
    for _ in range(7):
        # Every period: window reuses at every distance below 30/32 of the tier.
        p._dist[0][:30] = [100.0] * 30
        p._resize()
        sizes.append(p._window)
    assert sizes == [2 * start, 4 * start, 8 * start, 16 * start, 32 * start, 30 * 64, 30 * 64]
    assert not p._lru_mode
    p._dist[0][:] = [0.0] * len(p._dist[0])
    p._dist[1][:] = [0.0] * len(p._dist[1])
    p._dist[1][0] = 100.0  # only main reuses now: the smallest window, at once
    p._resize()
    assert p._window == start
    p._dist[2][0] = 1000.0  # a plain LRU of the tier would hit more: LRU mode at once
    p._resize()
    assert p._lru_mode and p._window == p.capacity_blocks
    p._dist[2][0] = 0.0
    p._dist[1][0] = 100.0  # and back to the smallest window at once
    p._resize()
    assert not p._lru_mode and p._window == start
