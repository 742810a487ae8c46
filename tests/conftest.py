"""Shared fixtures and the automatic skip of `gpu` tests where no CUDA device is present."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TRACE = SHARED / "traces" / "mooncake_conversation_part1.jsonl"


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mooncake_trace() -> Path:
    if not TRACE.exists():
        pytest.skip(f"Mooncake trace not found at {TRACE} (expected ../shared/traces/)")
    return TRACE
