"""Time to first token of a request whose prefix another engine computed: with and without kvstore.

Run from the repository root, in the vLLM venv (``make vllm-env``)::

    make bench-vllm                     # or: .venv-vllm/bin/python -m bench.e2e_vllm
    .venv-vllm/bin/python -m bench.e2e_vllm --quick --lengths 512,2048

For each model (random weights, built locally; nothing is downloaded) and each
prefix length L, prompt A (L + 64 tokens) is served by engine 1 with the kvstore
connector, which saves A's full blocks in the daemon.  Then, in fresh engine
processes (their own prefix caches empty):

* **kvstore**: engine 2 with the connector serves B = A[:L] + 64 new tokens: the
  L-token prefix is loaded from kvstore, only the rest is computed;
* **recompute**: an engine without kvstore serves the same B from scratch.

TTFT is the wall time of ``LLM.generate`` with ``max_tokens=1`` (offline mode:
schedule + lookup/load + prefill + first sample).  Every engine first serves an
unrelated warm-up prompt.  The limit, measured in the same run: TTFT of the
64-token suffix alone in the kvstore engine (the compute kvstore cannot skip)
plus a numpy memcpy of the prefix's KV bytes (the copy kvstore cannot beat).
``ratio`` = measured kvstore TTFT / that limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.kv_throughput import start_daemon
from bench.vllm_harness import make_tiny_llama, random_prompt, run_engine

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = 64
BLOCK = 128
MODELS: dict[str, dict[str, Any]] = {
    # the e2e test's model: prefill is cheap, so overheads dominate
    "tiny": dict(layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256),
    # ~18M parameters: prefill of a few thousand tokens takes long enough to matter
    "small": dict(layers=6, hidden=512, heads=8, kv_heads=2, intermediate=1408),
}


def kv_bytes_per_token(m: dict[str, Any], dtype_bytes: int = 2) -> int:
    head_dim = m["hidden"] // m["heads"]
    return int(m["layers"] * 2 * m["kv_heads"] * head_dim * dtype_bytes)


def memcpy_seconds(nbytes: int, reps: int = 5) -> float:
    """Median time of a warm numpy copy of ``nbytes`` (the floor of any KV load)."""
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(counters: dict[str, dict[str, float]]) -> dict[str, float]:
    return next((v for k, v in counters.items() if k.startswith("worker")), {})


def bench_model(
    name: str, lengths: list[int], pairs: int, workdir: Path, socket: str, say: Any
) -> dict[str, Any]:
    m = MODELS[name]
    model = str(make_tiny_llama(workdir / f"model-{name}", **m))
    warm = {"prompt": random_prompt(200, seed=999), "max_tokens": 1}
    prompts_a: dict[int, list[list[int]]] = {}
    prompts_b: dict[int, list[list[int]]] = {}
    for L in lengths:
        prompts_a[L] = [random_prompt(L + SUFFIX, seed=1000 * L + i) for i in range(pairs)]
        prompts_b[L] = [
            a[:L] + random_prompt(SUFFIX, seed=7000 * L + i) for i, a in enumerate(prompts_a[L])
        ]
    max_len = max(lengths) + 2 * SUFFIX + 256

    def spec(kv: dict[str, Any] | None, steps: list[dict[str, Any]]) -> dict[str, Any]:
        return {"model": model, "kvstore": kv, "block_size": BLOCK, "max_model_len": max_len,
                "steps": steps}  # fmt: skip

    def kv(tag: str) -> dict[str, Any]:
        return {"socket": socket, "stats_dir": str(workdir / "stats" / f"{name}-{tag}")}

    one = [{"prompt": a, "max_tokens": 1} for L in lengths for a in prompts_a[L]]
    say(f"[{name}] engine 1: fills kvstore with {len(one)} prompts")
    run_engine(spec(kv("fill"), [warm, *one]), workdir / "runs", f"{name}-fill")

    timed = [{"prompt": b, "max_tokens": 1} for L in lengths for b in prompts_b[L]]
    suffix_only = [
        {"prompt": random_prompt(SUFFIX, seed=50 + i), "max_tokens": 1} for i in range(pairs)
    ]
    say(f"[{name}] engine 2 (fresh, kvstore): {len(timed)} timed requests")
    hot = run_engine(spec(kv("load"), [warm, *suffix_only, *timed]), workdir / "runs", f"{name}-kv")
    say(f"[{name}] engine 3 (fresh, no kvstore): {len(timed)} timed requests")
    cold = run_engine(spec(None, [warm, *suffix_only, *timed]), workdir / "runs", f"{name}-cold")

    hot_steps = hot["steps"][1 + pairs :]
    cold_steps = cold["steps"][1 + pairs :]
    floor = statistics.median(s["seconds"] for s in hot["steps"][1 : 1 + pairs])
    rows = []
    prev_load_s = _worker(hot["steps"][pairs]["counters"]).get("load_s", 0.0)
    i = 0
    for L in lengths:
        kv_t, cold_t, load_t, cached = [], [], [], []
        for _ in range(pairs):
            h, c = hot_steps[i], cold_steps[i]
            kv_t.append(h["seconds"])
            cold_t.append(c["seconds"])
            cached.append(h["num_cached_tokens"])
            load_s = _worker(h["counters"]).get("load_s", 0.0)
            load_t.append(load_s - prev_load_s)
            prev_load_s = load_s
            i += 1
        loaded = (L // BLOCK) * BLOCK
        nbytes = loaded * kv_bytes_per_token(m)
        copy_s = memcpy_seconds(nbytes)
        limit = floor + copy_s
        kv_med = statistics.median(kv_t)
        rows.append(
            {
                "prefix": L,
                "loaded_tokens": min(cached),
                "kv_bytes": nbytes,
                "ttft_recompute_s": statistics.median(cold_t),
                "ttft_kvstore_s": kv_med,
                "load_s": statistics.median(load_t),
                "load_gbps": nbytes / statistics.median(load_t) / 1e9 if min(load_t) > 0 else None,
                "memcpy_gbps": nbytes / copy_s / 1e9,
                "limit_s": limit,
                "speedup": statistics.median(cold_t) / kv_med,
                "ratio_to_limit": kv_med / limit,
            }
        )
        say(f"[{name}] L={L}: recompute {rows[-1]['ttft_recompute_s'] * 1e3:.0f} ms, "
            f"kvstore {kv_med * 1e3:.0f} ms, loaded {min(cached)} tokens")  # fmt: skip
    return {"model": name, "config": m, "suffix_floor_s": floor, "rows": rows}


def table(res: dict[str, Any]) -> str:
    out = [
        f"Machine: {res['machine']}; date {res['date']}; vLLM {res['vllm']} (CPU), torch "
        f"{res['torch']}; {res['pairs']} request pairs per length (medians); block {BLOCK} "
        f"tokens; suffix {SUFFIX} new tokens.",
        "",
    ]
    for mres in res["models"]:
        m = mres["config"]
        out += [
            f"### model `{mres['model']}` ({m['layers']} layers, hidden {m['hidden']}, "
            f"{m['heads']} heads, {m['kv_heads']} KV heads, bf16, random weights)",
            "",
            f"Suffix-only TTFT (the compute kvstore cannot skip): "
            f"{mres['suffix_floor_s'] * 1e3:.1f} ms",
            "",
            "| prefix tokens | loaded tokens | KV bytes | TTFT recompute | TTFT kvstore | "
            "speedup | load time (GB/s) | memcpy GB/s | limit | kvstore / limit |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mres["rows"]:
            gbps = f"{r['load_gbps']:.2f}" if r["load_gbps"] else "-"
            out.append(
                f"| {r['prefix']} | {r['loaded_tokens']} | {r['kv_bytes'] / 2**20:.1f} MiB | "
                f"{r['ttft_recompute_s'] * 1e3:.1f} ms | {r['ttft_kvstore_s'] * 1e3:.1f} ms | "
                f"{r['speedup']:.2f}x | {r['load_s'] * 1e3:.1f} ms ({gbps}) | "
                f"{r['memcpy_gbps']:.1f} | {r['limit_s'] * 1e3:.1f} ms | {r['ratio_to_limit']:.2f} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", default="512,2048,4096", help="prefix lengths, comma-separated")
    p.add_argument("--models", default="tiny,small", help=f"of: {', '.join(MODELS)}")
    p.add_argument("--pairs", type=int, default=3, help="request pairs per length")
    p.add_argument("--quick", action="store_true", help="one pair per length")
    p.add_argument("--json", action="store_true", help="print raw results as JSON")
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if any(L <= 0 for L in lengths):
        p.error("--lengths must be positive integers")
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    pairs = 1 if args.quick else args.pairs
    import torch
    import vllm

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res: dict[str, Any] = {
        "machine": f"{os.cpu_count()}-core {platform.machine()} VM",
        "date": time.strftime("%Y-%m-%d"),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "pairs": pairs,
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="kvstore-e2e-vllm-") as tmp:
        work = Path(tmp)
        proc, sock = start_daemon(work, "1GiB")
        try:
            for name in models:
                res["models"].append(bench_model(name, lengths, pairs, work, sock, say))
        finally:
            proc.terminate()
            proc.wait()
    print(json.dumps(res, indent=2) if args.json else table(res))
    if args.out:
        Path(args.out).write_text(table(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
