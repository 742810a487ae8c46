"""``seen-twice`` admission: a block enters the tier only once it was referenced twice.

One-off prompts are the bulk of a conversation trace (three quarters of the
blocks of the Mooncake conversation trace are referenced once): writing each of
them to NVMe on its way out of DRAM costs write bandwidth and washes out the
blocks that come back.  This admission remembers how often recent keys were
referenced (a bounded FIFO of keys, ``HISTORY_FACTOR`` times the tier's size, a
few dozen bytes each, never the blocks) and admits a block referenced at least
``THRESHOLD`` times.  A block with children is admitted by the hierarchy
regardless, so a cached prefix never loses its head.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from kvstore.policies.base import ADMISSIONS, AdmissionPolicy

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry

THRESHOLD = 2
HISTORY_FACTOR = 2


@ADMISSIONS.register("seen-twice")
class SeenTwiceAdmission(AdmissionPolicy):
    """Admit blocks referenced at least twice within a bounded history."""

    name = "seen-twice"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self.limit = HISTORY_FACTOR * self.capacity_blocks

    def on_reference(self, entry: BlockEntry) -> None:
        seen = self._seen
        seen[entry.key] = seen.pop(entry.key, 0) + 1
        if len(seen) > self.limit:
            seen.popitem(last=False)

    def admit(self, entry: BlockEntry) -> bool:
        return self._seen.get(entry.key, 0) >= THRESHOLD

    def __len__(self) -> int:
        """Keys remembered (bounded by ``limit``)."""
        return len(self._seen)
