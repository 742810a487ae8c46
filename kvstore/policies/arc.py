"""ARC: adaptive replacement cache (Megiddo and Modha, FAST'03).

Two LRU lists of resident blocks, ``T1`` (seen once recently) and ``T2`` (seen
at least twice), and two ghost lists of keys that left them, ``B1`` and ``B2``.
A block that returns through ``B1`` says ``T1`` was too small, one that returns
through ``B2`` says ``T2`` was: the target size ``p`` of ``T1`` moves accordingly,
so the balance between recency and frequency adapts to the workload.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvstore.policies._util import Ghosts, observed_capacity, scan
from kvstore.policies.base import POLICIES, EvictionPolicy

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry


@POLICIES.register("arc")
class ARCPolicy(EvictionPolicy):
    """Adaptive split between a recency list and a frequency list, by ghost hits."""

    name = "arc"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._t1: OrderedDict[BlockEntry, None] = OrderedDict()
        self._t2: OrderedDict[BlockEntry, None] = OrderedDict()
        self._b1 = Ghosts(self.capacity_blocks)
        self._b2 = Ghosts(self.capacity_blocks)
        self._p = 0.0

    def _c(self) -> int:
        return max(self.capacity_blocks, len(self._t1) + len(self._t2))

    def on_insert(self, entry: BlockEntry) -> None:
        b1, b2 = self._b1, self._b2
        if entry.key in b1:
            self._p = min(float(self._c()), self._p + max(1.0, len(b2) / max(1, len(b1))))
            b1.pop(entry.key)
            self._t2[entry] = None
        elif entry.key in b2:
            self._p = max(0.0, self._p - max(1.0, len(b1) / max(1, len(b2))))
            b2.pop(entry.key)
            self._t2[entry] = None
        else:
            self._t1[entry] = None

    def on_access(self, entry: BlockEntry) -> None:
        if entry in self._t1:
            del self._t1[entry]
            self._t2[entry] = None
        elif entry in self._t2:
            self._t2.move_to_end(entry)

    def on_remove(self, entry: BlockEntry) -> None:
        c = self._c()
        if entry in self._t1:
            del self._t1[entry]
            # |T1| + |B1| <= c
            self._b1.limit = max(1, c - len(self._t1))
            self._b1.add(entry.key)
        elif entry in self._t2:
            del self._t2[entry]
            # everything remembered <= 2c
            self._b2.limit = max(1, 2 * c - len(self._t1) - len(self._t2) - len(self._b1))
            self._b2.add(entry.key)

    def victims(self, n: int, evictable: Callable[[BlockEntry], bool]) -> list[BlockEntry]:
        t1, t2 = self._t1, self._t2
        real = observed_capacity(len(t1) + len(t2), self.capacity_blocks)
        if real is not None:
            self.capacity_blocks = real
            self._p = min(self._p, float(real))
        first, second = (t1, t2) if t1 and (len(t1) > self._p or not t2) else (t2, t1)
        out: list[BlockEntry] = []
        scan(first, n, evictable, out)
        if len(out) < n:
            scan(second, n, evictable, out)
        return out

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)
