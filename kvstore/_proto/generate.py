"""Regenerate the stubs: ``python -m kvstore._proto.generate [OUT_ROOT]``."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def generate(out_root: Path) -> None:
    from grpc_tools import protoc  # dev dependency

    (out_root / "kvstore" / "_proto").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"--proto_path=kvstore/_proto={ROOT / 'proto'}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        "kvstore/_proto/kvstore.proto",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
