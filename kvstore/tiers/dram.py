"""Host-DRAM tier: one shared-memory arena that every client maps.

The arena is a ``memfd`` (so nothing is left in ``/dev/shm`` when the daemon
dies); clients open it through ``/proc/<daemon pid>/fd/<fd>``.  It is
pre-faulted at start because first touch of fresh pages runs at a fraction of
memcpy speed.

Slots come from a slab allocator: the arena is cut into equal slabs, each slab
serves one slot size (a namespace's block size rounded up to 4 KiB, so every
slot can be written to NVMe with ``O_DIRECT`` straight from the arena), and an
empty slab returns to the common pool.  Several namespaces with different block
sizes share one arena this way without external fragmentation inside a slab.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvstore.config import ConfigError, TierConfig, parse_size
from kvstore.tiers.base import TIERS, Handle, Tier
from kvstore.tiers.gpu_util import pin_host_memory_if_gpu, unpin_host_memory

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry

log = logging.getLogger(__name__)

ALIGN = 4096
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; Python 3.11's mmap module lacks the constant
_MPOL_BIND = 2


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(slots=True)
class _Slab:
    index: int
    stride: int = 0  # slot size this slab serves; 0 = in the free pool
    free: list[int] = field(default_factory=list)  # free slot offsets
    used: int = 0


class SlabAllocator:
    """Fixed-size slots carved from equal slabs of one address range.

    Args:
        capacity: bytes of the range (a multiple of ``slab_bytes`` is used).
        slab_bytes: size of one slab; the largest slot that can be served.
    """

    def __init__(self, capacity: int, slab_bytes: int) -> None:
        if slab_bytes <= 0 or slab_bytes % ALIGN:
            raise ValueError(f"slab size must be a positive multiple of {ALIGN}")
        self.slab_bytes = slab_bytes
        self.slabs = [_Slab(i) for i in range(capacity // slab_bytes)]
        self.capacity = len(self.slabs) * slab_bytes
        self._empty: list[int] = [s.index for s in reversed(self.slabs)]
        self._partial: dict[int, set[int]] = {}  # stride -> slabs with a free slot
        self._live: set[int] = set()  # allocated offsets: a double free must never pass
        self.used_bytes = 0

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a free slot of at least ``nbytes``, or ``None`` when full."""
        stride = _round_up(nbytes)
        if stride > self.slab_bytes:
            raise ValueError(
                f"block of {nbytes} bytes exceeds the arena's slab size {self.slab_bytes}; "
                "raise the dram tier's slab_bytes option"
            )
        partial = self._partial.setdefault(stride, set())
        if partial:
            slab = self.slabs[next(iter(partial))]
        elif self._empty:
            slab = self.slabs[self._empty.pop()]
            slab.stride = stride
            base = slab.index * self.slab_bytes
            n = self.slab_bytes // stride
            slab.free = [base + i * stride for i in range(n - 1, -1, -1)]
            partial.add(slab.index)
        else:
            return None
        off = slab.free.pop()
        self._live.add(off)
        slab.used += 1
        if not slab.free:
            partial.discard(slab.index)
        self.used_bytes += stride
        return off

    def free(self, offset: int) -> None:
        if offset not in self._live:
            raise AssertionError(f"double free of arena offset {offset}")
        self._live.discard(offset)
        slab = self.slabs[offset // self.slab_bytes]
        slab.free.append(offset)
        slab.used -= 1
        self.used_bytes -= slab.stride
        partial = self._partial[slab.stride]
        if slab.used == 0:
            # Whole slab empty: give it back so any slot size can use it.
            partial.discard(slab.index)
            slab.stride = 0
            slab.free = []
            self._empty.append(slab.index)
        else:
            partial.add(slab.index)

    def free_slabs(self) -> int:
        return len(self._empty)


class SharedArena:
    """A pre-faulted ``memfd`` mapping shared with clients.

    Args:
        size: bytes.
        prefault: touch every page now (recommended; first touch is slow).
        numa_node: bind the pages to this NUMA node (CXL memory shows as a CPU-less node).
    """

    def __init__(self, size: int, prefault: bool = True, numa_node: int | None = None) -> None:
        self.size = size
        self.fd = os.memfd_create("kvstore-arena", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
        if numa_node is not None:
            _mbind(self.mm, size, numa_node)
        if prefault:
            self._prefault()
        self.view = memoryview(self.mm)

    @property
    def path(self) -> str:
        """Path a client opens to map the arena (valid while the daemon lives)."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def _prefault(self) -> None:
        try:
            self.mm.madvise(_MADV_POPULATE_WRITE)
        except OSError:
            # Older kernels: write one byte per page.
            step = mmap.PAGESIZE
            for off in range(0, self.size, step):
                self.mm[off] = 0

    def close(self) -> bool:
        """Unmaps the arena and closes its ``memfd``; never raises for lingering views.

        A view of the arena still alive somewhere in this process (an exception's
        traceback, a reference cycle not yet collected) keeps the mapping from being
        closed.  Cycles are collected and the close retried once; if views remain, the
        mapping is left for the process's exit and a warning logged: shutdown goes on.

        Returns:
            Whether the mapping was closed.
        """
        if self.fd < 0:
            return True
        self.view.release()
        closed = True
        try:
            self.mm.close()
        except BufferError:
            gc.collect()  # views held only by unreachable cycles go now
            try:
                self.mm.close()
            except BufferError:
                closed = False
                log.warning(
                    "dram arena: %d B mapping still has views in this process; "
                    "leaving it to be unmapped at exit",
                    self.size,
                )
        os.close(self.fd)  # the mapping (if left) keeps its own reference to the memory
        self.fd = -1
        return closed


def _mbind(mm: mmap.mmap, size: int, node: int) -> None:
    """Binds the mapping's pages to one NUMA node with ``mbind(2)``."""
    if not Path(f"/sys/devices/system/node/node{node}").exists():
        raise ConfigError(f"numa_node {node}: no such NUMA node on this machine")
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    mask = ctypes.c_ulong(1 << node)
    sys_mbind = 237  # x86-64
    ret = libc.syscall(sys_mbind, ctypes.c_void_p(addr), ctypes.c_ulong(size), _MPOL_BIND,
                       ctypes.byref(mask), ctypes.c_ulong(64), 0)  # fmt: skip
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mbind to NUMA node {node} failed: {os.strerror(err)}")


@TIERS.register("dram")
class DramTier(Tier):
    """The shared-memory arena tier clients read and write in place.

    Handles are ``(offset, nbytes)`` pairs; the same pair is the ``Slot`` a client
    gets over the wire.
    """

    kind = "dram"
    host_mapped = True
    OPTIONS = ("slab_bytes", "prefault", "numa_node")

    def __init__(
        self,
        name: str,
        capacity_bytes: int,
        slab_bytes: int = 64 << 20,
        prefault: bool = True,
        numa_node: int | None = None,
    ) -> None:
        slab_bytes = min(_round_up(slab_bytes), max(ALIGN, capacity_bytes // ALIGN * ALIGN))
        capacity_bytes = capacity_bytes // slab_bytes * slab_bytes
        if capacity_bytes <= 0:
            raise ConfigError(f"tier {name!r}: capacity is smaller than one slab ({slab_bytes} B)")
        super().__init__(name, capacity_bytes)
        self.arena = SharedArena(capacity_bytes, prefault=prefault, numa_node=numa_node)
        # With a GPU, page-lock the arena so copies to and from HBM run as DMA.
        self._pinned = pin_host_memory_if_gpu(self.arena.view)
        self.alloc = SlabAllocator(capacity_bytes, slab_bytes)
        self.numa_node = numa_node

    @classmethod
    def from_config(cls, cfg: TierConfig, data_dir: Path) -> Tier:
        opts = dict(cfg.options)
        unknown = sorted(set(opts) - set(cls.OPTIONS))
        if unknown:
            raise ConfigError(
                f"tier {cfg.name!r}: unknown option(s) {', '.join(unknown)}; "
                f"known: {', '.join(cls.OPTIONS)}"
            )
        kwargs: dict[str, Any] = {}
        if "slab_bytes" in opts:
            kwargs["slab_bytes"] = parse_size(opts["slab_bytes"], f"tier {cfg.name!r} slab_bytes")
        if "prefault" in opts:
            if not isinstance(opts["prefault"], bool):
                raise ConfigError(f"tier {cfg.name!r}: prefault must be true or false")
            kwargs["prefault"] = opts["prefault"]
        if "numa_node" in opts:
            node = opts["numa_node"]
            if not isinstance(node, int) or isinstance(node, bool) or node < 0:
                raise ConfigError(f"tier {cfg.name!r}: numa_node must be an integer >= 0")
            kwargs["numa_node"] = node
        return cls(cfg.name, cfg.capacity, **kwargs)

    @property
    def used_bytes(self) -> int:
        return self.alloc.used_bytes

    def check_block_size(self, nbytes: int) -> None:
        """Raises ``ValueError`` if a block of ``nbytes`` can never be stored here."""
        if _round_up(nbytes) > self.alloc.slab_bytes:
            raise ValueError(
                f"blocks of {nbytes} bytes exceed tier {self.name!r} slab size "
                f"{self.alloc.slab_bytes}; raise its slab_bytes option"
            )

    def reserve(self, nbytes: int, entry: BlockEntry) -> Handle | None:
        off = self.alloc.alloc(nbytes)
        return None if off is None else (off, nbytes)

    def write(self, handle: Handle, entry: BlockEntry, src: memoryview | None) -> None:
        if src is not None:
            off, n = handle
            self.arena.view[off : off + n] = src

    def read_into(self, handle: Handle, entry: BlockEntry, dst: memoryview | None) -> None:
        if dst is not None:
            off, n = handle
            dst[:n] = self.arena.view[off : off + n]

    def view(self, handle: Handle) -> memoryview:
        off, n = handle
        return self.arena.view[off : off + n]

    def free(self, handle: Handle) -> None:
        self.alloc.free(handle[0])

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "slab_bytes": self.alloc.slab_bytes,
            "free_slabs": self.alloc.free_slabs(),
            "numa_node": -1 if self.numa_node is None else self.numa_node,
            "pinned_for_gpu": self._pinned is not None,
        }

    def close(self) -> None:
        """Unpins and unmaps the arena.  Idempotent; views of the arena that linger in
        this process leave the mapping to the process's exit (logged), never an error."""
        try:
            if self._pinned is not None:
                pinned, self._pinned = self._pinned, None
                unpin_host_memory(pinned)
        finally:
            self.arena.close()


@TIERS.register("cxl")
class CxlTier(DramTier):
    """A DRAM-kind tier whose pages are bound to a (CPU-less) NUMA node.

    Sits between DRAM and NVMe; the daemon reads it in place but clients are
    served from the DRAM tier (``acquire`` promotes), so they never map it.
    """

    kind = "cxl"

    @classmethod
    def from_config(cls, cfg: TierConfig, data_dir: Path) -> Tier:
        if "numa_node" not in cfg.options:
            raise ConfigError(
                f"tier {cfg.name!r}: kind 'cxl' needs options.numa_node "
                "(the CPU-less NUMA node of the CXL memory; see `numactl -H`)"
            )
        return super().from_config(cfg, data_dir)
