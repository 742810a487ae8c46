"""The index's record of one block."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PENDING = 0
"""Allocated, being written by its owner session; invisible to readers."""
READY = 1
"""Committed: immutable bytes, visible to readers."""


@dataclass(slots=True, eq=False)
class BlockEntry:
    """Metadata of one block.  Hashes by identity (policies key dicts by entry).

    ``locs[t]`` is the tier-``t`` handle holding the bytes, or ``None``; ``top`` is
    the fastest tier holding them (``-1``: none).  ``kid_tops[t]`` counts the
    children whose ``top`` is ``t``: a block may leave tier ``t`` only while no
    child sits in ``t`` or a faster tier (tail-first eviction).
    """

    key: bytes
    ns: bytes
    nbytes: int
    parent: BlockEntry | None
    depth: int
    locs: list[Any]
    kid_tops: list[int]
    state: int = PENDING
    top: int = -1
    checksum: int = 0
    pins: int = 0
    owner: int = 0
    hits: int = 0
    last_access: int = 0
    children: set[BlockEntry] | None = field(default=None, repr=False)

    @property
    def n_children(self) -> int:
        return len(self.children) if self.children else 0
