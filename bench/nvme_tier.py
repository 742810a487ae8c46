"""NVMe tier throughput against raw direct I/O on the same directory, in the same run.

Demote (``write`` of 2 MiB blocks then ``flush``, so every byte is durable and
indexed) and promote (``read_many`` of those blocks into page-aligned buffers, every
block checksum-verified) through :class:`kvstore.tiers.nvme.NvmeTier`, against the
limit measured right before: sequential ``O_DIRECT`` writes (+ ``fdatasync``) and
reads of one file in 4 MiB requests, one stream and ``io_threads`` streams; the
better of the two is the limit.  The page cache is dropped before every read
(``/proc/sys/vm/drop_caches`` as root, else ``posix_fadvise(DONTNEED)`` per file).

Run: ``python -m bench.nvme_tier [--quick] [--json] [--dir PATH]``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kvstore.entry import BlockEntry
from kvstore.tiers.nvme import NvmeOptions, NvmeTier

BLOCK = 2 << 20
RAW_REQ = 4 << 20
GB = 1e9


def _aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)


def drop_caches(files: list[Path], global_drop: bool = True) -> str:
    """Drop the page cache; returns how (or why only per file)."""
    why = "not asked"
    if global_drop:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError as exc:
            why = exc.strerror or str(exc)
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return f"posix_fadvise DONTNEED per file (drop_caches: {why})"


def _streams(total: int, threads: int) -> list[tuple[int, int]]:
    per = total // threads // RAW_REQ * RAW_REQ
    return [(i * per, per) for i in range(threads)]


def raw_write(path: Path, total: int, threads: int) -> float:
    """GB/s of O_DIRECT sequential writes (``threads`` streams over one file) + fdatasync."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    bufs = [_aligned(RAW_REQ) for _ in range(threads)]
    for b in bufs:
        b.write(os.urandom(RAW_REQ))

    def stream(i: int, start: int, n: int) -> None:
        for off in range(start, start + n, RAW_REQ):
            os.pwritev(fd, [bufs[i]], off)

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            list(
                ex.map(
                    lambda a: stream(*a),
                    [(i, s, n) for i, (s, n) in enumerate(_streams(total, threads))],
                )
            )
        os.fdatasync(fd)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return total // threads * threads / dt / GB


def raw_read(path: Path, threads: int) -> float:
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    bufs = [_aligned(RAW_REQ) for _ in range(threads)]

    def stream(i: int, start: int, n: int) -> None:
        for off in range(start, start + n, RAW_REQ):
            os.preadv(fd, [bufs[i]], off)

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            list(
                ex.map(
                    lambda a: stream(*a),
                    [(i, s, n) for i, (s, n) in enumerate(_streams(size, threads))],
                )
            )
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return size // threads // RAW_REQ * RAW_REQ * threads / dt / GB


def _entry(i: int) -> BlockEntry:
    key = i.to_bytes(8, "little") * 4
    return BlockEntry(
        key=key, ns=b"b" * 32, nbytes=BLOCK, parent=None, depth=0, locs=[], kid_tops=[]
    )


def tier_round(
    path: Path, total: int, opts: NvmeOptions, batch: int, global_drop: bool
) -> tuple[float, float, str]:
    """(write GB/s, read GB/s, cache-drop method) for one fresh tier."""
    shutil.rmtree(path, ignore_errors=True)
    n = total // BLOCK
    t = NvmeTier("bench", 2 * total, path, opts)
    srcs = [os.urandom(BLOCK) for _ in range(4)]
    try:
        ents = [_entry(i) for i in range(n)]
        t0 = time.perf_counter()
        hs = []
        for i, e in enumerate(ents):
            h = t.reserve(BLOCK, e)
            assert h is not None
            t.write(h, e, memoryview(srcs[i % 4]))
            hs.append(h)
        t.flush()
        w = n * BLOCK / (time.perf_counter() - t0) / GB
        how = drop_caches(sorted((path / "segments").glob("seg-*.dat")), global_drop)
        dsts = [memoryview(_aligned(BLOCK)) for _ in range(batch)]
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            chunk = list(zip(hs[s : s + batch], ents[s : s + batch], dsts, strict=False))
            res = t.read_many(chunk)
            if any(r is not None for r in res):
                raise RuntimeError(f"read failed: {res}")
        r = n * BLOCK / (time.perf_counter() - t0) / GB
        if t.stats()["checksum_failures"]:
            raise RuntimeError("checksum failures in the benchmark")
    finally:
        t.close()
    return w, r, how


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 GiB, one round (~20 s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--dir", type=Path, default=None, help="directory on the disk to test")
    ap.add_argument("--rounds", type=int, default=0, help="rounds (default 1 quick, 3 full)")
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument(
        "--total-mib", type=int, default=0, help="bytes per pass (default 1024 quick, 4096)"
    )
    ap.add_argument(
        "--no-global-drop",
        action="store_true",
        help="only fadvise the benchmark's own files (spare a shared machine's page cache)",
    )
    args = ap.parse_args(argv)
    gd = not args.no_global_drop
    total = (args.total_mib << 20) or ((1 << 30) if args.quick else (4 << 30))
    if total < args.io_threads * RAW_REQ or total % BLOCK:
        ap.error(f"--total-mib must be a multiple of 2 and >= {args.io_threads * RAW_REQ >> 20}")
    rounds = args.rounds or (1 if args.quick else 3)
    base = Path(tempfile.mkdtemp(prefix="kvstore-nvme-bench-", dir=args.dir))
    opts = NvmeOptions(
        io_threads=args.io_threads, staging_bytes=64 << 20, background_compaction=False
    )
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    rows: list[dict[str, float]] = []
    how = ""
    try:
        raw = base / "raw.dat"
        for rnd in range(rounds):
            rw = max(raw_write(raw, total, 1), raw_write(raw, total, args.io_threads))
            how = drop_caches([raw], gd)
            rr1 = raw_read(raw, 1)
            drop_caches([raw], gd)
            rr = max(rr1, raw_read(raw, args.io_threads))
            raw.unlink()
            w, r, how = tier_round(base / "tier", total, opts, 32, gd)
            row = {"write_gbps": w, "read_gbps": r, "raw_write_gbps": rw, "raw_read_gbps": rr}
            rows.append(row)
            log(
                f"round {rnd + 1}/{rounds}: tier write {w:.2f} GB/s (raw {rw:.2f}), "
                f"read {r:.2f} GB/s (raw {rr:.2f})"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def med(k: str) -> float:
        return statistics.median(x[k] for x in rows)

    out: dict[str, Any] = {
        "block_bytes": BLOCK,
        "total_bytes": total,
        "rounds": rounds,
        "io_threads": args.io_threads,
        "cache_drop": how,
        "read_gbps": round(med("read_gbps"), 3),
        "write_gbps": round(med("write_gbps"), 3),
        "raw_read_gbps": round(med("raw_read_gbps"), 3),
        "raw_write_gbps": round(med("raw_write_gbps"), 3),
        "read_ratio_to_raw": round(
            statistics.median(x["read_gbps"] / x["raw_read_gbps"] for x in rows), 3
        ),
        "write_ratio_to_raw": round(
            statistics.median(x["write_gbps"] / x["raw_write_gbps"] for x in rows), 3
        ),
        "per_round": [{k: round(v, 3) for k, v in x.items()} for x in rows],
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"page cache: {how}")
        print(f"{'':10}{'tier GB/s':>11}{'raw GB/s':>10}{'ratio':>8}")
        for k in ("write", "read"):
            print(
                f"{k:10}{out[f'{k}_gbps']:>11.2f}{out[f'raw_{k}_gbps']:>10.2f}"
                f"{out[f'{k}_ratio_to_raw']:>8.2f}"
            )
    return out


if __name__ == "__main__":
    main()
