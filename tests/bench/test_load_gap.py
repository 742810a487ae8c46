"""``python -m bench.load_gap``: a small run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_load_gap_small_run(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.load_gap", "--json", "--model-bytes", "8MiB"]
    cmd += ["--hidden", "256", "--rounds", "2", "--daemons", "2", "--settle", "0"]
    cmd += ["--no-drop-caches"]
    cmd += ["--work-dir", str(tmp_path / "w")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["rounds"] == 2 and res["model_bytes"] > 8_000_000
    assert len(res["configs"]) == 6  # 3 configurations x 2 daemons
    assert sum(name.endswith(" #2") for name in res["configs"]) == 3
    for name, s in res["configs"].items():
        assert set(s) == {"raw_s", "daemon_read_s", "open_s", "touched_s", "daemon_start_s"}
        assert s.pop("daemon_start_s") > 0
        for k, v in s.items():
            assert len(v) == 2 and all(x > 0 for x in v), (name, k)
        # Each step contains the one before it (the client's clock includes the
        # daemon's read; touching comes after open_model returned).
        steps = zip(s["daemon_read_s"], s["open_s"], s["touched_s"], strict=True)
        for read, opened, touched in steps:
            assert read <= opened <= touched, name
    assert "checksums off" in out.stderr and "+ touch" in out.stderr
    assert not (tmp_path / "w").exists()  # cleaned up without --keep


def test_load_gap_rejects_bad_counts() -> None:
    for bad in (["--rounds", "0"], ["--daemons", "0"]):
        cmd = [sys.executable, "-m", "bench.load_gap", *bad]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "at least 1" in out.stderr
