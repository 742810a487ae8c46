"""The replay floor makes the same decisions as ``lru`` through the hierarchy."""

from __future__ import annotations

import pytest

from bench import trace_replay as tr
from bench.replay_floor import fused_lru_replay


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2, 1.0])
def test_floor_hits_equal_lru_replay(fraction: float) -> None:
    trace = tr.synthetic_trace(1500, seed=3)
    keyed = [[tr.key_of(h) for h in ids] for ids in trace]
    hits, refs, seconds = fused_lru_replay(keyed, tr.capacity_of(trace, fraction))
    want = tr.run_one(trace, "lru", fraction)
    assert (hits, refs) == (want.hits, want.refs)
    assert seconds > 0


def test_floor_with_a_capacity_smaller_than_a_chain() -> None:
    # A chain longer than the cache: the floor, like the hierarchy, inserts nothing
    # of it (all or nothing) and stays consistent for the next requests.
    trace = [[1, 2, 3, 4, 5], [1, 2], [1, 2, 3], [6, 7]]
    keyed = [[tr.key_of(h) for h in ids] for ids in trace]
    got = fused_lru_replay(keyed, 3)[:2]
    h = tr.build_hierarchy("lru", 3)
    want = tr.replay(trace, h)
    assert got == (want.hits, want.refs)
