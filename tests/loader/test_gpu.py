"""The CUDA path (pinned staging ring); skipped where no CUDA device is present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loader.gpu import copy_to_cuda
from tests.loader.conftest import small_model


@pytest.mark.gpu
def test_copy_to_cuda_through_pinned_ring() -> None:
    host = small_model(1, layers=4)
    dev = torch.device("cuda")
    out = copy_to_cuda(host, dev, buffers=2, buffer_bytes=16 << 10)  # many chunks
    for k, v in host.items():
        assert out[k].device.type == "cuda"
        assert torch.equal(out[k].cpu(), v), k


def test_cuda_request_without_cuda_is_clear() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        copy_to_cuda({"a": torch.ones(2)}, torch.device("cuda"))


@pytest.mark.gpu
def test_load_file_straight_to_cuda(tmp_path: Path) -> None:
    from loader.gpu import load_file_to_cuda
    from loader.store import ModelStore
    from tests.loader.conftest import write_model

    ref = small_model(2, layers=6)
    with ModelStore(tmp_path / "d") as st:
        m = st.add("m", write_model(tmp_path / "m.safetensors", ref))
        got = load_file_to_cuda(str(st.data_path(m)), m, torch.device("cuda"))
    for k, v in ref.items():
        assert torch.equal(got[k].cpu(), v), k


def test_cuda_sink_protocol_on_cpu() -> None:
    """The sink's copy logic, run with a CPU buffer (the CPU twin of the GPU path)."""
    from loader.gpu import CudaSink

    sink = CudaSink.__new__(CudaSink)
    sink.buffer = torch.zeros(8192, dtype=torch.uint8)
    data = bytearray(range(256)) * 16
    sink.consume(4096, memoryview(data))
    assert sink.target(0, 4096) is None
    assert bytes(sink.buffer[4096:].numpy()) == bytes(data)


@pytest.mark.gpu
@pytest.mark.parametrize("use_kvikio", [True, False])
def test_load_file_to_cuda_kvikio_or_ring(tmp_path: Path, use_kvikio: bool) -> None:
    from loader.gpu import load_file_to_cuda
    from loader.store import ModelStore
    from tests.loader.conftest import write_model

    if use_kvikio:
        pytest.importorskip("kvikio")
    ref = small_model(4, layers=8)
    with ModelStore(tmp_path / "d", chunk_bytes=64 << 10) as st:
        m = st.add("m", write_model(tmp_path / "m.safetensors", ref))
        got = load_file_to_cuda(
            str(st.data_path(m)), m, torch.device("cuda"), use_kvikio=use_kvikio
        )
    for k, v in ref.items():
        assert got[k].device.type == "cuda"
        assert torch.equal(got[k].cpu(), v), k


@pytest.mark.gpu
def test_load_file_to_cuda_names_a_corrupt_tensor(tmp_path: Path) -> None:
    # Through kvikio when installed: the chunk mismatch falls back to the pinned ring,
    # whose per-tensor checksums name the tensor.
    from loader.errors import ModelChecksumError
    from loader.gpu import load_file_to_cuda
    from loader.store import ModelStore
    from tests.loader.conftest import flip_byte, write_model

    with ModelStore(tmp_path / "d", chunk_bytes=64 << 10) as st:
        m = st.add("m", write_model(tmp_path / "m.safetensors", small_model(5, layers=8)))
        t = next(t for t in m.tensors if t.name == "layers.6.attn.qkv")
        flip_byte(st.data_path(m), t.offset + 7)
        with pytest.raises(ModelChecksumError, match=r"layers\.6\.attn\.qkv"):
            load_file_to_cuda(str(st.data_path(m)), m, torch.device("cuda"))
