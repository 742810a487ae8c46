"""``python -m bench.load_gap``: a small run end to end."""

from __future__ import annotations

import json
import os
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
    dev = os.stat(tmp_path).st_dev
    on_device = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat").exists()
    for name, s in res["configs"].items():
        assert set(s) == {
            *("raw_s", "daemon_read_s", "open_s", "touched_s", "daemon_start_s"),
            *("raw_requests", "load_requests", "arena_runs_per_4mib"),
        }
        assert s.pop("daemon_start_s") > 0
        # The arena's contiguity from the daemon's ready line (-1: unknown, not root).
        assert s.pop("arena_runs_per_4mib") >= (1 if os.geteuid() == 0 else -1)
        # Counted when the data sits on a block device (0 on e.g. an overlay or tmpfs).
        for k in ("raw_requests", "load_requests"):
            counts = s.pop(k)
            assert len(counts) == 2 and all(isinstance(x, int) and x >= 0 for x in counts)
            if on_device:  # each read went to the disk (direct, or after a cache drop)
                assert all(x > 0 for x in counts), (name, k, counts)
        for k, v in s.items():
            assert len(v) == 2 and all(x > 0 for x in v), (name, k)
        # Each step contains the one before it (the client's clock includes the
        # daemon's read; touching comes after open_model returned).
        steps = zip(s["daemon_read_s"], s["open_s"], s["touched_s"], strict=True)
        for read, opened, touched in steps:
            assert read <= opened <= touched, name
    assert "checksums off" in out.stderr and "+ touch" in out.stderr
    assert "requests (raw/load)" in out.stderr
    assert list((tmp_path / "w").iterdir()) == []  # its files removed without --keep


def test_load_gap_rejects_bad_counts() -> None:
    for bad in (["--rounds", "0"], ["--daemons", "0"]):
        cmd = [sys.executable, "-m", "bench.load_gap", *bad]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "at least 1" in out.stderr


def test_read_requests_counts_a_direct_read(tmp_path: Path) -> None:
    import mmap
    import os

    import pytest

    from bench.load_gap import read_requests

    f = tmp_path / "data"
    f.write_bytes(os.urandom(1 << 20))
    dev = os.stat(f).st_dev
    if not Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat").exists():
        pytest.skip(f"{tmp_path} is not on a block device (no request counter)")
    count = read_requests(f)
    before = count()
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 20)
    try:
        assert os.preadv(fd, [buf], 0) == 1 << 20
    finally:
        os.close(fd)
        buf.close()
    assert count() > before
