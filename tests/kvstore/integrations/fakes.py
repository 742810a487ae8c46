"""An in-memory stand-in for the kvstore client, with fault switches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.errors import DaemonUnavailable, ResourceExhausted
from kvstore.keys import Namespace


@dataclass
class _Alloc:
    key: bytes
    status: str
    view: memoryview | None


class FakeClient:
    """An in-memory daemon: enough of the Client verbs, with fault switches."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, bytes] = {}
        self.pending: dict[bytes, bytearray] = {}
        self.pins: dict[bytes, int] = {}
        self.corrupt: set[bytes] = set()  # acquire reports these as misses (checksum failure)
        self.lose_pins = False  # release finds the session ended (LeaseLost)
        self.down = False
        self.full = False
        self.closed = False
        self.committed_sums: dict[bytes, int] = {}

    def _up(self) -> None:
        if self.down:
            raise DaemonUnavailable("no daemon [UNAVAILABLE]")

    def lookup(self, keys: Sequence[bytes]) -> Any:
        self._up()
        n = next((i for i, k in enumerate(keys) if k not in self.blocks), len(keys))

        class R:
            num_cached = n

        return R()

    def allocate(
        self,
        ns: Namespace,
        keys: Sequence[bytes],
        parent: bytes | None = None,
        first_depth: int = 0,
    ) -> list[Any]:
        self._up()
        if self.full:
            raise ResourceExhausted("no room [RESOURCE_EXHAUSTED]")
        out = []
        for k in keys:
            if k in self.blocks:
                out.append(_Alloc(k, "PRESENT", None))
            elif k in self.pending:
                out.append(_Alloc(k, "IN_PROGRESS", None))
            else:
                self.pending[k] = bytearray(ns.block_nbytes)
                out.append(_Alloc(k, "NEW", memoryview(self.pending[k])))
        return out

    def commit(self, keys: Sequence[bytes], checksums: Sequence[int] | None = None) -> list[str]:
        self._up()
        for i, k in enumerate(keys):
            self.blocks[k] = bytes(self.pending.pop(k))
            if checksums:
                self.committed_sums[k] = checksums[i]
        return ["OK"] * len(keys)

    def abort(self, keys: Sequence[bytes]) -> int:
        for k in keys:
            self.pending.pop(k, None)
        return len(keys)

    def acquire(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        self._up()
        out: list[memoryview | None] = []
        for k in keys:
            if k in self.blocks and k not in self.corrupt:
                self.pins[k] = self.pins.get(k, 0) + 1
                out.append(memoryview(self.blocks[k]).toreadonly())
            else:
                out.append(None)
        return out

    def release(self, keys: Sequence[bytes]) -> None:
        for k in keys:
            self.pins[k] -= 1
            if not self.pins[k]:
                del self.pins[k]
        if self.lose_pins:
            from kvstore.errors import LeaseLost

            raise LeaseLost(len(keys))

    def close(self) -> None:
        self.closed = True
