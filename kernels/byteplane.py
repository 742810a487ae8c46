"""Byte-plane split and merge of 16-bit values (bf16, fp16).

``split`` turns ``n`` 16-bit values into two planes, ``[byte 0 of every value |
byte 1 of every value]`` (``2n`` bytes); ``merge`` interleaves them back.  On a
little-endian host byte 1 is the high byte, which for bf16 holds the sign and 7
of the 8 exponent bits: that plane compresses well (ZipNN's observation), the
low plane hardly at all, so a codec compresses only the high plane.

Each function takes numpy arrays / bytes-like objects (the numpy twin) or cupy
arrays (a cupy ``RawKernel``), and returns the same kind.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Any

import numpy as np

# __byte_perm selectors: byte i of the result is byte (selector >> 4i) & 7 of the
# 8-byte pair (x, y).  Kept here so the CPU tests can check them by emulation.
SEL_EVEN = 0x6420
"""Bytes 0, 2 of x then 0, 2 of y: byte 0 of four consecutive values."""
SEL_ODD = 0x7531
"""Bytes 1, 3 of x then 1, 3 of y: byte 1 of four consecutive values."""
SEL_LO_PAIR = 0x5140
"""lo0, hi0, lo1, hi1 from (lo, hi): the first two values, interleaved."""
SEL_HI_PAIR = 0x7362
"""lo2, hi2, lo3, hi3 from (lo, hi): the next two values, interleaved."""

THREADS = 256
_CHUNK = 1 << 16  # values per step of the numpy twin (128 KiB: stays in L2)
_LITTLE = sys.byteorder == "little"  # byte 0 is the low byte

CUDA_SOURCE = (
    r"""
extern "C" __global__ void kvs_bp_split(const unsigned char* __restrict__ src,
                                        unsigned char* __restrict__ dst,
                                        long long n, long long nvec) {
    // nvec groups of 8 values via 16-byte loads (0 when unaligned); the rest bytewise.
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint2* lo2 = reinterpret_cast<uint2*>(dst);
    uint2* hi2 = reinterpret_cast<uint2*>(dst + n);
    for (long long v = tid; v < nvec; v += stride) {
        const uint4 x = s4[v];
        lo2[v] = make_uint2(__byte_perm(x.x, x.y, SEL_EVEN), __byte_perm(x.z, x.w, SEL_EVEN));
        hi2[v] = make_uint2(__byte_perm(x.x, x.y, SEL_ODD), __byte_perm(x.z, x.w, SEL_ODD));
    }
    for (long long k = nvec * 8 + tid; k < n; k += stride) {
        dst[k] = src[2 * k];
        dst[n + k] = src[2 * k + 1];
    }
}

extern "C" __global__ void kvs_bp_merge(const unsigned char* __restrict__ src,
                                        unsigned char* __restrict__ dst,
                                        long long n, long long nvec) {
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const uint2* lo2 = reinterpret_cast<const uint2*>(src);
    const uint2* hi2 = reinterpret_cast<const uint2*>(src + n);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (long long v = tid; v < nvec; v += stride) {
        const uint2 lo = lo2[v];
        const uint2 hi = hi2[v];
        d4[v] = make_uint4(__byte_perm(lo.x, hi.x, SEL_LO_PAIR), __byte_perm(lo.x, hi.x, SEL_HI_PAIR),
                           __byte_perm(lo.y, hi.y, SEL_LO_PAIR), __byte_perm(lo.y, hi.y, SEL_HI_PAIR));
    }
    for (long long k = nvec * 8 + tid; k < n; k += stride) {
        dst[2 * k] = src[k];
        dst[2 * k + 1] = src[n + k];
    }
}
""".replace("SEL_EVEN", hex(SEL_EVEN))
    .replace("SEL_ODD", hex(SEL_ODD))
    .replace("SEL_LO_PAIR", hex(SEL_LO_PAIR))
    .replace("SEL_HI_PAIR", hex(SEL_HI_PAIR))
)


class BytePlaneError(ValueError):
    """Input that cannot be split or merged (odd length, wrong out size)."""


def _is_cupy(a: Any) -> bool:
    return type(a).__module__.startswith("cupy")


def _np_bytes(a: Any, what: str, writable: bool = False) -> np.ndarray:
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:
            raise BytePlaneError(f"{what} must be C-contiguous")
        u8 = a.reshape(-1).view(np.uint8)
    else:
        u8 = np.frombuffer(a, dtype=np.uint8)
    if writable and not u8.flags.writeable:
        raise BytePlaneError(f"{what} must be writable")
    return u8


def split(src: Any, out: Any = None) -> Any:
    """Splits 16-bit values into ``[byte-0 plane | byte-1 plane]``.

    Args:
        src: the values: a numpy array (any 2-byte dtype, or uint8 of even
            length), a bytes-like object, or a cupy array.
        out: optional destination of ``len(src bytes)`` bytes (same library).

    Returns:
        ``out`` (or a new uint8 array): the two planes back to back.

    Raises:
        BytePlaneError: odd byte count, or ``out`` of the wrong size.
    """
    if _is_cupy(src):
        return _cupy_run("kvs_bp_split", src, out)
    a = _np_bytes(src, "src")
    if a.size % 2:
        raise BytePlaneError(f"byte-plane split needs 16-bit values: {a.size} bytes is odd")
    dst = np.empty(a.size, np.uint8) if out is None else _np_bytes(out, "out", writable=True)
    if dst.size != a.size:
        raise BytePlaneError(f"out has {dst.size} bytes, need {a.size}")
    n = a.size // 2
    if not _LITTLE:
        pairs = a.reshape(n, 2)
        dst[:n] = pairs[:, 0]
        dst[n:] = pairs[:, 1]
        return dst if out is None else out
    v = a.view(np.uint16)
    for s in range(0, n, _CHUNK):  # chunks keep the shifted temporary in cache
        e = min(n, s + _CHUNK)
        np.copyto(dst[s:e], v[s:e], casting="unsafe")  # truncation keeps the low byte
        np.copyto(dst[n + s : n + e], v[s:e] >> 8, casting="unsafe")
    return dst if out is None else out


def merge(planes: Any, out: Any = None) -> Any:
    """Inverse of :func:`split`: interleaves ``[byte-0 plane | byte-1 plane]``.

    Args:
        planes: ``2n`` bytes as produced by :func:`split` (numpy, bytes-like or cupy).
        out: optional destination of ``2n`` bytes (same library).

    Returns:
        ``out`` (or a new uint8 array) holding the ``n`` 16-bit values.

    Raises:
        BytePlaneError: odd byte count, or ``out`` of the wrong size.
    """
    if _is_cupy(planes):
        return _cupy_run("kvs_bp_merge", planes, out)
    a = _np_bytes(planes, "planes")
    if a.size % 2:
        raise BytePlaneError(f"byte planes must have an even byte count, got {a.size}")
    dst = np.empty(a.size, np.uint8) if out is None else _np_bytes(out, "out", writable=True)
    if dst.size != a.size:
        raise BytePlaneError(f"out has {dst.size} bytes, need {a.size}")
    n = a.size // 2
    if not _LITTLE:
        pairs = dst.reshape(n, 2)
        pairs[:, 0] = a[:n]
        pairs[:, 1] = a[n:]
        return dst if out is None else out
    o16 = dst.view(np.uint16)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        o = o16[s:e]
        np.copyto(o, a[n + s : n + e])
        o <<= 8
        o |= a[s:e]
    return dst if out is None else out


@cache
def _kernels() -> Any:
    import cupy

    mod = cupy.RawModule(code=CUDA_SOURCE)
    return {name: mod.get_function(name) for name in ("kvs_bp_split", "kvs_bp_merge")}


def _cupy_run(name: str, src: Any, out: Any) -> Any:
    import cupy

    if not src.flags.c_contiguous:
        raise BytePlaneError("src must be C-contiguous")
    a = src.reshape(-1).view(cupy.uint8)
    if a.size % 2:
        raise BytePlaneError(f"byte-plane {name[7:]} needs an even byte count, got {a.size}")
    dst = cupy.empty(a.size, cupy.uint8) if out is None else out.reshape(-1).view(cupy.uint8)
    if dst.size != a.size:
        raise BytePlaneError(f"out has {dst.size} bytes, need {a.size}")
    n = a.size // 2
    nvec, grid = launch_shape(a.data.ptr, dst.data.ptr, n)
    if n:
        _kernels()[name]((grid,), (THREADS,), (a, dst, np.int64(n), np.int64(nvec)))
    return dst if out is None else out


def launch_shape(src_ptr: int, dst_ptr: int, n: int) -> tuple[int, int]:
    """``(nvec, grid)`` for ``n`` values: groups of 8 on the vector path, thread blocks."""
    # The vector path needs 16-byte aligned interleaved data and 8-byte aligned planes.
    aligned = src_ptr % 16 == 0 and dst_ptr % 16 == 0 and n % 8 == 0
    nvec = n // 8 if aligned else 0
    work = max(nvec, n - nvec * 8, 1)
    return nvec, min(max(1, -(-work // THREADS)), 65535 * 8)
