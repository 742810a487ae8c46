"""GPU HBM tier: one device allocation cut into slots, exported over CUDA IPC.

The tier makes one big allocation at start (``cudaMalloc`` through cupy, never
a pool sub-allocation: CUDA IPC exports whole allocations) and hands out slots
with the same slab allocator as the DRAM arena.  ``write`` / ``read_into`` move
block bytes between the slots and host memory (the DRAM arena's views) with
``cudaMemcpy``; once the arena is pinned (:func:`pin_host_memory`) those copies
run at link speed.  Clients on the same GPU map the whole pool once with
:func:`open_ipc_pool` and address blocks by the offsets :meth:`GpuTier.ipc_export`
gives them.

Where the memory lives is pluggable (:data:`DEVICE_MEMORY`): ``cuda`` is the real
thing; ``host`` keeps the "device" in a numpy array so CI tests the tier's
logic (slots, capacity, bookkeeping, config) without a GPU.

The CUDA helpers the other tiers call (:func:`cuda_available`,
:func:`pin_host_memory`, :func:`read_file_into_device` ...) live in
:mod:`kvstore.tiers.gpu_util` and are re-exported here.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import xxhash

from kvstore.config import ConfigError, TierConfig, parse_size
from kvstore.registry import Registry
from kvstore.tiers.base import TIERS, ChecksumMismatch, Handle, Tier, TierIOError
from kvstore.tiers.dram import ALIGN, SlabAllocator
from kvstore.tiers.gpu_util import (
    D2H,
    H2D,
    GpuUnavailable,
    PinnedHost,
    close_device_files,
    cuda_available,
    cupy_or_raise,
    host_address,
    kvikio_available,
    pin_host_memory,
    pin_host_memory_if_gpu,
    read_chunks,
    read_file_into_device,
    unpin_host_memory,
)

__all__ = [
    "DEVICE_MEMORY",
    "CudaMemory",
    "DeviceMemory",
    "GpuExport",
    "GpuTier",
    "GpuUnavailable",
    "HostMemory",
    "IpcPool",
    "PinnedHost",
    "close_device_files",
    "cuda_available",
    "host_address",
    "kvikio_available",
    "open_ipc_pool",
    "pin_host_memory",
    "pin_host_memory_if_gpu",
    "read_chunks",
    "read_file_into_device",
    "unpin_host_memory",
]

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- device memory
class DeviceMemory(ABC):
    """The one allocation a :class:`GpuTier` keeps its slots in.

    Args:
        nbytes: size of the allocation.
        device: CUDA device index.
    """

    kind: ClassVar[str] = ""

    def __init__(self, nbytes: int, device: int) -> None:
        self.nbytes = nbytes
        self.device = device

    @property
    @abstractmethod
    def ptr(self) -> int:
        """Base address of the allocation."""

    @abstractmethod
    def copy_from_host(self, offset: int, src: memoryview) -> None:
        """Copies ``src`` to ``offset``."""

    @abstractmethod
    def copy_to_host(self, offset: int, dst: memoryview) -> None:
        """Copies ``len(dst)`` bytes at ``offset`` into ``dst``."""

    @abstractmethod
    def ipc_handle(self) -> bytes:
        """Handle another process on the same device opens to map the allocation."""

    def copy_many_from_host(self, items: Sequence[tuple[int, memoryview]]) -> None:
        """Copies each ``src`` to its offset; returns when all are done."""
        for off, src in items:
            self.copy_from_host(off, src)

    def copy_many_to_host(self, items: Sequence[tuple[int, memoryview]]) -> None:
        """Fills each ``dst`` from its offset; returns when all are done."""
        for off, dst in items:
            self.copy_to_host(off, dst)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Frees the allocation."""


DEVICE_MEMORY: Registry[type[DeviceMemory]] = Registry("gpu tier backend")


@DEVICE_MEMORY.register("host")
class HostMemory(DeviceMemory):
    """Host memory standing in for a device: the CPU twin of :class:`CudaMemory`."""

    kind = "host"

    def __init__(self, nbytes: int, device: int) -> None:
        super().__init__(nbytes, device)
        self.buf: np.ndarray | None = np.zeros(nbytes, dtype=np.uint8)

    def _buf(self) -> np.ndarray:
        if self.buf is None:
            raise TierIOError("device memory is closed")
        return self.buf

    @property
    def ptr(self) -> int:
        return int(self._buf().ctypes.data)

    def copy_from_host(self, offset: int, src: memoryview) -> None:
        self._buf()[offset : offset + len(src)] = np.frombuffer(src, dtype=np.uint8)

    def copy_to_host(self, offset: int, dst: memoryview) -> None:
        n = len(dst)
        np.frombuffer(dst, dtype=np.uint8)[:] = self._buf()[offset : offset + n]

    def ipc_handle(self) -> bytes:
        # Not openable by another process: identifies the allocation for bookkeeping tests.
        return f"host:{os.getpid()}:{self.ptr:x}".encode()

    def close(self) -> None:
        self.buf = None


@DEVICE_MEMORY.register("cuda")
class CudaMemory(DeviceMemory):
    """One plain ``cudaMalloc`` (not a pool block: IPC exports whole allocations)."""

    kind = "cuda"

    def __init__(self, nbytes: int, device: int) -> None:
        super().__init__(nbytes, device)
        cupy = cupy_or_raise()
        ndev = int(cupy.cuda.runtime.getDeviceCount())
        if not 0 <= device < ndev:
            raise ConfigError(f"gpu tier: device {device} does not exist ({ndev} visible)")
        self._rt = cupy.cuda.runtime
        self._stream: Any = None
        with cupy.cuda.Device(device):
            self.mem: Any = cupy.cuda.Memory(nbytes)

    @property
    def ptr(self) -> int:
        return int(self.mem.ptr)

    def _memcpy(self, dst: int, src: int, n: int, kind: int) -> None:
        import cupy

        try:
            with cupy.cuda.Device(self.device):
                self._rt.memcpy(dst, src, n, kind)
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise TierIOError(f"CUDA copy of {n} bytes failed: {exc}") from exc

    def copy_from_host(self, offset: int, src: memoryview) -> None:
        addr, n = host_address(src)
        self._memcpy(self.ptr + offset, addr, n, H2D)

    def copy_to_host(self, offset: int, dst: memoryview) -> None:
        addr, n = host_address(dst)
        self._memcpy(addr, self.ptr + offset, n, D2H)

    def _memcpy_many(self, pairs: list[tuple[int, int, int]], kind: int) -> None:
        """``(dst, src, n)`` copies queued on one stream, one synchronization at the end:
        the per-copy launch latency overlaps the transfers (from pinned memory)."""
        import cupy

        try:
            with cupy.cuda.Device(self.device):
                if self._stream is None:
                    self._stream = cupy.cuda.Stream(non_blocking=True)
                for dst, src, n in pairs:
                    self._rt.memcpyAsync(dst, src, n, kind, self._stream.ptr)
                self._stream.synchronize()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise TierIOError(f"CUDA copies of {len(pairs)} blocks failed: {exc}") from exc

    def copy_many_from_host(self, items: Sequence[tuple[int, memoryview]]) -> None:
        pairs = []
        for off, src in items:
            addr, n = host_address(src)
            pairs.append((self.ptr + off, addr, n))
        self._memcpy_many(pairs, H2D)

    def copy_many_to_host(self, items: Sequence[tuple[int, memoryview]]) -> None:
        pairs = []
        for off, dst in items:
            addr, n = host_address(dst)
            pairs.append((addr, self.ptr + off, n))
        self._memcpy_many(pairs, D2H)

    def ipc_handle(self) -> bytes:
        return bytes(self._rt.ipcGetMemHandle(self.ptr))

    def close(self) -> None:
        self.mem = None  # cupy frees it (cudaFree) when the last reference goes


# ---------------------------------------------------------------- the tier
@dataclass(frozen=True, slots=True)
class GpuExport:
    """What a client on the same GPU needs to read blocks in place.

    Attributes:
        device: CUDA device index of the pool.
        ipc_handle: the pool's CUDA IPC memory handle (``cudaIpcGetMemHandle``).
        pool_nbytes: size of the pool.
        slots: ``(offset, nbytes)`` of each requested block inside the pool.
    """

    device: int
    ipc_handle: bytes
    pool_nbytes: int
    slots: list[tuple[int, int]]


@TIERS.register("gpu")
class GpuTier(Tier):
    """Block slots in GPU memory.  Handles are ``(offset, nbytes)`` in the pool.

    Args:
        name: the tier's name.
        capacity_bytes: size of the pool (rounded down to whole slabs).
        device: CUDA device index.
        backend: a :data:`DEVICE_MEMORY` name: ``cuda``, or ``host`` for tests.
        slab_bytes: slab size of the slot allocator (the largest block).
        verify_reads: check each block read back against its checksum (costs a
            host-side xxh3 pass; HBM has ECC, so off by default).
    """

    kind = "gpu"
    OPTIONS = ("device", "backend", "slab_bytes", "verify_reads")

    def __init__(
        self,
        name: str,
        capacity_bytes: int,
        device: int = 0,
        backend: str = "cuda",
        slab_bytes: int = 64 << 20,
        verify_reads: bool = False,
    ) -> None:
        slab = min(-(-slab_bytes // ALIGN) * ALIGN, max(ALIGN, capacity_bytes // ALIGN * ALIGN))
        capacity = capacity_bytes // slab * slab
        if capacity <= 0:
            raise ConfigError(f"tier {name!r}: capacity is smaller than one slab ({slab} B)")
        super().__init__(name, capacity)
        self.device = device
        self.backend = backend
        self.verify_reads = verify_reads
        self.alloc = SlabAllocator(capacity, slab)
        self.mem = DEVICE_MEMORY.get(backend)(capacity, device)
        self.exports = 0

    @classmethod
    def from_config(cls, cfg: TierConfig, data_dir: Path) -> Tier:
        opts = dict(cfg.options)
        where = f"tier {cfg.name!r}"
        unknown = sorted(set(opts) - set(cls.OPTIONS))
        if unknown:
            raise ConfigError(
                f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(cls.OPTIONS)}"
            )
        kwargs: dict[str, Any] = {}
        if "device" in opts:
            dev = opts["device"]
            if not isinstance(dev, int) or isinstance(dev, bool) or dev < 0:
                raise ConfigError(f"{where}: device must be an integer >= 0, got {dev!r}")
            kwargs["device"] = dev
        if "backend" in opts:
            if opts["backend"] not in DEVICE_MEMORY:
                raise ConfigError(
                    f"{where}: unknown backend {opts['backend']!r}; "
                    f"known: {', '.join(DEVICE_MEMORY.names())}"
                )
            kwargs["backend"] = opts["backend"]
        if "slab_bytes" in opts:
            kwargs["slab_bytes"] = parse_size(opts["slab_bytes"], f"{where} slab_bytes")
        if "verify_reads" in opts:
            if not isinstance(opts["verify_reads"], bool):
                raise ConfigError(f"{where}: verify_reads must be true or false")
            kwargs["verify_reads"] = opts["verify_reads"]
        if kwargs.get("backend", "cuda") == "cuda" and not cuda_available():
            raise ConfigError(
                f"{where}: kind 'gpu' needs cupy and a CUDA device, and none was found; "
                "remove the tier or install the [gpu] extra"
            )
        return cls(cfg.name, cfg.capacity, **kwargs)

    @property
    def used_bytes(self) -> int:
        return self.alloc.used_bytes

    def reserve(self, nbytes: int, entry: BlockEntry) -> Handle | None:
        if nbytes <= 0:
            raise ValueError(f"block size must be > 0, got {nbytes}")
        off = self.alloc.alloc(nbytes)  # ValueError when larger than a slab
        return None if off is None else (off, nbytes)

    def write(self, handle: Handle, entry: BlockEntry, src: memoryview | None) -> None:
        if src is None:
            return
        off, n = handle
        if len(src) != n:
            raise ValueError(f"tier {self.name!r}: {len(src)} bytes for a slot of {n}")
        self.mem.copy_from_host(off, src)

    def read_into(self, handle: Handle, entry: BlockEntry, dst: memoryview | None) -> None:
        if dst is None:
            return
        off, n = handle
        if len(dst) < n:
            raise ValueError(f"tier {self.name!r}: {len(dst)}-byte buffer for a block of {n}")
        self.mem.copy_to_host(off, dst[:n])
        if (
            self.verify_reads
            and entry.checksum
            and xxhash.xxh3_64_intdigest(dst[:n]) != entry.checksum
        ):
            raise ChecksumMismatch(f"tier {self.name!r}: block at offset {off} fails its checksum")

    def read_many(
        self, items: Sequence[tuple[Handle, BlockEntry, memoryview]]
    ) -> list[Exception | None]:
        """Reads many blocks with one synchronization (see :meth:`write_many`)."""
        for h, _, dst in items:
            if len(dst) < h[1]:
                raise ValueError(
                    f"tier {self.name!r}: {len(dst)}-byte buffer for a block of {h[1]}"
                )
        try:
            self.mem.copy_many_to_host([(h[0], dst[: h[1]]) for h, _, dst in items])
        except TierIOError as exc:
            return [exc] * len(items)
        out: list[Exception | None] = []
        for h, e, dst in items:
            bad = (
                self.verify_reads
                and e.checksum
                and xxhash.xxh3_64_intdigest(dst[: h[1]]) != e.checksum
            )
            out.append(
                ChecksumMismatch(f"tier {self.name!r}: block at offset {h[0]} fails its checksum")
                if bad
                else None
            )
        return out

    def write_many(self, items: Sequence[tuple[Handle, BlockEntry, memoryview]]) -> None:
        """Writes many blocks: the copies are queued on one CUDA stream and waited
        for once, so per-copy latency overlaps the transfers."""
        for h, _, src in items:
            if len(src) != h[1]:
                raise ValueError(f"tier {self.name!r}: {len(src)} bytes for a slot of {h[1]}")
        self.mem.copy_many_from_host([(h[0], src) for h, _, src in items])

    def free(self, handle: Handle) -> None:
        self.alloc.free(handle[0])

    def ipc_export(self, handles: list[Handle]) -> GpuExport:
        """The pool's IPC handle and where each block of ``handles`` sits in it."""
        slots = [(int(h[0]), int(h[1])) for h in handles]
        for off, n in slots:
            if off < 0 or off + n > self.capacity_bytes:
                raise ValueError(f"slot ({off}, {n}) is outside the pool")
        self.exports += 1
        return GpuExport(self.device, self.mem.ipc_handle(), self.capacity_bytes, slots)

    def device_ptr(self, handle: Handle) -> int:
        """Device address of a block (for kernels in the daemon's own process)."""
        return self.mem.ptr + int(handle[0])

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "device": self.device,
            "backend": self.backend,
            "slab_bytes": self.alloc.slab_bytes,
            "free_slabs": self.alloc.free_slabs(),
            "exports": self.exports,
        }

    def close(self) -> None:
        self.mem.close()


# ---------------------------------------------------------------- client side
class IpcPool:
    """A GPU tier's pool mapped into this process (same GPU, another process).

    Args:
        export: what :meth:`GpuTier.ipc_export` returned in the daemon.
    """

    def __init__(self, export: GpuExport) -> None:
        cupy = cupy_or_raise()
        self.export = export
        with cupy.cuda.Device(export.device):
            self.ptr = int(cupy.cuda.runtime.ipcOpenMemHandle(export.ipc_handle))
        self._open = True

    def tensor(self, offset: int, nbytes: int) -> Any:
        """Bytes ``[offset, offset + nbytes)`` of the pool as a uint8 CUDA torch tensor."""
        import cupy
        import torch

        if offset < 0 or offset + nbytes > self.export.pool_nbytes:
            raise ValueError(f"({offset}, {nbytes}) is outside the pool")
        mem = cupy.cuda.UnownedMemory(self.ptr + offset, nbytes, self, self.export.device)
        arr = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        return torch.as_tensor(arr, device=f"cuda:{self.export.device}")

    def close(self) -> None:
        if self._open:
            import cupy

            self._open = False
            with cupy.cuda.Device(self.export.device):
                cupy.cuda.runtime.ipcCloseMemHandle(self.ptr)


def open_ipc_pool(export: GpuExport) -> IpcPool:
    """Maps a GPU tier's pool exported by another process (see :class:`IpcPool`)."""
    return IpcPool(export)
