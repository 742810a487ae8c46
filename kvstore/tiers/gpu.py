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

This module also holds the small CUDA helpers the other tiers call:
:func:`cuda_available`, :func:`pin_host_memory` / :func:`unpin_host_memory` (the
DRAM tier pins its arena when a GPU is present) and
:func:`read_file_into_device` (the NVMe tier's NVMe -> GPU path, through kvikio
when installed, else a pinned bounce buffer).
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import xxhash

from kvstore.config import ConfigError, TierConfig, parse_size
from kvstore.registry import Registry
from kvstore.tiers.base import TIERS, ChecksumMismatch, Handle, Tier, TierIOError
from kvstore.tiers.dram import ALIGN, SlabAllocator

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry

log = logging.getLogger(__name__)

_H2D = 1  # cudaMemcpyHostToDevice
_D2H = 2  # cudaMemcpyDeviceToHost
_HOST_REGISTER_PORTABLE_MAPPED = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped
BOUNCE_BYTES = 8 << 20


class GpuUnavailable(RuntimeError):
    """A CUDA operation was asked for where there is no cupy or no CUDA device."""


@cache
def cuda_available() -> bool:
    """cupy importable and at least one CUDA device visible."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except cupy.cuda.runtime.CUDARuntimeError:
        return False


def _cupy() -> Any:
    if not cuda_available():
        raise GpuUnavailable("this needs cupy and a CUDA device; none found here")
    import cupy

    return cupy


def host_address(buf: Any) -> tuple[int, int]:
    """``(address, nbytes)`` of a bytes-like object (memoryview, mmap, numpy array...).

    Raises:
        ValueError: an empty or non-contiguous buffer.
    """
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    if not arr.flags.c_contiguous:
        raise ValueError("host buffer must be contiguous")
    if arr.nbytes == 0:
        raise ValueError("host buffer is empty")
    # Only the address is kept: holding the array would keep an export on an mmap
    # and stop its owner from closing it.
    return int(arr.ctypes.data), int(arr.nbytes)


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
        cupy = _cupy()
        ndev = int(cupy.cuda.runtime.getDeviceCount())
        if not 0 <= device < ndev:
            raise ConfigError(f"gpu tier: device {device} does not exist ({ndev} visible)")
        self._rt = cupy.cuda.runtime
        with cupy.cuda.Device(device):
            self.mem: Any = cupy.cuda.Memory(nbytes)

    @property
    def ptr(self) -> int:
        return int(self.mem.ptr)

    def _memcpy(self, dst: int, src: int, n: int, kind: int) -> None:
        import cupy

        with cupy.cuda.Device(self.device):
            self._rt.memcpy(dst, src, n, kind)

    def copy_from_host(self, offset: int, src: memoryview) -> None:
        addr, n = host_address(src)
        self._memcpy(self.ptr + offset, addr, n, _H2D)

    def copy_to_host(self, offset: int, dst: memoryview) -> None:
        addr, n = host_address(dst)
        self._memcpy(addr, self.ptr + offset, n, _D2H)

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
        cupy = _cupy()
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


# ---------------------------------------------------------------- pinned host memory
@dataclass(slots=True)
class PinnedHost:
    """A host range registered with CUDA; :func:`unpin_host_memory` undoes it."""

    ptr: int
    nbytes: int
    pinned: bool = True

    def __enter__(self) -> PinnedHost:
        return self

    def __exit__(self, *exc: object) -> None:
        unpin_host_memory(self)


def pin_host_memory(buf: Any) -> PinnedHost:
    """Page-locks ``buf`` (``cudaHostRegister``) so copies to and from GPUs run as DMA.

    The DRAM tier calls this on its arena when :func:`cuda_available`.  Unpin
    before the buffer's owner unmaps it.

    Raises:
        GpuUnavailable: no cupy or no CUDA device.
        ValueError: an empty or non-contiguous buffer.
    """
    ptr, n = host_address(buf)
    cupy = _cupy()
    cupy.cuda.runtime.hostRegister(ptr, n, _HOST_REGISTER_PORTABLE_MAPPED)
    return PinnedHost(ptr, n)


def unpin_host_memory(pinned: PinnedHost) -> None:
    """Undoes :func:`pin_host_memory`; a second call does nothing."""
    if not pinned.pinned:
        return
    cupy = _cupy()
    cupy.cuda.runtime.hostUnregister(pinned.ptr)
    pinned.pinned = False


# ---------------------------------------------------------------- NVMe -> GPU
@cache
def kvikio_available() -> bool:
    try:
        import kvikio  # noqa: F401
    except ImportError:
        return False
    return True


class _DeviceSpan:
    """A raw device range that kvikio (and cupy) accept as a buffer."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
        }


_CUFILES: OrderedDict[tuple[str, int, int], Any] = OrderedDict()
_CUFILES_MAX = 32


def _cufile(path: str) -> Any:
    import kvikio

    st = os.stat(path)
    key = (path, st.st_dev, st.st_ino)  # a compacted-and-recreated segment is another file
    f = _CUFILES.get(key)
    if f is None:
        f = kvikio.CuFile(path, "r")
        _CUFILES[key] = f
        if len(_CUFILES) > _CUFILES_MAX:
            _CUFILES.popitem(last=False)[1].close()
    else:
        _CUFILES.move_to_end(key)
    return f


def close_device_files() -> None:
    """Closes the kvikio file handles :func:`read_file_into_device` keeps open."""
    while _CUFILES:
        _CUFILES.popitem()[1].close()


def read_chunks(
    fd: int,
    offset: int,
    nbytes: int,
    bufs: list[memoryview],
    submit: Callable[[int, memoryview, int], None],
    wait: Callable[[int], None],
) -> int:
    """Reads ``nbytes`` at ``offset`` through rotating bounce buffers.

    ``submit(dst_offset, chunk, i)`` starts moving ``chunk`` (from buffer ``i``)
    to its destination; ``wait(i)`` blocks until buffer ``i`` may be refilled, so
    the copy of one chunk overlaps the read of the next.  Returns the bytes read
    (fewer at end of file).
    """
    done = 0
    k = 0
    while done < nbytes:
        i = k % len(bufs)
        wait(i)
        want = min(len(bufs[i]), nbytes - done)
        got = os.preadv(fd, [bufs[i][:want]], offset + done)
        if got <= 0:
            break
        submit(done, bufs[i][:got], i)
        done += got
        k += 1
    for i in range(len(bufs)):
        wait(i)
    return done


def read_file_into_device(
    file: str | os.PathLike[str] | int,
    offset: int,
    nbytes: int,
    device_ptr: int,
    *,
    device: int = 0,
    use_kvikio: bool | None = None,
) -> int:
    """Reads ``nbytes`` of ``file`` at ``offset`` straight into GPU memory.

    Through kvikio (GPUDirect Storage, or its POSIX compat mode) when it is
    installed, else through two pinned bounce buffers whose host-to-device copies
    overlap the next read.  ``file`` is a path or an open file descriptor.

    Returns:
        ``nbytes``.

    Raises:
        GpuUnavailable: no cupy or no CUDA device.
        TierIOError: the file ends before ``offset + nbytes``, or the read failed.
        ValueError: negative offset or size.
    """
    if offset < 0 or nbytes < 0:
        raise ValueError(f"offset and nbytes must be >= 0, got {offset}, {nbytes}")
    cupy = _cupy()
    if nbytes == 0:
        return 0
    kv = kvikio_available() if use_kvikio is None else use_kvikio
    try:
        with cupy.cuda.Device(device):
            if kv:
                path = (
                    os.readlink(f"/proc/self/fd/{file}")
                    if isinstance(file, int)
                    else os.fspath(file)
                )
                got = int(
                    _cufile(path).pread(_DeviceSpan(device_ptr, nbytes), nbytes, offset).get()
                )
            else:
                got = _bounce_read(cupy, file, offset, nbytes, device_ptr)
    except (OSError, RuntimeError) as exc:  # kvikio reports I/O failures as RuntimeError
        raise TierIOError(f"read of {nbytes} bytes at {offset} failed: {exc}") from exc
    if got != nbytes:
        raise TierIOError(f"short read: {got} of {nbytes} bytes at offset {offset} (end of file?)")
    return got


def _bounce_read(
    cupy: Any, file: str | os.PathLike[str] | int, offset: int, nbytes: int, dptr: int
) -> int:
    import cupyx

    own = not isinstance(file, int)
    fd = os.open(os.fspath(file), os.O_RDONLY) if not isinstance(file, int) else file
    try:
        size = min(BOUNCE_BYTES, nbytes)
        arrs = [cupyx.empty_pinned(size, dtype=np.uint8) for _ in range(2)]
        bufs = [memoryview(a).cast("B") for a in arrs]
        stream = cupy.cuda.Stream(non_blocking=True)
        events: list[Any] = [None, None]

        def submit(dst_off: int, chunk: memoryview, i: int) -> None:
            cupy.cuda.runtime.memcpyAsync(
                dptr + dst_off, int(arrs[i].ctypes.data), len(chunk), _H2D, stream.ptr
            )
            events[i] = stream.record()

        def wait(i: int) -> None:
            if events[i] is not None:
                events[i].synchronize()
                events[i] = None

        return read_chunks(fd, offset, nbytes, bufs, submit, wait)
    finally:
        if own:
            os.close(fd)
