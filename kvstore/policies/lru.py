"""Least-recently-used eviction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

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
        skipped: list[BlockEntry] = []
        for e in self._order:
            if evictable(e):
                out.append(e)
                if len(out) >= n:
                    break
            else:
                skipped.append(e)
        # A block that may not go now is in use (pinned) or holds up a resident child,
        # whose use is a use of its prefix: rotate it to the hot end so the next scan
        # does not walk over it again.
        move = self._order.move_to_end
        for e in skipped:
            move(e)
        return out

    def __len__(self) -> int:
        return len(self._order)
