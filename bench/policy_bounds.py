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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.policy_bounds", description=__doc__)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--capacity-fraction", type=float, default=0.05)
    ap.add_argument("--window", type=float, default=0.02, help="window, fraction of the cache")
    args = ap.parse_args(argv)
    trace = load_trace(args.trace)
    refs = sum(map(len, trace))
    cap = capacity_of(trace, args.capacity_fraction)
    win = max(1, int(args.window * cap))
    opt = opt_hits(trace, cap) / refs
    for label, oracle in (("LRU main", False), ("oracle (Belady) main", True)):
        r = two_segment_hits(trace, cap, win, oracle) / refs
        print(f"{label:>22}: hit rate {r:.3f} = {r / opt:.0%} of OPT ({opt:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
