"""CUDA helpers shared by the tiers: device presence, pinned host memory, NVMe -> GPU.

* :func:`cuda_available`: cupy importable and a CUDA device visible.
* :func:`pin_host_memory` / :func:`unpin_host_memory`: ``cudaHostRegister`` a host
  range (the DRAM tier pins its arena when a GPU is present), so copies between
  it and GPUs run as DMA at link speed.
* :func:`read_file_into_device`: the NVMe tier's NVMe -> GPU path, through kvikio
  (GPUDirect Storage, or its POSIX compat mode) when installed, else through two
  pinned bounce buffers whose copies overlap the next read.

Every function imports cupy lazily: this module imports on machines without it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from kvstore.tiers.base import TierIOError

H2D = 1  # cudaMemcpyHostToDevice
D2H = 2  # cudaMemcpyDeviceToHost
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


def cupy_or_raise() -> Any:
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
    cupy = cupy_or_raise()
    cupy.cuda.runtime.hostRegister(ptr, n, _HOST_REGISTER_PORTABLE_MAPPED)
    return PinnedHost(ptr, n)


def pin_host_memory_if_gpu(buf: Any) -> PinnedHost | None:
    """:func:`pin_host_memory` where a GPU is present, else ``None`` (nothing to gain).

    The DRAM tier calls this on its arena at start and
    :func:`unpin_host_memory` on the result (when not ``None``) before unmapping.
    """
    if not cuda_available():
        return None
    return pin_host_memory(buf)


def unpin_host_memory(pinned: PinnedHost) -> None:
    """Undoes :func:`pin_host_memory`; a second call does nothing."""
    if not pinned.pinned:
        return
    cupy = cupy_or_raise()
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
            "strides": None,
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
    cupy = cupy_or_raise()
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
                dptr + dst_off, int(arrs[i].ctypes.data), len(chunk), H2D, stream.ptr
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
