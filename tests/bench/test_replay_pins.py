"""Pins the exact hit counts of every policy, so speed work cannot change decisions.

The figures were recorded before the replay and hierarchy were optimised (commit
7ae4699): any change to which blocks are evicted, demoted or promoted shows here.
Re-recorded when eviction moved to ``stream_victims`` (room for a whole allocation in
one pass; ``lru`` and ``chain`` pick one victim at a time, the others in batches of 4),
and ``chain``'s again when its window came to grow at most twofold per period (a
policy change, not speed work).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import trace_replay as tr
from kvstore.policies import POLICIES

FRACTIONS = (0.02, 0.05, 0.10)

# policy -> hits at 2 / 5 / 10 % of the unique blocks
SYNTH_HITS = {
    "arc": (6436, 7213, 8856),
    "chain": (6945, 7362, 8971),
    "lfu": (6436, 7182, 8927),
    "lru": (6464, 7142, 8985),
    "s3fifo": (6802, 7703, 9662),
}
REAL_HITS = {
    "arc": (9876, 18839, 32455),
    "chain": (15666, 23599, 33100),
    "lfu": (8162, 17493, 31697),
    "lru": (8480, 17995, 31781),
    "s3fifo": (14915, 24674, 32151),
}
# (policy, NVMe admission) -> (hits by tier, promotions, demotions, dropped), DRAM 2%
# + NVMe 10%, synthetic trace
SYNTH_TWO_TIER = {
    ("lru", "always"): ([6486, 3142], 3123, 21456, 18684),
    ("chain", "always"): ([6688, 2918], 2915, 22446, 18741),
    ("lru", "seen-twice"): ([6473, 2622], 2622, 4355, 19204),
    ("chain", "seen-twice"): ([6606, 2462], 2462, 4392, 19231),
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
