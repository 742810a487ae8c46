"""Put/get throughput and Lookup latency of the daemon, against the limits of this machine.

Run from the repository root::

    python -m bench.kv_throughput [--quick] [--json]      # or: kvstore bench kv-throughput

Two processes: the daemon (started here unless ``--socket`` names a running one)
and this client.  *put* = Allocate + copy into the slots + Commit (with xxh3
checksums, as ``store_tokens`` does); *get* = Acquire + copy into the caller's
buffer + Release.  In the same run it measures plain numpy memcpy of the same
bytes (the limit), the same transfers with the bytes inside gRPC messages (a
naive daemon), and Redis SET/GET through redis-py when ``redis-server`` exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kvstore import Client, Namespace
from kvstore._wire import checksum

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"256KiB": 256 << 10, "2MiB": 2 << 20, "16MiB": 16 << 20}
BATCH = 32


def _ns(nbytes: int) -> Namespace:
    # 1 layer x 2 (K,V) x 16 tokens x 1 head x head_dim x 2 bytes = nbytes
    return Namespace(f"bench-{nbytes}", num_layers=1, num_kv_heads=1, head_dim=nbytes // 64,
                     block_tokens=16)  # fmt: skip


MIN_ITERS = 3  # timed calls at least (1 with --quick, where 16 MiB baselines are slow)


def _timed(fn: Callable[[], None], nbytes: int, min_s: float) -> float:
    """GB/s of ``fn`` moving ``nbytes`` per call, repeated for at least ``min_s`` seconds."""
    min_iters = MIN_ITERS
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_s and n >= min_iters:
            return n * nbytes / dt / 1e9


def bench_memcpy(size: int, min_s: float) -> float:
    src = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8) for i in range(BATCH)]
    dst = [np.empty(size, np.uint8) for _ in range(BATCH)]

    def run() -> None:
        for s, d in zip(src, dst, strict=True):
            np.copyto(d, s)

    return _timed(run, size * BATCH, min_s)


def bench_kvstore(c: Client, size: int, min_s: float) -> dict[str, float]:
    ns = _ns(size)
    c.register_namespace(ns)
    src = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8) for i in range(BATCH)]

    def put() -> None:
        keys = [os.urandom(32) for _ in range(BATCH)]
        allocs = c.allocate(ns, keys)
        for a, s in zip(allocs, src, strict=True):
            np.copyto(np.frombuffer(a.view, np.uint8), s)  # type: ignore[arg-type]
        c.commit(keys, [checksum(a.view) for a in allocs])  # type: ignore[arg-type]

    put_gbps = _timed(put, size * BATCH, min_s)
    keys = [os.urandom(32) for _ in range(BATCH)]
    allocs = c.allocate(ns, keys)
    for a, s in zip(allocs, src, strict=True):
        np.copyto(np.frombuffer(a.view, np.uint8), s)  # type: ignore[arg-type]
    c.commit(keys)
    dst = [np.empty(size, np.uint8) for _ in range(BATCH)]

    def get() -> None:
        views = c.acquire(keys)
        for v, d in zip(views, dst, strict=True):
            np.copyto(d, np.frombuffer(v, np.uint8))  # type: ignore[arg-type]
        c.release(keys)

    get_gbps = _timed(get, size * BATCH, min_s)
    if not all(np.array_equal(d, s) for d, s in zip(dst, src, strict=True)):
        raise AssertionError("kvstore get returned wrong bytes")
    c.delete(keys)
    return {"put": put_gbps, "get": get_gbps}


def bench_lookup(c: Client, n_keys: int, reps: int) -> dict[str, float]:
    ns = Namespace("bench-lookup", num_layers=1, num_kv_heads=1, head_dim=64, block_tokens=16)
    toks = np.arange(n_keys * 16)
    c.store_tokens(ns, toks, lambda i, dst: None, checksums=False)
    keys = ns.block_keys(toks)
    assert c.lookup(keys).num_cached == n_keys
    lat = []
    for _ in range(reps):
        t0 = time.perf_counter()
        c.lookup(keys)
        lat.append((time.perf_counter() - t0) * 1e3)
    lat.sort()
    return {"p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def bench_naive_grpc(tmp: Path, size: int, min_s: float) -> dict[str, float]:
    from bench._naive_grpc import NaiveClient

    sock = str(tmp / f"naive-{size}.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench._naive_grpc", sock],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        nc = NaiveClient(sock)
        src = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()
               for i in range(BATCH)]  # fmt: skip
        keys = [os.urandom(32) for _ in range(BATCH)]
        dst = [np.empty(size, np.uint8) for _ in range(BATCH)]

        def put() -> None:
            for k, s in zip(keys, src, strict=True):
                nc.put(k + s)

        def get() -> None:
            for k, d in zip(keys, dst, strict=True):
                np.copyto(d, np.frombuffer(nc.get(k), np.uint8))

        out = {"put": _timed(put, size * BATCH, min_s), "get": _timed(get, size * BATCH, min_s)}
        nc.close()
        return out
    finally:
        proc.kill()
        proc.communicate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_redis(sizes: dict[str, int], min_s: float) -> dict[str, dict[str, float]] | str:
    exe = shutil.which("redis-server")
    if exe is None:
        return "redis-server not found (apt-get install redis-server to compare)"
    try:
        import redis
    except ImportError:
        return "redis-py not installed (pip install 'kvstore[bench]')"
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        r = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        out: dict[str, dict[str, float]] = {}
        for label, size in sizes.items():
            src = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()
                   for i in range(BATCH)]  # fmt: skip
            keys = [os.urandom(16) for _ in range(BATCH)]
            dst = [np.empty(size, np.uint8) for _ in range(BATCH)]

            def put(keys: list[bytes] = keys, src: list[bytes] = src) -> None:
                p = r.pipeline(transaction=False)
                for k, s in zip(keys, src, strict=True):
                    p.set(k, s)
                p.execute()

            def get(keys: list[bytes] = keys, dst: list[np.ndarray] = dst) -> None:
                p = r.pipeline(transaction=False)
                for k in keys:
                    p.get(k)
                for d, v in zip(dst, p.execute(), strict=True):
                    np.copyto(d, np.frombuffer(v, np.uint8))

            out[label] = {
                "put": _timed(put, size * BATCH, min_s),
                "get": _timed(get, size * BATCH, min_s),
            }
            r.delete(*keys)
        r.close()
        return out
    finally:
        proc.terminate()
        proc.wait()


def start_daemon(tmp: Path, dram: str) -> tuple[subprocess.Popen[bytes], str]:
    sock = str(tmp / "kvstore.sock")
    # DRAM only: this measures the shared-memory path, not demotion to disk.
    cmd = [sys.executable, "-m", "kvstore", "serve", "--socket", sock, "--dram", dram,
           "--no-nvme", "--data-dir", str(tmp / "data"), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the daemon did not start")
        time.sleep(0.05)
    return proc, sock


def run(args: argparse.Namespace) -> dict[str, Any]:
    global MIN_ITERS
    MIN_ITERS = 1 if args.quick else 3
    min_s = 0.25 if args.quick else 1.5
    sizes = SIZES
    res: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores",
        "batch": BATCH,
        "quick": args.quick,
    }
    with tempfile.TemporaryDirectory(prefix="kvbench-") as td:
        tmp = Path(td)
        proc = None
        sock = args.socket
        if sock is None:
            proc, sock = start_daemon(tmp, "768MiB" if args.quick else "1GiB")
        try:
            with Client(sock, name="bench", timeout=60) as c:
                for label, size in sizes.items():
                    _say(args, f"{label}: memcpy, kvstore put/get, gRPC bytes ...")
                    mc = bench_memcpy(size, min_s)
                    kv = bench_kvstore(c, size, min_s)
                    ng = bench_naive_grpc(tmp, size, min_s)
                    res[label] = {
                        "memcpy_gbps": mc,
                        **{
                            op: {"gbps": kv[op], "ratio_to_memcpy": kv[op] / mc}
                            for op in ("put", "get")
                        },
                        **{
                            f"grpc_bytes_{op}": {"gbps": ng[op], "ratio_to_memcpy": ng[op] / mc}
                            for op in ("put", "get")
                        },
                    }
                lk = bench_lookup(c, 1024, 60 if args.quick else 300)
                res["lookup_1024_p50_ms"] = lk["p50"]
                res["lookup_1024_p99_ms"] = lk["p99"]
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait()
    res["memcpy_gbps"] = res["2MiB"]["memcpy_gbps"]
    _say(args, "redis ...")
    rd = bench_redis(sizes, min_s)
    if isinstance(rd, str):
        res["redis_skipped"] = rd
    else:
        for label in sizes:
            res[label]["redis_set"] = {"gbps": rd[label]["put"]}
            res[label]["redis_get"] = {"gbps": rd[label]["get"]}
            res[label]["get_vs_redis_get"] = res[label]["get"]["gbps"] / rd[label]["get"]
        res["redis_get_gbps"] = rd["2MiB"]["get"]
    return res


def _say(args: argparse.Namespace, msg: str) -> None:
    print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)


def table(res: dict[str, Any]) -> str:
    rows = ["size     op                 GB/s   x memcpy", "-" * 44]
    for label in SIZES:
        r = res[label]
        rows.append(f"{label:<8} memcpy          {r['memcpy_gbps']:>7.2f}")
        for op in ("put", "get", "grpc_bytes_put", "grpc_bytes_get"):
            rows.append(
                f"{label:<8} {op:<15} {r[op]['gbps']:>7.2f}   {r[op]['ratio_to_memcpy']:.2f}"
            )
        for op in ("redis_set", "redis_get"):
            if op in r:
                rows.append(f"{label:<8} {op:<15} {r[op]['gbps']:>7.2f}")
    rows.append(
        f"Lookup of 1024 keys: p50 {res['lookup_1024_p50_ms']:.2f} ms, "
        f"p99 {res['lookup_1024_p99_ms']:.2f} ms"
    )
    if "redis_skipped" in res:
        rows.append(f"Redis skipped: {res['redis_skipped']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="short runs (< 30 s)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--socket", help="use a running daemon instead of starting one")
    args = p.parse_args(argv)
    res = run(args)
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
