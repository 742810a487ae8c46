"""Admission policies: seen-twice alone and inside a two-tier hierarchy."""

from __future__ import annotations

import pytest

from kvstore.entry import READY, BlockEntry
from kvstore.hierarchy import Hierarchy, Level, Status
from kvstore.keys import Namespace
from kvstore.policies import ADMISSIONS
from kvstore.policies.seen_twice import SeenTwiceAdmission
from kvstore.tiers.base import NullTier

NS = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=4, block_tokens=4)
B = 100


def entry(i: int) -> BlockEntry:
    return BlockEntry(
        key=i.to_bytes(32, "big"),
        ns=b"n",
        nbytes=B,
        parent=None,
        depth=0,
        locs=[None, None],
        kid_tops=[0, 0],
        state=READY,
    )


def test_registered() -> None:
    assert {"always", "seen-twice"} <= set(ADMISSIONS.names())


def test_seen_twice_admits_only_after_two_references() -> None:
    a = SeenTwiceAdmission(10)
    e = entry(1)
    assert not a.admit(e)
    a.on_reference(e)
    assert not a.admit(e)
    a.on_reference(e)
    assert a.admit(e)


def test_seen_twice_memory_is_bounded() -> None:
    a = SeenTwiceAdmission(10)
    for i in range(1000):
        a.on_reference(entry(i))
    assert len(a) <= a.limit == 20
    # The oldest keys were forgotten: referencing one again counts from one.
    a.on_reference(entry(0))
    assert not a.admit(entry(0))
    # Recent keys are remembered.
    a.on_reference(entry(999))
    assert a.admit(entry(999))


def _two_tier(admission: str) -> Hierarchy:
    return Hierarchy(
        [
            Level.build(NullTier("dram", 2 * B), "lru", "always", block_hint=B),
            Level.build(NullTier("nvme", 100 * B), "lru", admission, block_hint=B),
        ]
    )


def _put(h: Hierarchy, keys: list[bytes]) -> None:
    st, _ = h.allocate(1, NS.digest(), B, None, keys)
    new = [k for k, s in zip(keys, st, strict=True) if s == Status.NEW]
    h.commit(1, new, [0] * len(new))


@pytest.mark.parametrize("admission", ["always", "seen-twice"])
def test_one_off_blocks_do_not_reach_nvme_unless_always(admission: str) -> None:
    h = _two_tier(admission)
    once = [NS.block_keys(list(range(s * 100, s * 100 + 4)))[0] for s in range(10)]
    for k in once:
        _put(h, [k])
    in_nvme = sum(1 for k in once if (e := h.get(k)) is not None and e.locs[1] is not None)
    if admission == "always":
        assert in_nvme == 8  # two still in DRAM, the rest demoted
    else:
        assert in_nvme == 0
        assert h.counters.dropped == 8


def test_seen_twice_admits_reused_chains() -> None:
    h = _two_tier("seen-twice")
    hot = NS.block_keys(list(range(8)))  # a chain of two blocks
    _put(h, hot)
    assert len(h.lookup(hot)) == 2  # second reference of both
    for s in range(5):
        _put(h, [NS.block_keys(list(range(5000 + 100 * s, 5000 + 100 * s + 4)))[0]])
    for k in hot:  # demoted, parent and child
        e = h.get(k)
        assert e is not None and e.top == 1
    assert len(h.lookup(hot)) == 2
