"""Does anything a policy can see predict a block's first reuse?

An analysis aid behind bench/results/policies.md, not a policy.  For every block of a
Mooncake-format trace, at the request that creates it (its first reference), it
records what the key chain shows then, and afterwards whether the block is ever
referenced again and whether that happens within ``--within`` newly created blocks
(what a small cache could wait for).  A feature that predicts reuse would show
classes whose rates differ widely; the table gives, per class, the number of blocks,
P(reused) and P(reused within W).

Features, all known when the block is created:

* ``turn``: 1 + the turn of the deepest block the request hit (1: nothing hit past
  the first block, the shared system prompt in the Mooncake files);
* ``hit_depth``: how many leading blocks of the request were already known;
* ``parent_children``: continuations the block's parent had before this one;
* ``new_blocks``: how many blocks the request creates;
* ``last_block``: the request's last block (in these traces a partial one, whose
  hash changes when the conversation continues).

Usage::

    python -m bench.reuse_features --trace PATH [--within 5000] [--json]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable, Sequence

from bench.trace_replay import Trace, load_trace

Stats = dict[str, dict[str, tuple[int, float, float]]]


def _bucket(v: int, edges: Sequence[int]) -> str:
    """``v``'s class among half-open ranges ending at ``edges`` (last: ``>= edges[-1]``)."""
    lo = 0
    for e in edges:
        if v < e:
            return f"{lo}-{e - 1}" if e - 1 > lo else str(lo)
        lo = e
    return f">={edges[-1]}"


FEATURES: dict[str, Callable[[tuple[int, int, int, int, bool]], str]] = {
    "turn": lambda f: _bucket(f[0], (1, 2, 3, 4, 6)),
    "hit_depth": lambda f: _bucket(f[1], (1, 2, 4, 8)),
    "parent_children": lambda f: _bucket(f[2], (0, 1, 2, 4)),
    "new_blocks": lambda f: _bucket(f[3], (3, 8, 20)),
    "last_block": lambda f: "yes" if f[4] else "no",
}


def reuse_by_feature(trace: Trace, within: int) -> Stats:
    """Per feature and class: (blocks, P(reused), P(reused within ``within`` new blocks))."""
    created: dict[int, tuple[int, int]] = {}  # block -> (creation clock, turn)
    feats: dict[int, tuple[int, int, int, int, bool]] = {}
    first_reuse: dict[int, int] = {}
    children: defaultdict[int, set[int]] = defaultdict(set)
    clock = 0
    for ids in trace:
        d = 0
        while d < len(ids) and ids[d] in created:
            d += 1
        for b in ids[:d]:
            first_reuse.setdefault(b, clock)
        turn = created[ids[d - 1]][1] + 1 if d > 1 else 1
        parent = ids[d - 1] if d else None
        n_new = len(ids) - d
        for j in range(d, len(ids)):
            b = ids[j]
            if b in created:  # a repeat inside one request: not a new block
                continue
            sib = len(children[parent]) if parent is not None else 0
            feats[b] = (turn, d, sib, n_new, j == len(ids) - 1)
            created[b] = (clock, turn)
            clock += 1
            parent = b
        for j in range(1, len(ids)):
            children[ids[j - 1]].add(ids[j])
    out: Stats = {}
    for name, cls in FEATURES.items():
        acc: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for b, f in feats.items():
            a = acc[cls(f)]
            a[0] += 1
            r = first_reuse.get(b)
            if r is not None:
                a[1] += 1
                if r - created[b][0] < within:
                    a[2] += 1
        out[name] = {k: (n, r / n, w / n) for k, (n, r, w) in sorted(acc.items())}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reuse_features", description=__doc__)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--within", type=int, default=5000, help="new blocks to wait (5000)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    stats = reuse_by_feature(load_trace(args.trace), args.within)
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    print(f"{'feature':<16} {'class':<8} {'blocks':>8} {'P(reused)':>10} {'P(within)':>10}")
    for name, rows in stats.items():
        for k, (n, r, w) in rows.items():
            print(f"{name:<16} {k:<8} {n:>8} {r:>10.3f} {w:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
