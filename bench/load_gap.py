"""Where a cold model load's time goes, against the disk's raw direct read.

``python -m bench.load_gap [--model-bytes 1GiB] [--rounds 5] [--json]``

One synthetic bf16 model (shaped like ``bench.weight_swap``'s), ingested once.  For
each configuration (checksums on or off in the daemon, the client populating its
mapping during the load or not) a fresh Models daemon, one unrecorded warm-up load,
then ``--rounds`` rounds of, each after a cache drop and idle time (``--daemons N``
repeats every configuration on N fresh daemons):

* the raw read: 64 x 8 MiB ``O_DIRECT`` reads into a file-sized, pre-faulted
  shared-memory buffer (the kind of memory the daemon's arena is);
* the load, timed at three points: the daemon's own read (``load_seconds`` in its
  answer), ``open_model`` returning (two RPCs and the client's mapping), and every
  4 KiB page of every tensor touched (what ``bench.weight_swap`` calls a cold load).

Both also count the read requests the block device completed (``/sys/dev/block``):
more requests than the raw read's means the destination's pages were scattered.

The table gives the means and each as a ratio of the raw read's mean: the steps a
load adds to the disk's read, one by one; and each daemon's start-up time (until its
arena is pre-faulted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import weight_limits as lim
from bench import weight_swap as ws
from kvstore.config import parse_size
from loader import client
from loader.store import ModelStore

CONFIGS: dict[str, tuple[list[str], bool]] = {
    # name: (daemon flags, client populates during the load)
    "checksums on, populate (the product)": ([], True),
    "checksums off, populate": (["--no-verify"], True),
    "checksums on, no populate": ([], False),
}
STEPS = ("raw_s", "daemon_read_s", "open_s", "touched_s")


def read_requests(path: Path) -> Callable[[], int]:
    """A counter of read requests completed by the block device holding ``path``
    (``/sys/dev/block/MAJ:MIN/stat``); it always answers 0 where there is none.

    A direct read into scattered pages needs more scatter-gather segments, so the
    block layer splits it into more requests: this counter shows it."""
    st = Path(
        f"/sys/dev/block/{os.major(os.stat(path).st_dev)}:{os.minor(os.stat(path).st_dev)}/stat"
    )

    def count() -> int:
        try:
            return int(st.read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return 0

    return count


def _load(stub: Any, populate: bool) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    loaded = client.open_model(stub, "M", session_id=1, populate=populate)
    opened = time.perf_counter() - t0
    ws.touch(loaded.tensors)
    touched = time.perf_counter() - t0
    read = loaded.info.load_seconds
    del loaded
    client.release_model(stub, "M", 1, evict=True)
    return read, opened, touched


def run(args: argparse.Namespace) -> dict[str, Any]:
    nbytes = parse_size(args.model_bytes, "--model-bytes")
    # Removed however the run ends (a given --work-dir keeps all but the run's files).
    with ws.work_dir(args.work_dir, args.keep, "kvstore-gap-", ("M.safetensors", "store")) as work:
        return _run(args, work, nbytes)


def _run(args: argparse.Namespace, work: Path, nbytes: int) -> dict[str, Any]:
    from tqdm import tqdm

    ws.check_space(work, 2 * nbytes)  # the source file and the store's copy
    from safetensors.torch import save_file

    src = work / "M.safetensors"
    save_file(ws.transformer_tensors(nbytes, args.hidden, seed=0), str(src))
    with ModelStore(work / "store") as st:
        m = st.add("M", src)
        data = st.data_path(m)
    src.unlink()
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model_bytes": m.tensor_bytes,
        "rounds": args.rounds,
        "daemons": args.daemons,
        "configs": {},
    }
    requests = read_requests(data)
    bar = tqdm(
        total=len(CONFIGS) * args.daemons * args.rounds, desc="load-gap", unit="round", file=ws.LOG
    )
    raw = lim.RawReader(m.nbytes)  # closed in the finally below, however the run ends
    try:
        runs = [
            (f"{name} #{k + 1}" if args.daemons > 1 else name, flags, populate)
            for k in range(args.daemons)
            for name, (flags, populate) in CONFIGS.items()
        ]
        for name, flags, populate in runs:
            samples: dict[str, list[float]] = {
                k: [] for k in (*STEPS, "raw_requests", "load_requests")
            }
            budget = int(m.nbytes * 1.1) + (64 << 20)
            t0 = time.perf_counter()
            info: dict[str, Any] = {}
            with lim.daemon(work / "store", budget, flags, info) as sock:
                start_s = time.perf_counter() - t0  # to "ready": the arena pre-faulted
                stub = client._stub(sock)
                _load(stub, populate)  # warm-up, not recorded
                for _ in range(args.rounds):
                    lim.drop_caches([data])
                    r0 = requests()
                    samples["raw_s"].append(raw.read_one("shm", data, m.nbytes))
                    samples["raw_requests"].append(requests() - r0)
                    lim.drop_caches([data])
                    r0 = requests()
                    for k, v in zip(STEPS[1:], _load(stub, populate), strict=True):
                        samples[k].append(v)
                    samples["load_requests"].append(requests() - r0)
                    bar.update()
            res["configs"][name] = {k: [round(x, 4) for x in v] for k, v in samples.items()}
            for k in ("raw_requests", "load_requests"):
                res["configs"][name][k] = [int(x) for x in samples[k]]
            res["configs"][name]["daemon_start_s"] = round(start_s, 3)
            res["configs"][name]["arena_runs_per_4mib"] = info.get("arena_runs_per_4mib", -1)
    finally:
        bar.close()
        raw.close()
    return res


def table(res: dict[str, Any]) -> str:
    head = f"{'configuration':<41} {'raw read':>9} {'daemon read':>12} {'+ RPCs, map':>12}"
    out = [
        f"model: {res['model_bytes'] / 1e9:.2f} GB; means of {res['rounds']} rounds, "
        "seconds (x the raw read's mean)",
        head + f" {'+ touch':>14} {'start':>6} {'requests (raw/load)':>20} {'runs/4MiB':>9}",
        "-" * (len(head) + 53),
    ]
    for name, s in res["configs"].items():
        raw = statistics.mean(s["raw_s"])
        cells = [f"{raw:>9.3f}"]
        for k, w in (("daemon_read_s", 12), ("open_s", 12), ("touched_s", 14)):
            v = statistics.mean(s[k])
            cells.append(f"{f'{v:.3f} ({v / raw:.2f})':>{w}}")
        cells.append(f"{s['daemon_start_s']:>5.1f}s")
        rq = f"{statistics.mean(s['raw_requests']):.0f}/{statistics.mean(s['load_requests']):.0f}"
        cells.append(f"{rq:>20}")
        runs = s.get("arena_runs_per_4mib", -1)
        cells.append(f"{runs if runs > 0 else '?':>9}")
        out.append(f"{name:<41} " + " ".join(cells))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load_gap", description=__doc__.split("\n")[0])
    p.add_argument("--model-bytes", default="1GiB", help="size of the synthetic model (1GiB)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size of the model (2048)")
    p.add_argument("--rounds", type=int, default=5, help="recorded rounds per configuration")
    p.add_argument(
        "--daemons",
        type=int,
        default=1,
        help="fresh daemons per configuration, one after another (shows how much one "
        "daemon process differs from the next)",
    )
    p.add_argument("--settle", type=float, default=2.0, help="idle seconds after a cache drop")
    p.add_argument(
        "--no-drop-caches",
        action="store_true",
        help="evict only the benchmark's files (fadvise) instead of the whole page cache",
    )
    p.add_argument("--work-dir", default="", help="where files go (default /var/tmp/...)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.daemons < 1:
        p.error("--rounds and --daemons: at least 1")
    lim.OPTIONS.update(settle_s=args.settle, global_drop=not args.no_drop_caches)
    res = run(args)
    print(table(res), file=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=1))
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
