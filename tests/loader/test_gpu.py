"""The CUDA path (pinned staging ring); skipped where no CUDA device is present."""

from __future__ import annotations

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
