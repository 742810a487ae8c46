"""Byte-plane split/merge: the numpy twin, the CUDA kernel's byte selectors (by
emulation, on CPU) and the cupy kernel against the twin (GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import byteplane
from kernels.byteplane import BytePlaneError, merge, split


def _naive_split(b: bytes) -> bytes:
    return bytes(b[0::2]) + bytes(b[1::2])


@pytest.mark.parametrize("n", [0, 1, 7, 8, 1000, 4099, 3 * 65536 + 5])
def test_split_matches_naive_and_merge_inverts(n: int) -> None:
    rng = np.random.default_rng(n)
    vals = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    planes = split(vals)
    assert planes.dtype == np.uint8 and planes.size == 2 * n
    assert planes.tobytes() == _naive_split(vals.tobytes())
    assert merge(planes).tobytes() == vals.tobytes()


def test_bf16_high_plane_holds_sign_and_exponent() -> None:
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    planes = split(x.view(torch.int16).numpy())
    hi = planes[3:]
    # bf16 1.0 = 0x3F80, -2.0 = 0xC000, 0.5 = 0x3F00 (little-endian: high byte second).
    assert hi.tolist() == [0x3F, 0xC0, 0x3F]


def test_accepts_bytes_and_writes_into_out() -> None:
    data = bytes(range(16))
    out = np.full(16, 0xA5, np.uint8)
    assert split(data, out=out) is out
    assert out.tobytes() == _naive_split(data)
    back = bytearray(16)
    merge(out, out=np.frombuffer(back, np.uint8))
    assert bytes(back) == data


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: split(b"abc"), "odd"),
        (lambda: merge(b"abc"), "even"),
        (lambda: split(b"abcd", out=np.empty(2, np.uint8)), "need 4"),
        (lambda: split(b"abcd", out=np.frombuffer(b"wxyz", np.uint8)), "writable"),
        (lambda: split(np.zeros((4, 4), np.uint16)[:, ::2]), "contiguous"),
    ],
)
def test_rejects_bad_input(call, match: str) -> None:
    with pytest.raises(BytePlaneError, match=match):
        call()


def _byte_perm(x: int, y: int, sel: int) -> int:
    """CUDA's __byte_perm (default mode) in Python."""
    pool = (x | (y << 32)).to_bytes(8, "little")
    return int.from_bytes(bytes(pool[(sel >> (4 * i)) & 7] for i in range(4)), "little")


def test_cuda_byte_selectors_by_emulation() -> None:
    """The kernel's vector path, word by word, with the selectors it is built with."""
    rng = np.random.default_rng(0)
    vals = rng.integers(0, 1 << 16, 8, dtype=np.uint16)  # one 16-byte vector
    words = np.frombuffer(vals.tobytes(), "<u4").tolist()
    bp = byteplane
    lo = [_byte_perm(words[0], words[1], bp.SEL_EVEN), _byte_perm(words[2], words[3], bp.SEL_EVEN)]
    hi = [_byte_perm(words[0], words[1], bp.SEL_ODD), _byte_perm(words[2], words[3], bp.SEL_ODD)]
    planes = np.array(lo + hi, "<u4").tobytes()
    assert planes == split(vals).tobytes()
    merged = [
        _byte_perm(lo[0], hi[0], bp.SEL_LO_PAIR),
        _byte_perm(lo[0], hi[0], bp.SEL_HI_PAIR),
        _byte_perm(lo[1], hi[1], bp.SEL_LO_PAIR),
        _byte_perm(lo[1], hi[1], bp.SEL_HI_PAIR),
    ]
    assert np.array(merged, "<u4").tobytes() == vals.tobytes()
    for name in ("SEL_EVEN", "SEL_ODD", "SEL_LO_PAIR", "SEL_HI_PAIR"):
        assert hex(getattr(bp, name)) in bp.CUDA_SOURCE


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 7, 8, 1 << 20, (1 << 20) + 5])
@pytest.mark.parametrize("offset", [0, 2])  # 2: unaligned, the bytewise path
def test_cupy_kernel_matches_twin(n: int, offset: int) -> None:
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(n)
    host = rng.integers(0, 256, 2 * n + offset, dtype=np.uint8)
    dev = cupy.asarray(host)[offset:]
    out = cupy.full(2 * n, 0xA5, cupy.uint8)
    byteplane.split(dev, out=out)
    want = split(host[offset:])
    assert cupy.asnumpy(out).tobytes() == want.tobytes()
    back = cupy.full(2 * n, 0x5A, cupy.uint8)
    byteplane.merge(out, out=back)
    assert cupy.asnumpy(back).tobytes() == host[offset:].tobytes()


def _emulate_split(src: bytes, src_ptr: int, dst_ptr: int) -> bytes:
    """kvs_bp_split over every thread of its launch, word by word (little-endian)."""
    n = len(src) // 2
    nvec, grid = byteplane.launch_shape(src_ptr, dst_ptr, n)
    dst = bytearray(b"\xa5" * len(src))
    stride = grid * byteplane.THREADS
    for tid in range(stride):
        for v in range(tid, nvec, stride):
            x = [
                int.from_bytes(src[16 * v + 4 * j : 16 * v + 4 * j + 4], "little") for j in range(4)
            ]
            lo = (
                _byte_perm(x[0], x[1], byteplane.SEL_EVEN),
                _byte_perm(x[2], x[3], byteplane.SEL_EVEN),
            )
            hi = (
                _byte_perm(x[0], x[1], byteplane.SEL_ODD),
                _byte_perm(x[2], x[3], byteplane.SEL_ODD),
            )
            dst[8 * v : 8 * v + 8] = b"".join(w.to_bytes(4, "little") for w in lo)
            dst[n + 8 * v : n + 8 * v + 8] = b"".join(w.to_bytes(4, "little") for w in hi)
        for k in range(nvec * 8 + tid, n, stride):
            dst[k] = src[2 * k]
            dst[n + k] = src[2 * k + 1]
    return bytes(dst)


@pytest.mark.parametrize(
    ("n", "src_ptr", "dst_ptr"), [(64, 0, 0), (61, 0, 0), (64, 2, 0), (3000, 256, 4096)]
)
def test_split_kernel_by_emulation(n: int, src_ptr: int, dst_ptr: int) -> None:
    """Vector path, tail and the bytewise fallback together cover every byte once."""
    data = np.random.default_rng(n).integers(0, 256, 2 * n, dtype=np.uint8).tobytes()
    assert _emulate_split(data, src_ptr, dst_ptr) == split(data).tobytes()
