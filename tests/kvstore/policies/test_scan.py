"""``scan`` / ``look_ahead`` against the straightforward single-loop scan they replace."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable

import pytest

from kvstore.policies._util import LOOKAHEAD, look_ahead, scan


def reference_scan(
    queue: OrderedDict[int, None],
    n: int,
    evictable: Callable[[int], bool],
    out: list[int],
    limit: int = -1,
) -> None:
    """The scan as first written: one loop, a flag for the rotation phase."""
    if len(out) >= n:
        return
    skipped: list[int] = []
    rotate = not out
    ahead = 0
    for e in queue:
        if evictable(e):
            out.append(e)
            if len(out) >= n:
                break
            rotate = False
        elif rotate:
            skipped.append(e)
            if len(skipped) == limit:
                break
        else:
            ahead += 1
            if ahead > LOOKAHEAD:
                break
    for e in skipped:
        queue.move_to_end(e)


@pytest.mark.parametrize("seed", range(40))
def test_scan_matches_the_single_loop(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        size = rng.randint(0, 30)
        ok = {i for i in range(size) if rng.random() < rng.choice((0.05, 0.3, 0.8))}
        n = rng.randint(1, 5)
        limit = rng.choice((-1, 1, 3, 8))
        pre = [1000 + i for i in range(rng.choice((0, 0, 1, 2)))]
        q1: OrderedDict[int, None] = OrderedDict.fromkeys(range(size))
        q2 = OrderedDict(q1)
        out1, out2 = list(pre), list(pre)
        scan(q1, n, ok.__contains__, out1, limit)
        reference_scan(q2, n, ok.__contains__, out2, limit)
        assert out1 == out2
        assert list(q1) == list(q2)


def test_look_ahead_excludes_named_entries() -> None:
    q = OrderedDict.fromkeys(range(10))
    out = [0]
    # 0 is named already, 1 is not evictable: both count as misses; 2 and 3 are found.
    look_ahead(iter(q), 3, lambda e: e != 1, out, {0})
    assert out == [0, 2, 3]
    out = [0]
    look_ahead(iter(q), 9, lambda e: False, out, {0})
    assert out == [0]  # stops after LOOKAHEAD + 1 misses, at the end at the latest
