"""How far can a window + frequency-filtered main design go on a trace?

An analysis aid behind bench/results/policies.md, not a policy: it replays a
Mooncake-format trace through an idealised two-segment cache (a FIFO window for
blocks seen once, a main segment for blocks seen twice or more, with a perfect,
unbounded reference-count history) and orders the main segment either by LRU
(what an online policy can do) or by Belady's next use (an oracle).  The oracle
ordering bounds what any better *ordering* of the reused blocks can add; the gap to
OPT that remains is the first reuse of blocks, which no reference count predicts.

Usage::

    python -m bench.policy_bounds --trace PATH [--capacity-fraction 0.05] [--window 0.02]
"""

from __future__ import annotations

import argparse
import heapq
from collections import Counter, OrderedDict
from collections.abc import Sequence

from bench.trace_replay import Trace, capacity_of, load_trace, opt_hits


def two_segment_hits(trace: Trace, capacity: int, window: int, oracle_main: bool) -> int:
    """Prefix hits of the idealised window + main cache (see the module docstring)."""
    never = len(trace)
    nxt: list[list[int]] = [[] for _ in trace]
    last: dict[int, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        nxt[i] = [last.get(h, never) for h in trace[i]]
        for h in trace[i]:
            last[h] = i
    win: OrderedDict[int, None] = OrderedDict()
    main: dict[int, int] = {}
    heap: list[tuple[int, int, int]] = []
    order: OrderedDict[int, None] = OrderedDict()
    uses: Counter[int] = Counter()
    hits = 0
    for i, ids in enumerate(trace):
        for h in ids:
            if h not in win and h not in main:
                break
            hits += 1
        for d in range(len(ids) - 1, -1, -1):  # tail first, like the hierarchy
            h = ids[d]
            uses[h] += 1
            if uses[h] >= 2:
                win.pop(h, None)
                main[h] = nxt[i][d]
                if oracle_main:
                    heapq.heappush(heap, (-nxt[i][d], -d, h))
                else:
                    order[h] = None
                    order.move_to_end(h)
            else:
                win[h] = None
        while len(win) > window:
            win.popitem(last=False)
        while main and len(main) + len(win) > capacity:
            if oracle_main:
                nu, _, h = heapq.heappop(heap)
                if main.get(h) == -nu:
                    del main[h]
            else:
                h, _ = order.popitem(last=False)
                main.pop(h, None)
    return hits


def sampled_hits(
    trace: Trace, capacity: int, window: int, sample: float, share: float, seed: int = 0
) -> int:
    """Prefix hits of the window + LRU main cache plus a *sampled* segment for first uses.

    The question it answers: can first reuses (the hits a reference count cannot
    foresee) be caught by keeping a random fraction ``sample`` of new conversations
    long enough?  A new chain (a block below the root or below a branch point) is
    sampled with probability ``sample``, decided once from its first block and
    inherited by the blocks that extend it; its blocks seen once go to a FIFO segment
    of ``share`` of the cache instead of the window, so they stay ``1 / sample``
    times longer.  Blocks seen twice go to main (LRU), as in :func:`two_segment_hits`.
    """
    import random

    rng = random.Random(seed)
    win: OrderedDict[int, None] = OrderedDict()
    kept: OrderedDict[int, None] = OrderedDict()
    order: OrderedDict[int, None] = OrderedDict()
    uses: Counter[int] = Counter()
    kids: Counter[int] = Counter()
    sampled: dict[int, bool] = {}
    seg = max(0, int(share * capacity))
    hits = 0
    for ids in trace:
        for h in ids:
            if h not in win and h not in kept and h not in order:
                break
            hits += 1
        parent = None
        for h in ids:
            if h not in sampled:
                if parent is None or kids[parent] >= 2:
                    sampled[h] = rng.random() < sample
                else:
                    sampled[h] = sampled[parent]
                if parent is not None:
                    kids[parent] += 1
            parent = h
        for d in range(len(ids) - 1, -1, -1):  # tail first, like the hierarchy
            h = ids[d]
            uses[h] += 1
            if uses[h] >= 2:
                win.pop(h, None)
                kept.pop(h, None)
                order[h] = None
                order.move_to_end(h)
            elif sampled[h] and seg:
                kept[h] = None
            else:
                win[h] = None
        while len(win) > window:
            win.popitem(last=False)
        while len(kept) > seg:
            kept.popitem(last=False)
        while order and len(order) + len(win) + len(kept) > capacity:
            order.popitem(last=False)
        while len(win) + len(kept) + len(order) > capacity:
            (kept if kept else win).popitem(last=False)
    return hits


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.policy_bounds", description=__doc__)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--capacity-fraction", type=float, default=0.05)
    ap.add_argument("--window", type=float, default=0.02, help="window, fraction of the cache")
    ap.add_argument(
        "--sample",
        type=float,
        nargs="*",
        default=(),
        metavar="P",
        help="also try a sampled segment for first uses, for each fraction P of new chains",
    )
    ap.add_argument("--sample-share", type=float, default=0.2, help="its share of the cache")
    args = ap.parse_args(argv)
    trace = load_trace(args.trace)
    refs = sum(map(len, trace))
    cap = capacity_of(trace, args.capacity_fraction)
    win = max(1, int(args.window * cap))
    opt = opt_hits(trace, cap) / refs
    for label, oracle in (("LRU main", False), ("oracle (Belady) main", True)):
        r = two_segment_hits(trace, cap, win, oracle) / refs
        print(f"{label:>22}: hit rate {r:.3f} = {r / opt:.0%} of OPT ({opt:.3f})")
    for p in args.sample:
        r = sampled_hits(trace, cap, win, p, args.sample_share) / refs
        label = f"sampled {p:.0%} in {args.sample_share:.0%}"
        print(f"{label:>22}: hit rate {r:.3f} = {r / opt:.0%} of OPT ({opt:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
