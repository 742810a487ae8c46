"""Compiles every CUDA source of :mod:`kernels` to PTX with NVRTC, without a GPU.

NVRTC only needs its shared library (the ``nvidia-cuda-nvrtc`` wheel), not a
driver or a device, so CI catches a kernel that would not compile before it ever
reaches a GPU.  ``python -m kernels.nvrtc_check`` prints one line per kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from pathlib import Path

from kernels import byteplane, cuda_paged

SOURCES: dict[str, str] = {
    "paged": cuda_paged.CUDA_SOURCE,
    "byteplane": byteplane.CUDA_SOURCE,
}
DEFAULT_ARCH = "compute_90"  # Hopper (H100/H200); PTX needs no device


class NvrtcUnavailable(RuntimeError):
    """No libnvrtc found."""


def find_nvrtc() -> str:
    """Path of libnvrtc: ``$KVSTORE_NVRTC``, the pip wheel, or the system library."""
    env = os.environ.get("KVSTORE_NVRTC")
    if env:
        return env
    for entry in sys.path:
        for pat in ("nvidia/cu13/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
            hits = sorted(h for h in glob.glob(str(Path(entry) / pat)) if "builtins" not in h)
            if hits:
                return hits[0]
    found = ctypes.util.find_library("nvrtc")
    if found:
        return found
    raise NvrtcUnavailable(
        "libnvrtc not found (pip install nvidia-cuda-nvrtc, or set KVSTORE_NVRTC)"
    )


def compile_ptx(source: str, name: str, arch: str = DEFAULT_ARCH) -> str:
    """Compiles ``source`` and returns the PTX.

    Raises:
        NvrtcUnavailable: no libnvrtc.
        RuntimeError: the compile failed; the message holds NVRTC's log.
    """
    lib = ctypes.CDLL(find_nvrtc())
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(
        ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None
    )
    if rc:
        raise RuntimeError(f"nvrtcCreateProgram failed with {rc}")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc:
            raise RuntimeError(f"{name}: NVRTC compile failed ({rc}):\n{log.value.decode()}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def main() -> int:
    for name, src in SOURCES.items():
        ptx = compile_ptx(src, name)
        entries = [ln.split()[-1] for ln in ptx.splitlines() if ".entry" in ln]
        print(f"{name}: ok, {len(ptx)} bytes of PTX, entries {entries}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
