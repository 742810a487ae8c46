"""The storage-tier protocol.

A tier holds block bytes and knows its capacity; it knows nothing of policy.
The hierarchy asks a tier to ``reserve`` room for one block, moves bytes in with
``write`` (or lets a client write in place, for host-mapped tiers), reads them
out with ``read_into`` and gives the room back with ``free``.

Thread contract: ``reserve``, ``write``, ``free``, ``view`` and ``read_into`` are
called from the thread that owns the hierarchy (``read_many`` too, unless the tier
sets ``threaded_reads``).  A tier may do its I/O on its own
threads (the NVMe tier writes through a bounded queue) as long as a
``read_into`` issued after a ``write`` returns the written bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kvstore.config import ConfigError, TierConfig
from kvstore.registry import Registry

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry

Handle = Any
"""Opaque per-tier location of one block's bytes."""


class ChecksumMismatch(Exception):
    """Bytes read back do not match the checksum they were committed with."""


class TierIOError(Exception):
    """The tier could not complete an I/O (disk full, EIO); the tier marks itself degraded."""


@dataclass(slots=True, frozen=True)
class RecoveredBlock:
    """A block found in a persistent tier at start-up."""

    key: bytes
    ns: bytes
    parent: bytes | None
    depth: int
    nbytes: int
    checksum: int
    handle: Handle


class Tier(ABC):
    """A place that holds block bytes with a capacity.

    Attributes:
        name: the tier's name in the config (``"dram"``, ``"nvme"`` ...).
        kind: backend kind (registered name in :data:`TIERS`).
        host_mapped: clients read and write its bytes in place (shared-memory arena).
        stores_bytes: ``False`` only for the byte-less tier used by trace replay.
        persistent: its blocks survive a restart (offered back by :meth:`recover`).
        threaded_reads: ``read_many`` may run on another thread while the hierarchy's
            thread calls ``reserve/write/free`` on other handles (the daemon then
            promotes from this tier off its event loop).
    """

    kind: ClassVar[str] = ""
    host_mapped: ClassVar[bool] = False
    stores_bytes: ClassVar[bool] = True
    persistent: ClassVar[bool] = False
    threaded_reads: ClassVar[bool] = False

    def __init__(self, name: str, capacity_bytes: int) -> None:
        self.name = name
        self.capacity_bytes = int(capacity_bytes)
        self.degraded: str | None = None

    @classmethod
    def from_config(cls, cfg: TierConfig, data_dir: Path) -> Tier:
        """Builds the tier from its config entry; validates ``cfg.options``.

        Raises:
            kvstore.config.ConfigError: an invalid option, naming it.
        """
        if cfg.options:
            raise ConfigError(
                f"tier {cfg.name!r}: kind {cls.kind!r} takes no options, got {sorted(cfg.options)}"
            )
        return cls(cfg.name, cfg.capacity)

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes reserved for blocks now."""

    @abstractmethod
    def reserve(self, nbytes: int, entry: BlockEntry) -> Handle | None:
        """Room for one block of ``nbytes``, or ``None`` when full (caller evicts, retries).

        Raises:
            ValueError: ``nbytes`` can never fit in this tier.
        """

    @abstractmethod
    def write(self, handle: Handle, entry: BlockEntry, src: memoryview | None) -> None:
        """Store the block's bytes at ``handle`` (``src`` is ``None`` for byte-less tiers)."""

    @abstractmethod
    def read_into(self, handle: Handle, entry: BlockEntry, dst: memoryview | None) -> None:
        """Copy the block's bytes into ``dst``.

        Raises:
            ChecksumMismatch: the stored bytes fail ``entry.checksum``.
            TierIOError: the read failed.
        """

    def read_many(
        self, items: Sequence[tuple[Handle, BlockEntry, memoryview]]
    ) -> Sequence[Exception | None]:
        """Reads many blocks; one result per item: ``None`` or the
        :class:`ChecksumMismatch` / :class:`TierIOError` it raised.  Disk tiers override
        this to keep many reads in flight."""
        out: list[Exception | None] = []
        for h, e, dst in items:
            try:
                self.read_into(h, e, dst)
                out.append(None)
            except (ChecksumMismatch, TierIOError) as exc:
                out.append(exc)
        return out

    @abstractmethod
    def free(self, handle: Handle) -> None:
        """Give the room of ``handle`` back."""

    def free_many(self, handles: Iterable[Handle]) -> None:
        """``free`` for each of ``handles`` (the hierarchy's eviction passes: one call)."""
        for h in handles:
            self.free(h)

    def view(self, handle: Handle) -> memoryview:
        """The bytes of ``handle`` in place (host-mapped tiers only)."""
        raise NotImplementedError(f"tier {self.name!r} is not host-mapped")

    def recover(self) -> Iterable[RecoveredBlock]:
        """Blocks that survived a restart (persistent tiers)."""
        return ()

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Block until every write issued so far is durable."""

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "capacity_bytes": self.capacity_bytes,
            "used_bytes": self.used_bytes,
            "degraded": self.degraded or "",
        }

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; flushes pending writes."""


TIERS: Registry[type[Tier]] = Registry("tier kind")


@TIERS.register("null")
class NullTier(Tier):
    """Byte-less tier: capacity accounting only.  Used by the trace replay."""

    kind = "null"
    stores_bytes = False

    def __init__(self, name: str, capacity_bytes: int) -> None:
        super().__init__(name, capacity_bytes)
        self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def reserve(self, nbytes: int, entry: BlockEntry) -> Handle | None:
        used = self._used + nbytes
        if used <= self.capacity_bytes:  # the common case first: one test
            self._used = used
            return nbytes
        if nbytes > self.capacity_bytes:
            raise ValueError(f"block of {nbytes} B exceeds tier {self.name!r} capacity")
        return None

    def write(self, handle: Handle, entry: BlockEntry, src: memoryview | None) -> None:
        pass

    def read_into(self, handle: Handle, entry: BlockEntry, dst: memoryview | None) -> None:
        pass

    def free(self, handle: Handle) -> None:
        self._used -= handle

    def free_many(self, handles: Iterable[Handle]) -> None:
        self._used -= sum(handles)


def copy_block(e: BlockEntry, src_t: Tier, hs: Handle, dst_t: Tier, hd: Handle) -> None:
    """Copies the bytes of ``e`` from ``src_t`` (at ``hs``) to ``dst_t`` (at ``hd``),
    in place when one side is host-mapped (the hierarchy's demotions and promotions)."""
    if not (src_t.stores_bytes and dst_t.stores_bytes):
        dst_t.write(hd, e, None)
    elif dst_t.host_mapped:
        src_t.read_into(hs, e, dst_t.view(hd))
    elif src_t.host_mapped:
        dst_t.write(hd, e, src_t.view(hs))
    else:
        buf = memoryview(bytearray(e.nbytes))
        src_t.read_into(hs, e, buf)
        dst_t.write(hd, e, buf)
