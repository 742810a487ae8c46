"""Least-recently-used eviction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvstore.policies._util import scan
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

    def __len__(self) -> int:
        return len(self._order)
