"""The committed stubs must match proto/kvstore.proto (regenerate with `make proto`)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_in_sync(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    from kvstore._proto.generate import generate

    generate(tmp_path)
    for name in ("kvstore_pb2.py", "kvstore_pb2_grpc.py", "kvstore_pb2.pyi"):
        fresh = (tmp_path / "kvstore" / "_proto" / name).read_text()
        committed = (ROOT / "kvstore" / "_proto" / name).read_text()
        assert fresh == committed, f"kvstore/_proto/{name} is stale: run `make proto`"
