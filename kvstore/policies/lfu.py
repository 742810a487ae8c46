"""Least-frequently-used eviction with aging, in O(1) per operation.

Counts are kept in ``MAX_COUNT`` buckets (an LRU queue each, like TinyLFU's
4-bit counters), so the victim is the least recently used block of the lowest
non-empty bucket.  Aging: every ``AGING_FACTOR`` x tier-size references all
counts are halved, so blocks that were popular long ago make room for what is
popular now (without aging, an old hot prompt would stay forever).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvstore.policies._util import observed_capacity, scan
from kvstore.policies.base import POLICIES, EvictionPolicy

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry

MAX_COUNT = 15
AGING_FACTOR = 8


@POLICIES.register("lfu")
class LFUPolicy(EvictionPolicy):
    """Evict the least recently used among the least frequently used blocks."""

    name = "lfu"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        # _buckets[c] holds the entries whose count is c (index 0 unused).
        self._buckets: list[OrderedDict[BlockEntry, None]] = [
            OrderedDict() for _ in range(MAX_COUNT + 1)
        ]
        self._count: dict[BlockEntry, int] = {}
        self._refs = 0

    def _age(self) -> None:
        """Halve every count (at least 1), keeping the recency order within buckets."""
        old = self._buckets
        self._buckets = [OrderedDict() for _ in range(MAX_COUNT + 1)]
        count = self._count
        for c in range(1, MAX_COUNT + 1):
            for e in old[c]:
                nc = max(1, c // 2)
                count[e] = nc
                self._buckets[nc][e] = None

    def _tick(self) -> None:
        self._refs += 1
        if self._refs >= AGING_FACTOR * max(self.capacity_blocks, len(self._count)):
            self._refs = 0
            self._age()

    def on_insert(self, entry: BlockEntry) -> None:
        self._count[entry] = 1
        self._buckets[1][entry] = None
        self._tick()

    def on_access(self, entry: BlockEntry) -> None:
        c = self._count.get(entry)
        if c is None:
            return
        if c < MAX_COUNT:
            del self._buckets[c][entry]
            c += 1
            self._count[entry] = c
            self._buckets[c][entry] = None
        else:
            self._buckets[c].move_to_end(entry)
        self._tick()

    def on_remove(self, entry: BlockEntry) -> None:
        c = self._count.pop(entry, None)
        if c is not None:
            del self._buckets[c][entry]

    def victims(self, n: int, evictable: Callable[[BlockEntry], bool]) -> list[BlockEntry]:
        real = observed_capacity(len(self._count), self.capacity_blocks)
        if real is not None:
            self.capacity_blocks = real
        out: list[BlockEntry] = []
        for q in self._buckets:
            if q:
                scan(q, n, evictable, out)
                if len(out) >= n:
                    break
        return out

    def __len__(self) -> int:
        return len(self._count)
