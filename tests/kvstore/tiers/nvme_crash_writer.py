"""A process that writes heavily through an NVMe tier until it is killed (crash tests).

Run as ``python -m tests.kvstore.tiers.nvme_crash_writer DIR ROUND [zstd]`` (``zstd``:
compression on, bf16-like blocks).  It prints, one
flushed line each: ``R n`` (blocks recovered at start), ``F key`` just before freeing
a block (after it the block may or may not survive a crash), and ``D key...`` after
``flush()`` returns (those blocks must survive).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from .nvme_util import bf16_for, data_for, key_of, open_tier, put


def main() -> None:
    path, rnd = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(rnd)
    zstd = sys.argv[3:] == ["zstd"]
    codec = {"compression": "byteplane-zstd"} if zstd else {}
    data_fn = bf16_for if zstd else data_for
    t = open_tier(
        path, capacity=48 << 20, staging_bytes=512 << 10, compact_min_dead_ratio=0.3, **codec
    )
    live = {rb.key: rb.handle for rb in t.recover()}
    print(f"R {len(live)} {t.stats()['recovered_dropped']}", flush=True)
    pending: list[bytes] = []
    i = 0
    while True:
        nbytes = rng.choice([16 << 10, 64 << 10, 100_000, 256 << 10])
        while t.used_bytes + nbytes + 4096 > t.capacity_bytes or (live and rng.random() < 0.3):
            k = rng.choice(list(live))
            print(f"F {k.hex()}", flush=True)
            t.free(live.pop(k))
            if k in pending:
                pending.remove(k)
        k = key_of(i, salt=rnd)
        i += 1
        h, _, _ = put(t, k, nbytes, data_fn=data_fn)
        live[k] = h
        pending.append(k)
        if i % 8 == 0:
            t.flush()
            bad = t.stats()["checksum_failures"]
            if t.degraded or bad:  # the parent fails the test on this
                print(f"X {t.degraded} checksum failures: {bad}", flush=True)
                return
            print("D " + " ".join(x.hex() for x in pending), flush=True)
            pending = []


if __name__ == "__main__":
    main()
