"""Pins the exact hit counts of every policy, so speed work cannot change decisions.

The figures were recorded before the replay and hierarchy were optimised (commit
7ae4699): any change to which blocks are evicted, demoted or promoted shows here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import trace_replay as tr
from kvstore.policies import POLICIES

FRACTIONS = (0.02, 0.05, 0.10)

# policy -> hits at 2 / 5 / 10 % of the unique blocks
SYNTH_HITS = {
    "arc": (6435, 7209, 8852),
    "chain": (6448, 7240, 8940),
    "lfu": (6435, 7181, 8927),
    "lru": (6460, 7140, 8984),
    "s3fifo": (6800, 7705, 9689),
}
REAL_HITS = {
    "arc": (9876, 18571, 32459),
    "chain": (14025, 22847, 33029),
    "lfu": (8161, 17490, 31693),
    "lru": (8471, 17996, 31803),
    "s3fifo": (14881, 24652, 32153),
}
# (policy, NVMe admission) -> (hits by tier, promotions, demotions, dropped), DRAM 2%
# + NVMe 10%, synthetic trace
SYNTH_TWO_TIER = {
    ("lru", "always"): ([6479, 3153], 3131, 21453, 18682),
    ("chain", "always"): ([6480, 3186], 3157, 21304, 18647),
    ("lru", "seen-twice"): ([6469, 2626], 2626, 4359, 19204),
    ("chain", "seen-twice"): ([6549, 2518], 2518, 4400, 19232),
}


@pytest.fixture(scope="module")
def synth() -> tr.Trace:
    return tr.synthetic_trace(2000, seed=0)


def test_every_policy_is_pinned() -> None:
    assert set(SYNTH_HITS) == set(REAL_HITS) == set(POLICIES.names())


@pytest.mark.parametrize("name", sorted(SYNTH_HITS))
def test_synthetic_hits_unchanged(name: str, synth: tr.Trace) -> None:
    got = tuple(tr.run_one(synth, name, f).hits for f in FRACTIONS)
    assert got == SYNTH_HITS[name]


@pytest.mark.parametrize(("name", "admission"), sorted(SYNTH_TWO_TIER))
def test_synthetic_two_tier_unchanged(name: str, admission: str, synth: tr.Trace) -> None:
    h = tr.build_hierarchy(
        name,
        tr.capacity_of(synth, 0.02),
        tr.capacity_of(synth, 0.10),
        nvme_admission=admission,
    )
    r = tr.replay(synth, h)
    c = h.counters
    assert (r.hits_by_tier, c.promotions, c.demotions, c.dropped) == SYNTH_TWO_TIER[
        (name, admission)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_HITS))
def test_mooncake_hits_unchanged(name: str, mooncake_trace: Path) -> None:
    trace = tr.load_trace(mooncake_trace)
    got = tuple(tr.run_one(trace, name, f).hits for f in FRACTIONS)
    assert got == REAL_HITS[name]
