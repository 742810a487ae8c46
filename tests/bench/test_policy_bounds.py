"""The idealised window + main bound used in bench/results/policies.md."""

from __future__ import annotations

from bench import policy_bounds as pb
from bench import trace_replay as tr


def test_oracle_main_bounds_lru_main() -> None:
    trace = tr.synthetic_trace(600, seed=5)
    cap = tr.capacity_of(trace, 0.05)
    lru = pb.two_segment_hits(trace, cap, max(1, cap // 50), oracle_main=False)
    oracle = pb.two_segment_hits(trace, cap, max(1, cap // 50), oracle_main=True)
    assert 0 < lru <= oracle <= tr.infinite_hits(trace)
    # An unbounded cache lets the two designs agree.
    big = tr.unique_blocks(trace)
    assert pb.two_segment_hits(trace, big, big, False) == tr.infinite_hits(trace)


def test_sampled_segment_reduces_to_the_two_segment_cache() -> None:
    trace = tr.synthetic_trace(600, seed=5)
    cap = tr.capacity_of(trace, 0.05)
    w = max(1, cap // 50)
    base = pb.two_segment_hits(trace, cap, w, oracle_main=False)
    # Nothing sampled, or no room for the segment: the same cache as without it.
    assert pb.sampled_hits(trace, cap, w, sample=0.0, share=0.2) == base
    assert pb.sampled_hits(trace, cap, w, sample=0.5, share=0.0) == base
    # Everything sampled: a valid count, bounded by the infinite cache.
    assert 0 < pb.sampled_hits(trace, cap, w, sample=1.0, share=0.5) <= tr.infinite_hits(trace)
