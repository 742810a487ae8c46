"""Helpers shared by the policies: scanning a queue for victims, and a ghost list."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry

LOOKAHEAD = 4
"""Non-evictable entries passed over after a first victim is found."""


def scan(
    queue: OrderedDict[BlockEntry, Any],
    n: int,
    evictable: Callable[[BlockEntry], bool],
    out: list[BlockEntry],
    limit: int = -1,
) -> None:
    """Appends to ``out`` evictable entries of ``queue`` from its cold end, up to ``n``.

    Until a first victim is found, an entry that may not go now is rotated to the
    hot end: it is pinned (in use) or holds up a resident child, whose use is also
    a use of its prefix, and the next scan should not walk over it again.  That
    keeps victim selection amortized O(1) however many entries are not evictable.
    Once a victim is named, its parent is typically next and cannot be named in
    the same call (it becomes evictable only when the victim is gone), so the scan
    looks at most ``LOOKAHEAD`` further entries, without rotating them, and stops.
    ``limit`` >= 0 caps how many entries are rotated (so a caller can fall through
    to another queue instead of rotating a whole one).  Every entry is looked at
    most once per call.
    """
    if len(out) >= n:
        return
    it = iter(queue)
    if not out:
        skipped: list[BlockEntry] = []
        found = False
        for e in it:
            if evictable(e):
                out.append(e)
                found = True
                break
            skipped.append(e)
            if len(skipped) == limit:
                break
        if found and len(out) < n:
            # look_ahead() inlined: this is the common way out of a scan.
            ahead = 0
            for e in it:
                if evictable(e):
                    out.append(e)
                    if len(out) >= n:
                        break
                else:
                    ahead += 1
                    if ahead > LOOKAHEAD:
                        break
        if skipped:
            move = queue.move_to_end
            for e in skipped:
                move(e)
        return
    look_ahead(it, n, evictable, out)


def first_victim(
    queue: OrderedDict[BlockEntry, Any],
    evictable: Callable[[BlockEntry], bool],
    limit: int = -1,
) -> BlockEntry | None:
    """``scan`` for one victim: the first evictable entry of ``queue`` from its cold
    end, or ``None``; the entries passed over are rotated to the hot end (at most
    ``limit`` of them when ``limit`` >= 0, as in :func:`scan`)."""
    skipped: list[BlockEntry] = []
    found = None
    for e in queue:
        if evictable(e):
            found = e
            break
        skipped.append(e)
        if len(skipped) == limit:
            break
    if skipped:
        move = queue.move_to_end
        for e in skipped:
            move(e)
    return found


def look_ahead(
    it: Iterator[BlockEntry],
    n: int,
    evictable: Callable[[BlockEntry], bool],
    out: list[BlockEntry],
    exclude: set[BlockEntry] | None = None,
) -> None:
    """The rest of :func:`scan` once a victim is named: appends evictable entries of
    ``it`` to ``out`` up to ``n``, stopping after ``LOOKAHEAD`` + 1 entries that are
    not (or are in ``exclude``, entries already named)."""
    ahead = 0
    if exclude:
        for e in it:
            if e not in exclude and evictable(e):
                out.append(e)
                if len(out) >= n:
                    return
            else:
                ahead += 1
                if ahead > LOOKAHEAD:
                    return
        return
    for e in it:
        if evictable(e):
            out.append(e)
            if len(out) >= n:
                return
        else:
            ahead += 1
            if ahead > LOOKAHEAD:
                return


def observed_capacity(held: int, hint: int) -> int | None:
    """The tier's real size in blocks when the hint is off by 2x or more, else None.

    Policies get a size hint (tier bytes / a typical block size), which is wrong when
    blocks are much larger or smaller than typical.  ``victims`` is only called on a
    full tier, so the number of resident entries then is the real size.
    """
    if 2 * held < hint or held > 2 * hint:
        return max(1, held)
    return None


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
