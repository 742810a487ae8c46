"""Least-recently-used eviction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from kvstore.policies._util import first_victim, scan
from kvstore.policies.base import POLICIES, EvictionPolicy

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry


@POLICIES.register("lru")
class LRUPolicy(EvictionPolicy):
    """Evict the least recently used evictable block.

    The hierarchy touches a prefix chain tail first, so a parent is always more
    recent than its children and the scan from the cold end meets leaves first.
    """

    name = "lru"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._order: OrderedDict[BlockEntry, None] = OrderedDict()

    def on_insert(self, entry: BlockEntry) -> None:
        self._order[entry] = None

    def on_access(self, entry: BlockEntry) -> None:
        self._order.move_to_end(entry)

    def on_remove(self, entry: BlockEntry) -> None:
        self._order.pop(entry, None)

    def victims(self, n: int, evictable: Callable[[BlockEntry], bool]) -> list[BlockEntry]:
        out: list[BlockEntry] = []
        scan(self._order, n, evictable, out)
        return out

    def stream_victims(self, evictable: Callable[[BlockEntry], bool]) -> Iterator[BlockEntry]:
        order = self._order
        while order:
            # scan(order, 1, ...) inlined: the cold end is almost always evictable.
            for e in order:
                if evictable(e):
                    break
            else:
                return  # nothing evictable (a full rotation leaves the order as it was)
            if e is not next(iter(order)):
                first_victim(order, evictable)  # rotates the entries passed over
            yield e

    def __len__(self) -> int:
        return len(self._order)
