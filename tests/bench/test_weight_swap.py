"""The weight-swap benchmark runs end to end on tiny models and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    cmd = [sys.executable, "-m", "bench.weight_swap", "--json", "--model-bytes", "8MiB"]
    cmd += ["--hidden", "256", "--repeats", "1", "--work-dir", str(tmp_path / "w")]
    cmd += ["--chart", str(tmp_path / "c.png"), "--settle", "0", "--no-drop-caches"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    for k in KEYS:
        assert isinstance(res[k], float) and res[k] > 0, k
    assert "torch.load" in res["peers_cold_gbps"]
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert "swap A->B" in out.stderr
