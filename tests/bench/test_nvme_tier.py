"""The NVMe tier benchmark runs end to end on a small size and reports its fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import nvme_tier


def test_bench_small_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = nvme_tier.main(
        [
            "--json",
            "--total-mib",
            "32",
            "--dir",
            str(tmp_path),
            "--rounds",
            "1",
            "--no-global-drop",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed == out
    for k in ("read_gbps", "write_gbps", "raw_read_gbps", "raw_write_gbps"):
        assert out[k] > 0
    assert out["read_ratio_to_raw"] == pytest.approx(
        out["read_gbps"] / out["raw_read_gbps"], rel=0.01
    )
    assert out["write_ratio_to_raw"] == pytest.approx(
        out["write_gbps"] / out["raw_write_gbps"], rel=0.01
    )
    assert out["cache_drop"].startswith("posix_fadvise")
    assert list(tmp_path.iterdir()) == []  # cleaned up


def test_bench_rejects_bad_size(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        nvme_tier.main(["--total-mib", "3", "--dir", str(tmp_path)])


def test_bench_with_compression(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = nvme_tier.main(
        [
            "--json",
            "--total-mib",
            "32",
            "--dir",
            str(tmp_path),
            "--rounds",
            "1",
            "--no-global-drop",
            "--compression",
            "byteplane-zstd",
        ]
    )
    assert json.loads(capsys.readouterr().out) == out
    assert (out["compression"], out["data"]) == ("byteplane-zstd", "bf16")
    assert 1.2 < out["compression_ratio"] < 2  # bf16: ~1.4x (the exponent plane only)
    assert out["codec_block_ratio"] > 1.2
    assert out["codec_encode_gbps_1thread"] > 0 and out["codec_decode_gbps_1thread"] > 0
    assert out["read_gbps"] > 0 and out["write_gbps"] > 0
    # Off, the same bf16 blocks are stored raw.
    off = nvme_tier.main(
        ["--json", "--total-mib", "32", "--dir", str(tmp_path), "--rounds", "1"]
        + ["--no-global-drop", "--data", "bf16"]
    )
    assert off["compression_ratio"] == pytest.approx(1.0)
    assert list(tmp_path.iterdir()) == []
