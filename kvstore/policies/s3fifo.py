"""S3-FIFO: a small probationary FIFO, a main FIFO with reinsertion, a ghost FIFO.

After Yang et al., "FIFO queues are all you need for cache eviction" (SOSP'23).
New blocks enter the small queue (10% of the tier); one that is used again before
it reaches the small queue's cold end moves to main, the rest leave and their
keys are remembered in the ghost queue; a block whose key is a ghost when it
comes back goes straight to main.  Main is a FIFO whose used blocks get another
round (a frequency counter of at most 3, decremented per round).  One-off
prompts so pass through the small queue without washing out main.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvstore.policies._util import Ghosts, observed_capacity, scan
from kvstore.policies.base import POLICIES, EvictionPolicy

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry

SMALL_FRACTION = 0.1
MAX_FREQ = 3
GHOST_FACTOR = 4


@POLICIES.register("s3fifo")
class S3FIFOPolicy(EvictionPolicy):
    """Small + main FIFO queues with a ghost FIFO of the small queue's evictions."""

    name = "s3fifo"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._small: OrderedDict[BlockEntry, None] = OrderedDict()
        self._main: OrderedDict[BlockEntry, None] = OrderedDict()
        self._freq: dict[BlockEntry, int] = {}
        self._ghosts = Ghosts(GHOST_FACTOR * self.capacity_blocks)

    def on_insert(self, entry: BlockEntry) -> None:
        self._freq[entry] = 0
        if self._ghosts.pop(entry.key):
            self._main[entry] = None
        else:
            self._small[entry] = None

    def on_access(self, entry: BlockEntry) -> None:
        f = self._freq
        if entry in f and f[entry] < MAX_FREQ:
            f[entry] += 1

    def on_remove(self, entry: BlockEntry) -> None:
        if self._freq.pop(entry, None) is None:
            return
        if entry in self._small:
            del self._small[entry]
            self._ghosts.add(entry.key)
        else:
            self._main.pop(entry, None)

    def _target_small(self) -> int:
        return max(1, int(SMALL_FRACTION * max(self.capacity_blocks, len(self._freq))))

    def victims(self, n: int, evictable: Callable[[BlockEntry], bool]) -> list[BlockEntry]:
        real = observed_capacity(len(self._freq), self.capacity_blocks)
        if real is not None:
            self.capacity_blocks = real
            self._ghosts.limit = GHOST_FACTOR * real
        out: list[BlockEntry] = []
        small, main, freq = self._small, self._main, self._freq
        # Promotions: used small blocks move to main, used main blocks get another
        # round.  Bounded by the queue lengths so a scan never loops.
        budget = len(small) + len(main)
        while len(out) < n and budget > 0:
            budget -= 1
            if small and (len(small) >= self._target_small() or not main):
                e = next(iter(small))
                if freq[e] > 0:
                    freq[e] = 0
                    del small[e]
                    main[e] = None
                    continue
                q = small
            elif main:
                e = next(iter(main))
                if freq[e] > 0:
                    freq[e] -= 1
                    main.move_to_end(e)
                    continue
                q = main
            else:
                break
            if e in out:
                break  # every remaining candidate is already named
            if evictable(e):
                out.append(e)
                q.move_to_end(e, last=False)
            else:
                q.move_to_end(e)
        if len(out) < n:
            # Everything left is pinned, a parent, or used: fall back to a plain scan.
            scan(small, n, lambda e: e not in out and evictable(e), out)
            scan(main, n, lambda e: e not in out and evictable(e), out)
        return out

    def __len__(self) -> int:
        return len(self._freq)
