"""Helpers shared by the policies: scanning a queue for victims, and a ghost list."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry


def scan(
    queue: OrderedDict[BlockEntry, None],
    n: int,
    evictable: Callable[[BlockEntry], bool],
    out: list[BlockEntry],
    limit: int = -1,
) -> None:
    """Appends to ``out`` evictable entries of ``queue`` from its cold end, up to ``n``.

    ``limit`` >= 0 caps how many non-evictable entries are passed over (so a caller
    can fall through to another queue instead of rotating a whole one).

    An entry that may not go now is pinned (in use) or holds up a resident child,
    whose use is also a use of its prefix: it is rotated to the hot end, so the
    next scan does not walk over it again.  That keeps victim selection amortized
    O(1) however many entries are not evictable, and never loops: every entry is
    looked at most once per call.
    """
    if len(out) >= n:
        return
    skipped: list[BlockEntry] = []
    for e in queue:
        if evictable(e):
            out.append(e)
            if len(out) >= n:
                break
        else:
            skipped.append(e)
            if len(skipped) == limit:
                break
    move = queue.move_to_end
    for e in skipped:
        move(e)


class Ghosts:
    """A bounded FIFO of keys of blocks that left a queue (no bytes, no entries).

    Keys rather than entries: an entry is forgotten when its block leaves the
    hierarchy, and the block comes back as a new entry with the same key.
    """

    __slots__ = ("_keys", "limit")

    def __init__(self, limit: int) -> None:
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self.limit = max(1, limit)

    def add(self, key: bytes) -> None:
        keys = self._keys
        keys[key] = None
        keys.move_to_end(key)
        while len(keys) > self.limit:
            keys.popitem(last=False)

    def pop(self, key: bytes) -> bool:
        """Whether ``key`` was remembered (and forgets it)."""
        return self._keys.pop(key, 0) is None

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)
