"""NVMe tier throughput against raw direct I/O on the same directory, in the same run.

Demote (``write`` of 2 MiB blocks, ``flush`` at the end so every byte is durable
and indexed) and promote (``read_many`` of those blocks into page-aligned buffers, 32
per call, every block checksum-verified) through :class:`kvstore.tiers.nvme.NvmeTier`,
against the limit: sequential ``O_DIRECT`` writes (``fdatasync`` at the end) and reads of a
file with 1 stream (16 MiB requests), ``io_threads`` and ``read_threads`` streams
(4-8 MiB requests); the best of them is the limit.  They run interleaved, 32 MiB at a time in rotating
order, so the noise of a shared disk falls on all of them alike.  The page cache is
dropped before the reads (``/proc/sys/vm/drop_caches`` as root, and
``posix_fadvise(DONTNEED)`` on every file).

With ``--compression byteplane-zstd`` the tier compresses (codec 1) and the blocks are
bf16-like (normal values rounded to bf16, whose exponent plane compresses; ``--data``
overrides): throughput stays in logical bytes (the block sizes), the ratio of logical
to stored bytes is reported, and so are single-thread encode and decode rates.  Run
it with and without to see whether compression makes promotions faster on a disk.

Run: ``python -m bench.nvme_tier [--quick] [--json] [--dir PATH] [--compression byteplane-zstd]``.
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

import numpy as np
import xxhash
import zstandard

from kvstore.entry import BlockEntry
from kvstore.tiers.nvme import NvmeOptions, NvmeTier
from kvstore.tiers.nvme_codec import decode_into, encode_into

BLOCK = 2 << 20
RAW_REQ = 4 << 20  # smallest raw request; one stream uses up to MAX_RAW_REQ
MAX_RAW_REQ = 16 << 20
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


class RawFile:
    """One file written and read with ``O_DIRECT`` by ``threads`` sequential streams, each
    in requests of ``req`` bytes."""

    def __init__(self, path: Path, threads: int, req: int) -> None:
        self.threads = threads
        self.req = req
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        self.bufs = [_aligned(req) for _ in range(threads)]
        for b in self.bufs:
            b.write(os.urandom(req))
        self.pool = ThreadPoolExecutor(threads)

    def _run(self, off: int, n: int, io: Any) -> None:
        per = n // self.threads // self.req * self.req
        assert per * self.threads == n, "chunk must split into whole requests per stream"

        def stream(i: int) -> None:
            start = off + i * per
            for o in range(start, start + per, self.req):
                io(self.fd, [self.bufs[i]], o)

        list(self.pool.map(stream, range(self.threads)))

    def write(self, off: int, n: int, last: bool) -> float:
        """Seconds to write ``n`` bytes at ``off`` (and ``fdatasync`` the file if ``last``)."""
        t0 = time.perf_counter()
        self._run(off, n, os.pwritev)
        if last:
            os.fdatasync(self.fd)
        return time.perf_counter() - t0

    def read(self, off: int, n: int) -> float:
        t0 = time.perf_counter()
        self._run(off, n, os.preadv)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.pool.shutdown()
        os.close(self.fd)


def block_data(kind: str, seed: int) -> bytes:
    """One block: random bytes, or bf16 values of a normal distribution (round to nearest
    even from float32), like the K/V activations a cache holds."""
    if kind == "random":
        return os.urandom(BLOCK)
    f = np.random.default_rng(seed).standard_normal(BLOCK // 2, dtype=np.float32).view(np.uint32)
    bf = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype(np.uint16)
    return bf.tobytes()


def codec_gbps(data: bytes, level: int, reps: int = 8) -> tuple[float, float, float]:
    """Single-thread (encode GB/s, decode GB/s, ratio) of codec 1 on one block, in logical
    bytes; the ratio is 1.0 when the block would be stored raw."""
    out = _aligned(BLOCK)
    cctx = zstandard.ZstdCompressor(level=level)
    t0 = time.perf_counter()
    for _ in range(reps):
        n = encode_into(memoryview(data), BLOCK, memoryview(out), cctx)
    enc = reps * BLOCK / (time.perf_counter() - t0) / GB
    if not n:
        return enc, 0.0, 1.0
    dst, planes, dctx = bytearray(BLOCK), np.empty(BLOCK, np.uint8), zstandard.ZstdDecompressor()
    t0 = time.perf_counter()
    for _ in range(reps):
        decode_into(memoryview(out)[:n], BLOCK, memoryview(dst), planes, dctx)
    dec = reps * BLOCK / (time.perf_counter() - t0) / GB
    assert bytes(dst) == data
    return enc, dec, BLOCK / n


def _entry(i: int) -> BlockEntry:
    key = i.to_bytes(8, "little") * 4
    return BlockEntry(
        key=key, ns=b"b" * 32, nbytes=BLOCK, parent=None, depth=0, locs=[], kid_tops=[]
    )


class TierRun:
    """Demotes and promotes 2 MiB blocks through a fresh :class:`NvmeTier`."""

    def __init__(
        self, path: Path, total: int, opts: NvmeOptions, batch: int, data: str = "random"
    ) -> None:
        self.tier = NvmeTier("bench", 2 * total, path, opts)
        self.path = path
        self.srcs = [block_data(data, i) for i in range(4)]
        self.ents = [_entry(i) for i in range(total // BLOCK)]
        self.hs: list[Any] = [None] * len(self.ents)
        self.dsts = [memoryview(_aligned(BLOCK)) for _ in range(batch)]

    def write(self, off: int, n: int, last: bool) -> float:
        """Seconds to write the blocks of bytes [off, off + n) until every ``pwritev`` has
        returned (the staging pool is empty); when ``last``, until ``flush`` returns
        (every block durable and indexed).  Group commits run meanwhile, as in service."""
        t, i0 = self.tier, off // BLOCK
        t0 = time.perf_counter()
        for i in range(i0, i0 + n // BLOCK):
            e = self.ents[i]
            h = t.reserve(BLOCK, e)
            assert h is not None
            t.write(h, e, memoryview(self.srcs[i % 4]))
            self.hs[i] = h
        if last:
            t.flush()
        else:
            while t.staging.in_use_bytes:
                time.sleep(0.0005)
        return time.perf_counter() - t0

    def read(self, off: int, n: int) -> float:
        """Seconds to ``read_many`` (verified) those blocks, ``len(dsts)`` per call."""
        i0, b = off // BLOCK, len(self.dsts)
        t0 = time.perf_counter()
        for s in range(i0, i0 + n // BLOCK, b):
            k = min(b, i0 + n // BLOCK - s)
            items = list(zip(self.hs[s : s + k], self.ents[s : s + k], self.dsts, strict=False))
            res = self.tier.read_many(items)
            if any(r is not None for r in res):
                raise RuntimeError(f"read failed: {res}")
        return time.perf_counter() - t0

    def files(self) -> list[Path]:
        return sorted((self.path / "segments").glob("seg-*.dat"))

    def close(self) -> None:
        st = self.tier.stats()
        if st["checksum_failures"]:
            raise RuntimeError("checksum failures in the benchmark")
        # Logical bytes per byte on disk, over every block written.
        self.ratio = st["write_bytes"] / st["live_bytes"] if st["live_bytes"] else 0.0
        self.tier.close()


def xxh3_gbps(nbytes: int = 256 << 20) -> float:
    """Single-thread checksum rate: every promoted block is verified with xxh3-64, so on a
    CPU-starved machine this, not the disk, can bound promote throughput."""
    buf = os.urandom(BLOCK)
    t0 = time.perf_counter()
    for _ in range(nbytes // BLOCK):
        xxhash.xxh3_64_intdigest(buf)
    return nbytes / (time.perf_counter() - t0) / GB


def one_round(
    base: Path,
    total: int,
    chunk: int,
    streams: list[int],
    opts: NvmeOptions,
    global_drop: bool,
    data: str = "random",
) -> tuple[dict[str, float], str]:
    """GB/s of raw (1 and each of ``streams`` streams) and tier, writes then reads.

    They are interleaved chunk by chunk (order rotating), so the noise of a
    shared disk falls on all of them alike.
    """
    runs: dict[str, RawFile | TierRun] = {
        f"raw{n}": RawFile(base / f"raw{n}.dat", n, min(MAX_RAW_REQ, chunk // n))
        for n in sorted({1, *streams})
    }
    runs["tier"] = tier = TierRun(base / "tier", total, opts, batch=32, data=data)
    names = list(runs)
    wt = dict.fromkeys(names, 0.0)
    rt = dict.fromkeys(names, 0.0)
    try:
        for k, off in enumerate(range(0, total, chunk)):
            for j in range(len(names)):
                name = names[(k + j) % len(names)]
                wt[name] += runs[name].write(off, chunk, off + chunk == total)
        files = [base / f"{n}.dat" for n in names if n != "tier"] + tier.files()
        how = drop_caches(files, global_drop)
        for k, off in enumerate(range(0, total, chunk)):
            for j in range(len(names)):
                name = names[(k + j) % len(names)]
                rt[name] += runs[name].read(off, chunk)
    finally:
        for r in runs.values():
            r.close()
    g = total / GB
    row = {
        "write_gbps": g / wt.pop("tier"),
        "read_gbps": g / rt.pop("tier"),
        "xxh3_gbps": xxh3_gbps(),
        "compression_ratio": tier.ratio,
    }
    row["raw_write_gbps"] = max(g / v for v in wt.values())
    row["raw_read_gbps"] = max(g / v for v in rt.values())
    row.update({f"{n}_write_gbps": g / v for n, v in wt.items()})
    row.update({f"{n}_read_gbps": g / v for n, v in rt.items()})
    return row, how


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        prog="python -m bench.nvme_tier", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "--quick", action="store_true", help="512 MiB, one round (~30 s on a busy disk)"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--dir", type=Path, default=None, help="directory on the disk to test")
    ap.add_argument("--rounds", type=int, default=0, help="rounds (default 1 quick, 3 full)")
    ap.add_argument(
        "--total-mib", type=int, default=0, help="bytes per pass (default 512 quick, 4096)"
    )
    ap.add_argument(
        "--no-global-drop",
        action="store_true",
        help="only fadvise the benchmark's own files (spare a shared machine's page cache)",
    )
    ap.add_argument(
        "--compression",
        choices=["off", "byteplane-zstd"],
        default="off",
        help="the tier's compression option (default off)",
    )
    ap.add_argument("--compression-level", type=int, default=1, help="zstd level (1..19)")
    ap.add_argument(
        "--data",
        choices=["auto", "random", "bf16"],
        default="auto",
        help="block contents (auto: bf16-like when compressing, else random)",
    )
    args = ap.parse_args(argv)
    gd = not args.no_global_drop
    total = (args.total_mib << 20) or ((512 << 20) if args.quick else (4 << 30))
    data = args.data if args.data != "auto" else ("random" if args.compression == "off" else "bf16")
    opts = NvmeOptions(
        background_compaction=False,
        compression=args.compression,
        compression_level=args.compression_level,
    )
    opts.validate("--compression")
    streams = sorted({opts.io_threads, opts.read_threads})
    chunk = min(total, 32 << 20)
    if total % chunk or chunk % (max(streams) * RAW_REQ):
        ap.error(
            f"--total-mib must be a multiple of {max(streams) * RAW_REQ >> 20} (and of 32 above 32)"
        )
    rounds = args.rounds or (1 if args.quick else 3)
    base = Path(tempfile.mkdtemp(prefix="kvstore-nvme-bench-", dir=args.dir))
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    rows: list[dict[str, float]] = []
    how = ""
    try:
        for rnd in range(rounds):
            rdir = base / f"round{rnd}"
            rdir.mkdir()
            row, how = one_round(rdir, total, chunk, streams, opts, gd, data)
            shutil.rmtree(rdir, ignore_errors=True)
            rows.append(row)
            log(
                f"round {rnd + 1}/{rounds}: tier write {row['write_gbps']:.2f} GB/s "
                f"(raw {row['raw_write_gbps']:.2f}), read {row['read_gbps']:.2f} GB/s "
                f"(raw {row['raw_read_gbps']:.2f}), stored ratio {row['compression_ratio']:.2f}"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def med(k: str) -> float:
        return statistics.median(x[k] for x in rows)

    enc, dec, cratio = codec_gbps(block_data(data, 0), args.compression_level)

    out: dict[str, Any] = {
        "block_bytes": BLOCK,
        "total_bytes": total,
        "rounds": rounds,
        "io_threads": opts.io_threads,
        "read_threads": opts.read_threads,
        "raw_streams": [1, *streams],
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
        "xxh3_gbps": round(med("xxh3_gbps"), 3),
        "compression": args.compression,
        "compression_level": args.compression_level,
        "data": data,
        "compression_ratio": round(med("compression_ratio"), 3),
        "codec_encode_gbps_1thread": round(enc, 3),
        "codec_decode_gbps_1thread": round(dec, 3),
        "codec_block_ratio": round(cratio, 3),
        "per_round": [{k: round(v, 3) for k, v in x.items()} for x in rows],
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"page cache: {how}")
        print(
            f"compression {args.compression} (level {args.compression_level}), data {data}: "
            f"logical/stored {out['compression_ratio']:.2f}; codec on one thread: encode "
            f"{enc:.2f} GB/s, decode {dec:.2f} GB/s (one block: ratio {cratio:.2f})"
        )
        print(f"{'':10}{'tier GB/s':>11}{'raw GB/s':>10}{'ratio':>8}")
        for k in ("write", "read"):
            print(
                f"{k:10}{out[f'{k}_gbps']:>11.2f}{out[f'raw_{k}_gbps']:>10.2f}"
                f"{out[f'{k}_ratio_to_raw']:>8.2f}"
            )
    return out


if __name__ == "__main__":
    main()
