"""Every CUDA source compiles with NVRTC (no GPU needed, only libnvrtc)."""

from __future__ import annotations

import pytest

from kernels import nvrtc_check


@pytest.mark.parametrize("name", sorted(nvrtc_check.SOURCES))
def test_cuda_source_compiles_to_ptx(name: str) -> None:
    try:
        nvrtc_check.find_nvrtc()
    except nvrtc_check.NvrtcUnavailable as exc:
        pytest.skip(f"{exc}: the dev extra installs nvidia-cuda-nvrtc")
    ptx = nvrtc_check.compile_ptx(nvrtc_check.SOURCES[name], name)
    assert ".entry" in ptx
    if name == "paged":
        # The 16-byte vector path is really there (ld/st of 4 x u32).
        assert "ld.v4.u32" in ptx or "ld.global.v4.u32" in ptx


def test_compile_error_carries_the_nvrtc_log() -> None:
    try:
        nvrtc_check.find_nvrtc()
    except nvrtc_check.NvrtcUnavailable as exc:
        pytest.skip(str(exc))
    with pytest.raises(RuntimeError, match="NVRTC compile failed"):
        nvrtc_check.compile_ptx('extern "C" __global__ void k() { undeclared(); }', "bad")
