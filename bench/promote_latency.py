"""Lookup latency while another client's Acquire promotes 32 x 2 MiB blocks from NVMe.

One client cycles Acquire/Release over chains of 32 blocks that no longer fit in DRAM
(every Acquire is a promotion from the NVMe tier); another issues Lookups meanwhile.
Before the promotions ran off the event loop, a Lookup that arrived during a read
waited for all of it.

    python -m bench.promote_latency [--seconds 5] [--repo PATH]

``--repo`` runs the daemon from another checkout (e.g. an older commit) for comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from kvstore import Client
from kvstore.keys import Namespace

ROOT = Path(__file__).resolve().parents[1]
NS = Namespace("bench-2mib", num_layers=32, num_kv_heads=8, head_dim=128, block_tokens=16)
CHAINS, BLOCKS = 8, 32
CONFIG = """
[[tiers]]
name = "dram"
kind = "dram"
capacity = "160MiB"
options = { slab_bytes = "32MiB" }

[[tiers]]
name = "nvme"
kind = "nvme"
capacity = "2GiB"
"""


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.promote_latency", description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repo", type=Path, default=ROOT)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sock, cfg = f"{tmp}/kv.sock", Path(tmp) / "kv.toml"
        cfg.write_text(CONFIG)
        env = dict(os.environ, PYTHONPATH=str(a.repo))
        cmd = [sys.executable, "-m", "kvstore", "serve", "--config", str(cfg)]
        cmd += ["--socket", sock, "--data-dir", f"{tmp}/data"]
        out = subprocess.DEVNULL
        d = subprocess.Popen(cmd, env=env, cwd=a.repo, stdout=out, stderr=out)
        try:
            for _ in range(300):
                if os.path.exists(sock):
                    break
                time.sleep(0.1)
            time.sleep(0.5)
            run(sock, a.seconds)
        finally:
            d.terminate()
            d.wait(30)


def run(sock: str, seconds: float) -> None:
    chains = [np.arange(i * 10**6, i * 10**6 + NS.block_tokens * BLOCKS) for i in range(CHAINS)]
    with Client(sock, timeout=60) as c:
        blk = np.ones(NS.block_nbytes, np.uint8)
        for toks in chains:
            c.store_tokens(NS, toks, [blk] * BLOCKS)
        c.stats()  # let the demotions settle
        keys = [NS.block_keys(t) for t in chains]
        stop = threading.Event()
        acq: list[float] = []

        def promote() -> None:
            with Client(sock, timeout=60) as c2:
                i = 0
                while not stop.is_set():
                    t0 = time.perf_counter()
                    c2.acquire(keys[i % CHAINS])
                    acq.append(time.perf_counter() - t0)
                    c2.release(keys[i % CHAINS])
                    i += 1

        th = threading.Thread(target=promote)
        th.start()
        lat: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            c.lookup(keys[0])
            lat.append(time.perf_counter() - t0)
            time.sleep(0.002)
        stop.set()
        th.join()
        prom = c.stats()["counters"]["promotions"]
    ms = [x * 1000 for x in lat]
    print(
        f"Lookup during promotions: n={len(ms)} p50 {statistics.median(ms):.2f} ms, "
        f"p90 {_pct(ms, 0.9):.2f} ms, p99 {_pct(ms, 0.99):.2f} ms, max {max(ms):.2f} ms, "
        f"mean {statistics.fmean(ms):.2f} ms, over 10 ms {sum(x > 10 for x in ms) / len(ms):.1%}; "
        f"Acquire of {BLOCKS} x "
        f"{NS.block_nbytes >> 20} MiB from NVMe: n={len(acq)} p50 "
        f"{statistics.median(acq) * 1000:.1f} ms; promotions {prom}"
    )


if __name__ == "__main__":
    main()
