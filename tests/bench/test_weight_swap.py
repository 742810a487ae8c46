"""The weight-swap benchmark runs end to end on tiny models and reports every figure."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KEYS = (
    "cold_load_gbps",
    "raw_read_gbps",
    "cold_ratio_to_raw",
    "best_peer_cold_gbps",
    "warm_load_gbps",
    "memcpy_gbps",
    "swap_dram_ms",
    "swap_nvme_ms",
)


def test_weight_swap_json(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "mine.txt").write_text("not the benchmark's")
    cmd = [sys.executable, "-m", "bench.weight_swap", "--json", "--model-bytes", "8MiB"]
    cmd += ["--hidden", "256", "--repeats", "1", "--work-dir", str(tmp_path / "w")]
    cmd += ["--chart", str(tmp_path / "c.png"), "--settle", "0", "--no-drop-caches"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    for k in KEYS:
        assert isinstance(res[k], float) and res[k] > 0, k
    assert "torch.load" in res["peers_cold_gbps"]
    # As many cold loads as raw reads in the round; each side's fastest is compared.
    from bench.weight_swap import RAW_KINDS

    assert len(res["samples"]["cold_load_gbps"]) == len(RAW_KINDS)
    assert all(len(res["samples"][f"raw:{k}"]) == 1 for k in RAW_KINDS)
    # (the samples in the JSON are rounded to 4 decimals)
    fastest_raw = max(res["samples"][f"raw:{k}"][0] for k in RAW_KINDS)
    assert res["raw_read_gbps"] == pytest.approx(fastest_raw, abs=1e-4)
    assert res["cold_load_gbps"] == pytest.approx(max(res["samples"]["cold_load_gbps"]), abs=1e-4)
    assert res["cold_load_single_gbps"] <= res["cold_load_gbps"]
    assert res["cold_ratio_by_round"] == [round(res["cold_ratio_to_raw"], 4)]
    # The daemon's ready line says how contiguous its arena came out (-1: not root).
    assert isinstance(res["arena_runs_per_4mib"], int)
    if os.geteuid() == 0:
        assert res["arena_runs_per_4mib"] >= 1
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert "swap A->B" in out.stderr
    # A given work dir keeps what was there; the run's own files are gone.
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["mine.txt"]


def _args(**kw: object) -> argparse.Namespace:
    from bench.weight_swap import parser

    args = parser().parse_args(["--model-bytes", "8MiB"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_a_full_disk_is_said_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from bench import weight_swap

    real = shutil.disk_usage
    monkeypatch.setattr(weight_swap.shutil, "disk_usage", lambda p: real(p)._replace(free=40 << 20))
    work = tmp_path / "w"
    work.mkdir()
    (work / "mine.txt").write_text("not the benchmark's")
    with pytest.raises(SystemExit, match=r"has 0.0 GiB free, the run needs about 0.3 GiB"):
        weight_swap.run(_args(work_dir=str(work)))
    assert [p.name for p in work.iterdir()] == ["mine.txt"]


def test_a_failed_run_removes_its_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import weight_swap

    made: list[Path] = []

    def fail(args: argparse.Namespace, work: Path, model_bytes: int) -> None:
        (work / "A.pt").write_bytes(b"x" * 4096)
        made.append(work)
        raise RuntimeError("disk full half-way")

    monkeypatch.setattr(weight_swap, "_run", fail)
    monkeypatch.setattr(weight_swap.tempfile, "mkdtemp", lambda **kw: str(tmp_path / "tmpdir"))
    with pytest.raises(RuntimeError, match="half-way"):
        weight_swap.run(_args())
    assert made == [tmp_path / "tmpdir"] and not made[0].exists()
