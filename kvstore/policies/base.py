"""Eviction and admission policy protocols.

Mechanism and policy apart: a tier stores bytes and knows its capacity; a policy
only orders the blocks of one tier and names victims.  A policy owns no storage
and no metrics, and naming victims changes nothing until the hierarchy removes
them (then it calls :meth:`EvictionPolicy.on_remove`).

Thread contract: every method is called from the one thread that owns the
hierarchy (the daemon's event loop, or the trace replay); policies take no locks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, ClassVar

from kvstore.registry import Registry

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry


STREAM_BATCH = 4
"""Victims the base ``stream_victims`` asks ``victims`` for at a time."""


class EvictionPolicy(ABC):
    """Orders the blocks resident in one tier and names victims.

    Args:
        capacity_blocks: a hint of how many blocks the tier holds (for policies
            that size queues or ghost lists); policies must work for any value.

    Policies may read an entry's public fields (``depth``, ``parent``,
    ``n_children``, ``hits``, ``last_access``, ``nbytes``) but never write them.
    """

    name: ClassVar[str] = ""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = max(1, int(capacity_blocks))

    @abstractmethod
    def on_insert(self, entry: BlockEntry) -> None:
        """``entry`` became resident in this tier."""

    def on_insert_many(self, entries: Iterable[BlockEntry]) -> None:
        """Each of ``entries`` became resident, in this order (a committed chain, tail
        first).  Same as ``on_insert`` one by one; policies override it for speed."""
        for e in entries:
            self.on_insert(e)

    @abstractmethod
    def on_access(self, entry: BlockEntry) -> None:
        """``entry`` (resident) was hit by a lookup/acquire."""

    @abstractmethod
    def on_remove(self, entry: BlockEntry) -> None:
        """``entry`` left this tier (evicted, demoted, deleted).  Must be idempotent-safe:
        called exactly once per resident entry."""

    @abstractmethod
    def victims(self, n: int, evictable: Callable[[BlockEntry], bool]) -> list[BlockEntry]:
        """Up to ``n`` resident entries to evict, best victim first.

        Only entries for which ``evictable(entry)`` is true may be named (pinned
        blocks and parents of resident children are not).  Must not change which
        entries are resident; may update internal bookkeeping (e.g. CLOCK bits).
        May return fewer than ``n``: a victim's parent becomes evictable only once
        the victim is gone, so filling a batch can mean scanning past whole chains;
        the hierarchy simply asks again.  Returns none only when no resident entry
        is evictable.
        """

    def stream_victims(self, evictable: Callable[[BlockEntry], bool]) -> Iterator[BlockEntry]:
        """Victims for a caller that evicts them one by one until it has room.

        The caller evicts each victim (so ``on_remove`` is called for it), or makes
        ``evictable`` false for it, before it asks for the next one, and stops asking
        once it has room.  Every entry yielded is evictable when it is yielded; the
        stream ends when no resident entry is evictable.

        The base version yields the batches of ``victims(STREAM_BATCH, ...)``, each
        entry checked again just before it is yielded.  ``lru`` and ``chain`` override
        it with a generator that picks one victim at a time, in the state left by the
        previous one (as ``victims(1, ...)`` would), so a victim's parent can follow
        it without a look-ahead past it.
        """
        while True:
            batch = self.victims(STREAM_BATCH, evictable)
            if not batch:
                return
            for v in batch:
                if evictable(v):
                    yield v

    @abstractmethod
    def __len__(self) -> int:
        """Number of entries the policy tracks as resident."""


class AdmissionPolicy(ABC):
    """Decides whether a block demoted from the tier above is written to this tier.

    A rejected block is dropped from the hierarchy instead (unless other blocks
    depend on it, then it is admitted regardless).
    """

    name: ClassVar[str] = ""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = max(1, int(capacity_blocks))

    @abstractmethod
    def admit(self, entry: BlockEntry) -> bool:
        """Whether ``entry`` may enter this tier."""

    def on_reference(self, entry: BlockEntry) -> None:  # noqa: B027 - optional hook
        """Called whenever ``entry`` is referenced (looked up or written) anywhere."""


POLICIES: Registry[type[EvictionPolicy]] = Registry("eviction policy")
ADMISSIONS: Registry[type[AdmissionPolicy]] = Registry("admission policy")


@ADMISSIONS.register("always")
class AlwaysAdmit(AdmissionPolicy):
    """Admit every block."""

    name = "always"

    def admit(self, entry: BlockEntry) -> bool:
        return True
