"""A tiny host-mapped in-memory tier: the DRAM arena's stand-in in NVMe tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore.tiers.base import Handle, Tier

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry


class MemTier(Tier):
    """Each block is its own ``bytearray``; ``view`` hands it out in place."""

    kind = "mem-test"
    host_mapped = True

    def __init__(self, name: str, capacity_bytes: int) -> None:
        super().__init__(name, capacity_bytes)
        self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def reserve(self, nbytes: int, entry: BlockEntry) -> Handle | None:
        if nbytes > self.capacity_bytes:
            raise ValueError("too big")
        if self._used + nbytes > self.capacity_bytes:
            return None
        self._used += nbytes
        return bytearray(nbytes)

    def write(self, handle: Handle, entry: BlockEntry, src: memoryview | None) -> None:
        assert src is not None
        handle[:] = src

    def read_into(self, handle: Handle, entry: BlockEntry, dst: memoryview | None) -> None:
        assert dst is not None
        dst[:] = handle

    def view(self, handle: Handle) -> memoryview:
        return memoryview(handle)

    def free(self, handle: Handle) -> None:
        self._used -= len(handle)
