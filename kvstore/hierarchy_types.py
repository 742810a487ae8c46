"""The value types of :mod:`kvstore.hierarchy`: per-key statuses, levels, counters.

Kept apart so that the index module stays readable; import them from
:mod:`kvstore.hierarchy`, which re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from operator import attrgetter

from kvstore.policies import ADMISSIONS, POLICIES, AdmissionPolicy, EvictionPolicy
from kvstore.tiers.base import Tier

TOP = attrgetter("top")  # an entry's fastest tier, in C


class Status(IntEnum):
    """Per-key outcome of a batch verb (mirrors ``KeyStatus`` in the proto)."""

    OK = 0
    NEW = 1
    PRESENT = 2
    IN_PROGRESS = 3
    NOT_FOUND = 4
    NOT_OWNER = 5
    ALREADY_COMMITTED = 6
    NO_SPACE = 7
    PINNED = 8
    HAS_CHILDREN = 9
    CHECKSUM_MISMATCH = 10
    BAD_SIZE = 11


@dataclass(slots=True)
class Level:
    """One tier of the hierarchy with its policy and admission."""

    tier: Tier
    policy: EvictionPolicy
    admission: AdmissionPolicy

    @classmethod
    def build(
        cls, tier: Tier, policy: str = "lru", admission: str = "always", block_hint: int = 1 << 20
    ) -> Level:
        """Builds a level from registered names; ``block_hint`` is a typical block size."""
        blocks = max(1, tier.capacity_bytes // max(1, block_hint))
        return cls(tier, POLICIES.get(policy)(blocks), ADMISSIONS.get(admission)(blocks))


@dataclass(slots=True)
class Counters:
    """Monotonic counters; the metrics module exports them."""

    lookups: int = 0
    lookup_blocks: int = 0
    lookup_hit_blocks: int = 0
    allocations: int = 0
    dedup_present: int = 0
    commits: int = 0
    aborts: int = 0
    acquires: int = 0
    promotions: int = 0
    demotions: int = 0
    dropped: int = 0
    deleted: int = 0
    checksum_failures: int = 0
    io_errors: int = 0
    no_space: int = 0
    hits_by_tier: list[int] = field(default_factory=list)
    evictions_by_tier: list[int] = field(default_factory=list)

    def note_lookup(self, n_keys: int, tops: bytes) -> None:
        """Counts one lookup of ``n_keys`` keys; ``tops``: the tier of each hit."""
        self.lookups += 1
        self.lookup_blocks += n_keys
        self.lookup_hit_blocks += len(tops)
        hbt = self.hits_by_tier
        for t in range(len(hbt)):
            hbt[t] += tops.count(t)
