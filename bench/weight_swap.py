"""The weight-swap benchmark: cold/warm load and model swap against peers and the disk.

``python -m bench.weight_swap [--quick] [--json]`` (also ``kvstore bench weight-swap``)
builds two synthetic transformer-shaped bf16 models (or takes real safetensors paths),
ingests them into a fresh store, starts a Models daemon in a subprocess and measures
in one run, on the same bytes:

the disk's raw direct read (the limit); cold load (cache dropped) and warm load
(resident) to usable tensors; swap A->B with B in DRAM and on NVMe; cold peers
(``safetensors.torch.load_file``, ``torch.load``, Run:ai Model Streamer when it
imports); memcpy of warm pages (the limit for warm loads).

"Usable" means every page of every tensor is mapped/read: each method's result is
touched (one read per 4 KiB page) inside its timing, so lazy mmaps count their I/O.

Each round reads the file raw four times (into a reused ring, an anonymous buffer,
a shared-memory buffer, and a ring in a fresh process) and cold-loads it as many
times, alternating, each after its own cache drop.  The round's limit is its fastest
raw read and the round's cold load its fastest load: the same statistic on the same
number of tries (the median single load is reported too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.weight_limits import (
    OPTIONS,
    RawReader,
    daemon,
    drop_caches,
    memcpy_gbps,
    raw_pipeline,
)
from kvstore.config import parse_size
from loader import client
from loader.pipeline import NullSink
from loader.store import ModelStore, resolve_sources

CHARTS = Path(__file__).resolve().parent / "charts"
QUICK_CHART = Path(__file__).resolve().parent / "out" / "weight_swap_quick.png"  # not committed
LOG = sys.stderr
FRESH = "ring, fresh process"
RAW_KINDS = ("ring", "anon", "shm", FRESH)
"""The raw reads of each round (``RawReader``'s destinations, and its ring from a
fresh process); each round also makes as many cold loads, alternating with them."""


def log(msg: str) -> None:
    print(msg, file=LOG, flush=True)


# ---------------------------------------------------------------------- models
def transformer_tensors(nbytes: int, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """bf16 tensors shaped like a decoder (embedding, attention, MLP, norms) of ~nbytes."""
    g = torch.Generator().manual_seed(seed)
    inter = hidden * 11 // 4 // 64 * 64
    vocab = 32000 if nbytes >= (256 << 20) else 4096

    def rnd(*shape: int) -> torch.Tensor:
        n = math.prod(shape)
        x = torch.randint(-(2**15), 2**15 - 1, (n,), dtype=torch.int16, generator=g)
        return x.view(torch.bfloat16).view(shape)

    per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 2
    embed = vocab * hidden * 2
    layers = max(1, round((nbytes - 2 * embed) / per_layer))
    out = {"model.embed_tokens.weight": rnd(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for w in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}.self_attn.{w}.weight"] = rnd(hidden, hidden)
        out[f"{p}.mlp.gate_proj.weight"] = rnd(inter, hidden)
        out[f"{p}.mlp.up_proj.weight"] = rnd(inter, hidden)
        out[f"{p}.mlp.down_proj.weight"] = rnd(hidden, inter)
        out[f"{p}.input_layernorm.weight"] = rnd(hidden)
        out[f"{p}.post_attention_layernorm.weight"] = rnd(hidden)
    out["model.norm.weight"] = rnd(hidden)
    out["lm_head.weight"] = rnd(vocab, hidden)
    return out


def touch(tensors: dict[str, torch.Tensor]) -> int:
    """Reads one byte of every 4 KiB page of every tensor (forces lazy I/O and mapping)."""
    acc = 0
    for t in tensors.values():
        if t.numel():
            b = t.reshape(-1).view(torch.uint8)
            acc += int(b[::4096].sum())
    return acc


# ---------------------------------------------------------------------- peers
def peer_safetensors(files: list[Path], pt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def peer_torch_load(files: list[Path], pt: Path) -> dict[str, torch.Tensor]:
    return dict(torch.load(pt, weights_only=True))


def peer_runai(files: list[Path], pt: Path) -> dict[str, torch.Tensor]:
    from runai_model_streamer import SafetensorsStreamer

    out: dict[str, torch.Tensor] = {}
    with SafetensorsStreamer() as s:
        s.stream_files([str(f) for f in files])
        for name, t in s.get_tensors():
            out[name] = t
    return out


def runai_available() -> str:
    try:
        import runai_model_streamer  # noqa: F401
    except ImportError as exc:  # also covers a missing native library
        return f"runai-model-streamer does not import ({exc}); install the [bench] extra"
    return ""


# ---------------------------------------------------------------------- run
def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


WORK_FILES = ("A.safetensors", "B.safetensors", "A.pt", "B.pt", "store")
"""What a run writes into its work dir (all removed at the end unless ``--keep``)."""


@contextlib.contextmanager
def work_dir(given: str, keep: bool, prefix: str, files: Sequence[str]) -> Iterator[Path]:
    """A benchmark's work dir, cleaned up however the run ends unless ``keep``: a
    fresh one under /var/tmp is removed; a ``given`` one keeps everything but the
    run's ``files``."""
    work = Path(given or tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        yield work
    finally:
        if not keep:
            if not given:
                shutil.rmtree(work, ignore_errors=True)
            else:
                for name in files:
                    p = work / name
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark in a work dir that is removed afterwards, also on failure."""
    quick = args.quick
    model_bytes = parse_size(args.model_bytes or ("64MiB" if quick else "1GiB"), "--model-bytes")
    with work_dir(args.work_dir, args.keep, "kvstore-ws-", WORK_FILES) as work:
        check_space(work, work_bytes(model_bytes, args.paths))
        return _run(args, work, model_bytes)


def check_space(work: Path, need: int) -> None:
    """Fails at once, saying what it needs, when the work dir's disk does not have
    ``need`` bytes (plus room for headers, manifests and alignment) free."""
    need += 256 << 20
    free = shutil.disk_usage(work).free
    if need > free:
        raise SystemExit(
            f"{Path(sys.argv[0]).stem or 'bench'}: the work dir {work} has "
            f"{free / 2**30:.1f} GiB free, the run needs about {need / 2**30:.1f} GiB "
            "(--work-dir elsewhere, or --model-bytes)"
        )


def work_bytes(model_bytes: int, paths: list[str] | None) -> int:
    """What a run writes: per model a safetensors file (unless given), a ``.pt`` copy
    and the store's aligned copy."""
    if paths:
        return sum(2 * sum(f.path.stat().st_size for f in resolve_sources(p)) for p in paths)
    return 2 * 3 * model_bytes


def _run(args: argparse.Namespace, work: Path, model_bytes: int) -> dict[str, Any]:
    from tqdm import tqdm

    quick = args.quick
    hidden = args.hidden or (512 if quick else 2048)
    repeats = args.repeats or (1 if quick else 3)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["machine"] = f"{os.cpu_count()} CPUs, {os.uname().release}"
    log(f"work dir {work}")

    # -- models: synthetic or given
    sources: list[list[Path]] = []
    pts: list[Path] = []
    for i, name in enumerate("AB"):
        if args.paths:
            files = [f.path for f in resolve_sources(args.paths[i])]
            tensors = peer_safetensors(files, Path())
        else:
            tensors = transformer_tensors(model_bytes, hidden, seed=i)
            from safetensors.torch import save_file

            files = [work / f"{name}.safetensors"]
            save_file(tensors, str(files[0]))
        pt = work / f"{name}.pt"
        torch.save(tensors, pt)
        del tensors
        sources.append(files)
        pts.append(pt)
    store_dir = work / "store"
    with ModelStore(store_dir) as st:
        ingest = []
        for i, name in enumerate("AB"):
            with contextlib.suppress(Exception):
                st.remove(name)
            t0 = time.perf_counter()
            m = st.add(name, args.paths[i] if args.paths else sources[i][0])
            ingest.append(m.tensor_bytes / (time.perf_counter() - t0) / 1e9)
        ma, mb = st.get("A"), st.get("B")
        data_a, data_b = st.data_path(ma), st.data_path(mb)
    nbytes = ma.tensor_bytes
    res.update(model_bytes=nbytes, num_tensors=len(ma.tensors), ingest_gbps=max(ingest))
    all_files = [*sources[0], *sources[1], *pts, data_a, data_b]
    peers: dict[str, Callable[[list[Path], Path], dict[str, torch.Tensor]]] = {
        "safetensors.load_file": peer_safetensors,
        "torch.load": peer_torch_load,
    }
    why = runai_available()
    if why:
        log(f"skipping Run:ai Model Streamer: {why}")
        res["runai_skipped"] = why
    else:
        peers["runai-model-streamer"] = peer_runai

    samples: dict[str, list[float]] = {}

    def add(key: str, v: float) -> None:
        samples.setdefault(key, []).append(v)

    budget = int((ma.nbytes + mb.nbytes) * 1.1) + (64 << 20)
    t0 = time.perf_counter()
    # Closed however the run ends (a failed daemon start included).
    info: dict[str, Any] = {}
    with (
        contextlib.closing(RawReader(ma.nbytes)) as raw,
        daemon(store_dir, budget, info=info) as sock,
    ):
        res["prefault_s"] = time.perf_counter() - t0
        res["arena_runs_per_4mib"] = info["arena_runs_per_4mib"]
        res["arena_prefault_retries"] = info.get("prefault_retries", 0)
        stub = client._stub(sock)
        steps = (repeats + 1) * (4 + 2 * len(RAW_KINDS) + len(peers))
        bar = tqdm(total=steps, desc="weight-swap", unit="step", file=LOG)

        def cold_raw(kind: str) -> Callable[[], None]:
            def read() -> None:
                if kind == FRESH:
                    s = raw.read_fresh(data_a, ma.nbytes)
                else:
                    s = raw.read_one(kind, data_a, ma.nbytes)
                add(f"raw:{kind}", nbytes / s / 1e9)

            return read

        def cold_kvstore() -> None:
            t0 = time.perf_counter()
            loaded = client.open_model(stub, "A", session_id=1)
            add("cold_usable_s", time.perf_counter() - t0)
            touch(loaded.tensors)
            add("cold_load_gbps", nbytes / (time.perf_counter() - t0) / 1e9)
            add("daemon_read_gbps", nbytes / loaded.info.load_seconds / 1e9)
            res["daemon_direct_io"] = loaded.info.direct_io
            client.release_model(stub, "A", 1, evict=True)

        def cold_peer(pname: str, fn: Callable[..., dict[str, torch.Tensor]]) -> Callable[[], None]:
            def run_peer() -> None:
                t0 = time.perf_counter()
                out = fn(sources[0], pts[0])
                touch(out)
                add(f"peer:{pname}", nbytes / (time.perf_counter() - t0) / 1e9)

            return run_peer

        # As many cold loads as raw reads per round, alternating: the round's limit is
        # the fastest of its raw reads, and our figure the fastest of as many loads.
        cold: list[Callable[[], None]] = []
        for kind in RAW_KINDS:
            cold += [cold_raw(kind), cold_kvstore]
        cold += [cold_peer(k, f) for k, f in peers.items()]
        # Round -1 warms every method up and is not recorded: a process's first call
        # of anything (thread pools, torch's first ops on a dtype, gRPC's first calls)
        # costs extra once, in whichever method happens to run first.
        for r in range(-1, repeats):
            if r == 0:
                samples.clear()
                raw.samples.clear()
            # Cold reads, in a rotated order each round, each after the same cache drop
            # and idle time: this disk is shared and throttled (a read that follows a
            # long idle runs faster than one that follows another read), so no method
            # may always go first.
            client.release_model(stub, "A", 1, evict=True)
            client.release_model(stub, "B", 1, evict=True)
            for fn in cold[r % len(cold) :] + cold[: r % len(cold)]:
                res["cache_drop"] = drop_caches(all_files) or "ok"
                fn()
                bar.update()
            # The round's limit: the fastest of its raw reads; ours: the fastest of as
            # many cold loads (every single load is kept too, for the table).
            add("raw_read_gbps", max(samples[f"raw:{k}"][-1] for k in RAW_KINDS))
            add("cold_best_gbps", max(samples["cold_load_gbps"][-len(RAW_KINDS) :]))
            # warm: resident in the daemon, a fresh mapping in the client
            ta = client.load_model(stub, "A", session_id=1)
            t0 = time.perf_counter()
            tw = client.load_model(stub, "A", session_id=2)
            touch(tw)
            add("warm_load_gbps", nbytes / (time.perf_counter() - t0) / 1e9)
            client.release_model(stub, "A", 2)
            del tw
            bar.update()
            # swap A->B with B resident in DRAM
            client.load_model(stub, "B", session_id=3, pin=False)
            t0 = time.perf_counter()
            tb = client.swap_models(stub, "A", "B", session_id=1)
            add("swap_dram_ms", (time.perf_counter() - t0) * 1e3)
            touch(tb)
            add("swap_dram_touched_ms", (time.perf_counter() - t0) * 1e3)
            del tb
            client.swap_models(stub, "B", "A", session_id=1)
            bar.update()
            # swap A->B with B only on NVMe
            client.release_model(stub, "B", 1, evict=True)
            drop_caches(all_files)
            t0 = time.perf_counter()
            tb = client.swap_models(stub, "A", "B", session_id=1)
            add("swap_nvme_ms", (time.perf_counter() - t0) * 1e3)
            touch(tb)
            add("swap_nvme_touched_ms", (time.perf_counter() - t0) * 1e3)
            del tb, ta
            client.release_model(stub, "B", 1)
            bar.update()
            # warm peer (page cache holds the file now), for the table
            touch(peer_safetensors(sources[0], pts[0]))
            t0 = time.perf_counter()
            touch(peer_safetensors(sources[0], pts[0]))
            add("peer_warm:safetensors.load_file", nbytes / (time.perf_counter() - t0) / 1e9)
            bar.update()
        bar.close()
        res["daemon_stats"] = client.list_models(stub)
        res["raw_samples_s"] = {k: [round(x, 3) for x in v] for k, v in raw.samples.items()}
        res["raw_direct"] = raw.direct
    add("memcpy_gbps", memcpy_gbps())
    res["samples"] = {k: [round(x, 4) for x in v] for k, v in samples.items()}
    med = {k: statistics.median(v) for k, v in samples.items()}
    peer_cold = {k[5:]: v for k, v in med.items() if k.startswith("peer:")}
    res.update(
        cold_load_gbps=med["cold_best_gbps"],
        raw_read_gbps=med["raw_read_gbps"],
        cold_ratio_to_raw=med["cold_best_gbps"] / med["raw_read_gbps"],
        cold_load_single_gbps=med["cold_load_gbps"],
        cold_ratio_single_to_raw=med["cold_load_gbps"] / med["raw_read_gbps"],
        cold_ratio_by_round=[
            round(c / r, 4)
            for c, r in zip(samples["cold_best_gbps"], samples["raw_read_gbps"], strict=True)
        ],
        best_peer_cold_gbps=max(peer_cold.values()),
        best_peer=max(peer_cold, key=lambda k: peer_cold[k]),
        peers_cold_gbps=peer_cold,
        warm_load_gbps=med["warm_load_gbps"],
        memcpy_gbps=med["memcpy_gbps"],
        warm_ratio_to_memcpy=med["warm_load_gbps"] / med["memcpy_gbps"],
        swap_dram_ms=med["swap_dram_ms"],
        swap_nvme_ms=med["swap_nvme_ms"],
        cold_usable_s=med["cold_usable_s"],
        daemon_read_gbps=med["daemon_read_gbps"],
        repeats=repeats,
        quick=quick,
    )
    return res


def table(res: dict[str, Any]) -> str:
    gb = res["model_bytes"] / 1e9
    s = res["samples"]

    def spread(key: str) -> str:
        v = s.get(key, [])
        return f"{min(v):.2f}-{max(v):.2f}" if len(v) > 1 else ""

    rows = [
        (
            "raw direct read (limit)",
            res["raw_read_gbps"],
            spread("raw_read_gbps"),
            f"per round: the fastest of {len(RAW_KINDS)}:",
        ),
    ]
    rows += [
        (f"  into {k}", statistics.median(s[f"raw:{k}"]), spread(f"raw:{k}"), "") for k in RAW_KINDS
    ]
    rows += [
        (
            "kvstore cold load",
            res["cold_load_gbps"],
            spread("cold_best_gbps"),
            f"{res['cold_ratio_to_raw']:.0%} of raw (per round: the fastest of {len(RAW_KINDS)})",
        ),
        (
            "  one cold load (median of all)",
            res["cold_load_single_gbps"],
            spread("cold_load_gbps"),
            f"{res['cold_ratio_single_to_raw']:.0%} of raw",
        ),
        (
            "  of which the daemon's verified read",
            res["daemon_read_gbps"],
            spread("daemon_read_gbps"),
            "(O_DIRECT into the arena + xxh3)",
        ),
    ]
    for k, v in res["peers_cold_gbps"].items():
        rows.append(
            (f"{k} (cold)", v, spread(f"peer:{k}"), f"{v / res['raw_read_gbps']:.0%} of raw")
        )
    rows += [
        (
            "kvstore warm load (resident)",
            res["warm_load_gbps"],
            spread("warm_load_gbps"),
            f"{res['warm_ratio_to_memcpy']:.0%} of memcpy",
        ),
        (
            "safetensors.load_file (warm cache)",
            statistics.median(s["peer_warm:safetensors.load_file"]),
            spread("peer_warm:safetensors.load_file"),
            "",
        ),
        ("memcpy (limit)", res["memcpy_gbps"], "", ""),
    ]
    out = [
        f"model: {gb:.2f} GB, {res['num_tensors']} tensors, {res['repeats']} repeat(s) "
        "after one unrecorded warm-up round; "
        f"cache drop: {res['cache_drop']}; the daemon's arena: "
        + (f"{r} contiguous runs per 4 MiB" if (r := res["arena_runs_per_4mib"]) > 0 else "?")
        + (f" (faulted in again {n}x)" if (n := res.get("arena_prefault_retries", 0)) else ""),
        f"{'what':<38} {'GB/s':>7} {'spread':>11}  note",
        "-" * 72,
    ]
    out += [f"{a:<38} {b:7.2f} {c:>11}  {d}" for a, b, c, d in rows]
    out += [
        "-" * 72,
        f"{'swap A->B, B resident in DRAM':<38} {res['swap_dram_ms']:7.2f} ms {spread('swap_dram_ms'):>8}",
        f"{'swap A->B, B on NVMe':<38} {res['swap_nvme_ms']:7.1f} ms {spread('swap_nvme_ms'):>8}",
        f"{'cold load until usable tensors':<38} {res['cold_usable_s'] * 1e3:7.1f} ms",
    ]
    return "\n".join(out)


def chart(res: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no chart: matplotlib does not import ({exc})"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = ["kvstore", *res["peers_cold_gbps"]]
    vals = [res["cold_load_gbps"], *res["peers_cold_gbps"].values()]
    ax1.bar(names, vals, color=["tab:green"] + ["tab:gray"] * (len(names) - 1))
    ax1.axhline(res["raw_read_gbps"], color="tab:red", ls="--", label="raw direct read")
    ax1.set_ylabel("GB/s (cold, to usable tensors)")
    ax1.set_title(f"cold load, {res['model_bytes'] / 1e9:.2f} GB model")
    ax1.legend()
    ax1.tick_params(axis="x", rotation=15)
    ax2.bar(
        ["swap (B in DRAM)", "swap (B on NVMe)"],
        [res["swap_dram_ms"], res["swap_nvme_ms"]],
        color=["tab:green", "tab:blue"],
    )
    ax2.set_yscale("log")
    ax2.set_ylabel("ms until usable tensors")
    ax2.set_title("swap A -> B")
    fig.suptitle(f"weight-swap, {res['machine']}, {res['date']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.weight_swap", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="64 MiB models, one repeat (< ~60 s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--model-bytes", default="", help="size of each synthetic model (default 1GiB)")
    p.add_argument("--hidden", type=int, default=0, help="hidden size of the synthetic models")
    p.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="measurement rounds (default 3; one warm-up round runs first)",
    )
    p.add_argument("--paths", nargs=2, metavar=("A", "B"), help="real safetensors models")
    p.add_argument("--work-dir", default="", help="where files go (default /var/tmp/...)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument(
        "--chart",
        default=None,
        help="PNG path ('' = none); default bench/charts/weight_swap.png (the committed "
        "chart of a full run), with --quick bench/out/weight_swap_quick.png (git ignores "
        "bench/out/), so a quick run never overwrites the committed chart",
    )
    p.add_argument("--raw-read", nargs=2, metavar=("FILE", "NBYTES"), help=argparse.SUPPRESS)
    p.add_argument(
        "--settle", type=float, default=2.0, help="idle seconds after each cache drop (2)"
    )
    p.add_argument(
        "--no-drop-caches",
        action="store_true",
        help="evict only the benchmark's files (fadvise) instead of the whole page cache",
    )
    return p


def chart_path(args: argparse.Namespace) -> str:
    """``--chart``, or its default: the committed chart for a full run only."""
    if args.chart is not None:
        return str(args.chart)
    return str(QUICK_CHART if args.quick else CHARTS / "weight_swap.png")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    OPTIONS.update(settle_s=args.settle, global_drop=not args.no_drop_caches)
    if args.raw_read:
        # Internal: a direct read of FILE from a fresh process; prints seconds.  The
        # imports above just read from the (dropped) cache: let the disk idle again.
        pipe = raw_pipeline()
        time.sleep(OPTIONS["settle_s"])
        st = pipe.read(Path(args.raw_read[0]), int(args.raw_read[1]), NullSink(), None)
        pipe.close()
        print(st.seconds)
        return 0
    res = run(args)
    if chart_to := chart_path(args):
        res["chart"] = chart(res, Path(chart_to))
    log(table(res))
    if res.get("chart"):
        log(f"chart: {res['chart']}")
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
