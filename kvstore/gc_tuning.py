"""Garbage-collector settings of the daemon process (and of the trace replay).

The index keeps one tracked object per block (its entry, and the entry's lists and
set), and a cache under pressure creates and drops them on every miss.  With
CPython's default thresholds (700, 10, 10) the cyclic collector then runs a young
collection every few hundred blocks and, now and then, a full one over the whole
index: 15-19% of the trace replay's time, and the daemon's latency spikes.  The index
breaks its own reference cycles (an evicted block is unlinked from its parent and
children), so the collector finds little; collecting less often loses nothing but
a bounded amount of young garbage (at most ``YOUNG_THRESHOLD`` objects).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000
"""Allocations of tracked objects between young collections (CPython's default: 700)."""


def tune_gc() -> tuple[int, int, int]:
    """Sets the daemon's collector thresholds; returns the previous ones."""
    old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, 10, 10)
    return old  # type: ignore[return-value]


def freeze_startup() -> None:
    """After start-up (config, tiers, the recovered index): collect once, then move
    every surviving object to the permanent generation, so full collections skip it."""
    gc.collect()
    gc.freeze()
