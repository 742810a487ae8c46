"""Replay a Mooncake-format KV-cache trace through the daemon's own block index.

Every request of the trace is served by :class:`kvstore.hierarchy.Hierarchy` over
byte-less :class:`~kvstore.tiers.base.NullTier` levels, through the same
``lookup`` / ``acquire`` / ``allocate`` / ``commit`` / ``release`` path the daemon
uses, with the policy and admission objects of the registries.  No separate
simulator decides what is cached: the figures are those of the real code.

In the same run it computes two references over the same trace: the infinite
cache (every block ever seen stays) and Belady's offline optimum (evict the block
whose next use is farthest; ties go to the deeper block so a cached prefix never
loses its head first), as well as plain LRU through the hierarchy.

Usage::

    python -m bench.trace_replay --trace PATH --policy NAME --capacity-fraction 0.05 [--json]
    python -m bench.trace_replay --trace PATH --capacity-fraction 0.05 \\
        --nvme-fraction 0.2 --nvme-admission seen-twice
    python -m bench.trace_replay --trace PATH --sweep   # every policy x capacity, PNG chart
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.replay_floor import fused_lru_replay
from kvstore.gc_tuning import tune_gc
from kvstore.hierarchy import Hierarchy, Level, Status
from kvstore.policies import ADMISSIONS, DEFAULT_POLICY, POLICIES
from kvstore.registry import UnknownNameError
from kvstore.tiers.base import NullTier

BLOCK_BYTES = 1 << 20
"""Nominal bytes per block: NullTier only counts, so the value just scales capacity."""
SWEEP_FRACTIONS = (0.02, 0.05, 0.10, 0.20, 0.40)
CHART_DIR = Path(__file__).resolve().parent / "charts"
_NS = b"\x00" * 32  # one namespace for the whole trace


class TraceError(ValueError):
    """A trace file that is not in the Mooncake format; the message names the line."""


Trace = list[list[int]]


def load_trace(path: str | Path, limit: int | None = None) -> Trace:
    """Reads the ``hash_ids`` of every request of a Mooncake JSONL trace.

    Args:
        path: one JSON object a line with at least ``hash_ids`` (a list of ints).
        limit: read at most this many requests.

    Raises:
        TraceError: on a missing file, a malformed line or an empty trace.
    """
    p = Path(path)
    try:
        f = p.open("r", encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"cannot open trace {p}: {exc.strerror}") from None
    out: Trace = []
    with f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{p}:{lineno}: not JSON ({exc.msg})") from None
            ids = obj.get("hash_ids") if isinstance(obj, dict) else None
            if not isinstance(ids, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in ids
            ):
                raise TraceError(
                    f"{p}:{lineno}: expected an object with 'hash_ids', a list of ints >= 0"
                )
            out.append(ids)
    if not out:
        raise TraceError(f"{p}: no requests")
    return out


def unique_blocks(trace: Trace) -> int:
    return len({h for ids in trace for h in ids})


def key_of(h: int) -> bytes:
    """The 32-byte block key standing for hash id ``h``."""
    return h.to_bytes(32, "big")


def synthetic_trace(requests: int = 2000, seed: int = 0) -> Trace:
    """A conversation-like trace for tests and validation (not tuned to any file).

    A few shared system prompts; conversations of geometric length whose turns
    extend the previous prompt and come back after a random number of other
    requests; the last block of every prompt is partial (never reused).
    """
    import random

    rng = random.Random(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    systems = [fresh(rng.randint(1, 4)) for _ in range(5)]
    pending: list[tuple[int, list[int]]] = []  # (due request index, full-block prefix)
    out: Trace = []
    for i in range(requests):
        due = [p for p in pending if p[0] <= i]
        if due and rng.random() < 0.6:
            item = due[0]
            pending.remove(item)
            prefix = item[1]
        else:
            prefix = list(rng.choice(systems))
        prompt = prefix + fresh(rng.randint(1, 12))
        out.append(prompt + fresh(1))  # + the partial last block
        if rng.random() < 0.45:
            pending.append((i + rng.randint(20, 400), prompt))
    return out


# ---------------------------------------------------------------------- references
def plain_lru_hits(trace: Trace, capacity: int) -> int:
    """Prefix hits of a textbook LRU of ``capacity`` blocks (the trace README's
    reference): a request's blocks are inserted head first after it, and the least
    recent block goes whether or not a cached child depends on it."""
    from collections import OrderedDict

    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for ids in trace:
        for h in ids:
            if h not in cache:
                break
            hits += 1
        for h in ids:
            cache[h] = None
            cache.move_to_end(h)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits


def infinite_hits(trace: Trace) -> int:
    """Prefix hits of a cache that never evicts."""
    seen: set[int] = set()
    hits = 0
    for ids in trace:
        for h in ids:
            if h not in seen:
                break
            hits += 1
        seen.update(ids)
    return hits


def opt_hits(trace: Trace, capacity: int) -> int:
    """Prefix hits of Belady's offline optimum with ``capacity`` blocks.

    After each request all its blocks are inserted; then, while over capacity, the
    block whose next use is farthest goes, the deeper one first on ties.  A parent is
    used whenever its child is, so its next use is never later than the child's and
    the cache stays prefix-closed.
    """
    never = len(trace)
    nxt: list[list[int]] = [[] for _ in trace]
    last: dict[int, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        ids = trace[i]
        nxt[i] = [last.get(h, never) for h in ids]
        for h in ids:
            last[h] = i
    cache: dict[int, int] = {}  # id -> next use
    heap: list[tuple[int, int, int]] = []  # (-next use, -depth, id); stale items skipped
    hits = 0
    for i, ids in enumerate(trace):
        for h in ids:
            if h not in cache:
                break
            hits += 1
        for d, (h, nu) in enumerate(zip(ids, nxt[i], strict=True)):
            cache[h] = nu
            heapq.heappush(heap, (-nu, -d, h))
        while len(cache) > capacity:
            nu, _, h = heapq.heappop(heap)
            if cache.get(h) == -nu:
                del cache[h]
    return hits


# ---------------------------------------------------------------------- replay
@dataclass
class ReplayResult:
    """What one replay measured."""

    policy: str
    capacity_blocks: int
    refs: int
    hits: int
    seconds: float
    cpu_seconds: float = 0.0
    hits_by_tier: list[int] = field(default_factory=list)
    no_space: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.refs if self.refs else 0.0

    @property
    def refs_per_second(self) -> float:
        return self.refs / self.seconds if self.seconds > 0 else float("inf")

    @property
    def refs_per_cpu_second(self) -> float:
        """Speed on this process's CPU time: less sensitive to a busy machine."""
        return self.refs / self.cpu_seconds if self.cpu_seconds > 0 else float("inf")


def build_hierarchy(
    policy: str,
    dram_blocks: int,
    nvme_blocks: int = 0,
    nvme_policy: str | None = None,
    nvme_admission: str = "always",
    dram_admission: str = "always",
) -> Hierarchy:
    """A one- or two-level hierarchy of NullTiers sized in blocks."""
    levels = [
        Level.build(
            NullTier("dram", dram_blocks * BLOCK_BYTES), policy, dram_admission, BLOCK_BYTES
        )
    ]
    if nvme_blocks > 0:
        levels.append(
            Level.build(
                NullTier("nvme", nvme_blocks * BLOCK_BYTES),
                nvme_policy or policy,
                nvme_admission,
                BLOCK_BYTES,
            )
        )
    return Hierarchy(levels, write_level=0)


def replay(
    trace: Trace,
    hierarchy: Hierarchy,
    policy: str = "",
    progress: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Serves every request of ``trace`` through ``hierarchy``.

    Per request: ``lookup`` gives the cached prefix (its hits, counted by the tier
    that held each block); ``acquire`` pins and promotes it; ``allocate`` +
    ``commit`` insert the rest of the chain; ``release`` unpins.  So every block of
    the request ends up inserted or touched, as an engine's own traffic would.

    Timed (``seconds``, ``cpu_seconds``): every one of those Hierarchy calls for every
    request, with their policy and tier calls, and this loop's own bookkeeping.  Not
    timed: turning the trace's hash ids into 32-byte keys, done once before the clock
    starts (an engine hashes tokens on its side, not in the index).
    """
    keyed = [[key_of(h) for h in ids] for ids in trace]
    h = hierarchy
    cap = h.levels[0].tier.capacity_bytes // BLOCK_BYTES
    hits_by_tier = [0] * h.n
    refs = hits = no_space = 0
    lookup, acquire, allocate, commit, release = (
        h.lookup,
        h.acquire,
        h.allocate,
        h.commit,
        h.release,
    )
    new_status = Status.NEW
    t0 = time.perf_counter()
    c0 = time.process_time()
    for i, keys in enumerate(keyed):
        n = len(keys)
        refs += n
        found = lookup(keys)
        k = len(found)
        hits += k
        for e in found:
            hits_by_tier[e.top] += 1
        pinned: list = []
        if k:
            _, got = acquire(keys[:k])
            pinned = [e for e in got if e is not None]
        if k < n:
            st, _ = allocate(1, _NS, BLOCK_BYTES, keys[k - 1] if k else None, keys[k:], k)
            new = [kk for kk, s in zip(keys[k:], st, strict=True) if s == new_status]
            if new:
                commit(1, new, [0] * len(new))
            elif st and st[0] == Status.NO_SPACE:
                no_space += 1
        if pinned:
            release(pinned)
        if progress is not None and i % 256 == 255:
            progress(256)
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    if progress is not None:
        progress(len(keyed) % 256)
    return ReplayResult(
        policy=policy or h.levels[0].policy.name,
        capacity_blocks=cap,
        refs=refs,
        hits=hits,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        hits_by_tier=hits_by_tier,
        no_space=no_space,
    )


def capacity_of(trace: Trace, fraction: float) -> int:
    """``fraction`` of the trace's unique blocks, at least one block."""
    return max(1, int(fraction * unique_blocks(trace)))


def run_one(
    trace: Trace,
    policy: str,
    fraction: float,
    nvme_fraction: float = 0.0,
    nvme_policy: str | None = None,
    nvme_admission: str = "always",
) -> ReplayResult:
    h = build_hierarchy(
        policy,
        capacity_of(trace, fraction),
        capacity_of(trace, nvme_fraction) if nvme_fraction > 0 else 0,
        nvme_policy,
        nvme_admission,
    )
    return replay(trace, h, policy)


# ---------------------------------------------------------------------- sweep
@dataclass
class SweepRow:
    fraction: float
    capacity_blocks: int
    hit_rates: dict[str, float]
    refs_per_second: dict[str, float]
    refs_per_cpu_second: dict[str, float]
    opt_hit_rate: float
    infinite_hit_rate: float


def sweep(
    trace: Trace, policies: Sequence[str], fractions: Sequence[float] = SWEEP_FRACTIONS
) -> list[SweepRow]:
    """Every policy at every capacity fraction, with a progress bar."""
    from tqdm import tqdm

    refs = sum(len(ids) for ids in trace)
    inf = infinite_hits(trace) / refs
    rows: list[SweepRow] = []
    with tqdm(
        total=len(fractions) * (len(policies) + 1), desc="replay", unit="run", file=sys.stderr
    ) as bar:
        for f in fractions:
            cap = capacity_of(trace, f)
            rates: dict[str, float] = {}
            speeds: dict[str, float] = {}
            cpu_speeds: dict[str, float] = {}
            for p in policies:
                bar.set_postfix_str(f"{p} @ {f:.0%}")
                r = run_one(trace, p, f)
                rates[p], speeds[p] = r.hit_rate, r.refs_per_second
                cpu_speeds[p] = r.refs_per_cpu_second
                bar.update(1)
            bar.set_postfix_str(f"OPT @ {f:.0%}")
            opt = opt_hits(trace, cap) / refs
            bar.update(1)
            rows.append(SweepRow(f, cap, rates, speeds, cpu_speeds, opt, inf))
    return rows


def sweep_table(rows: Sequence[SweepRow]) -> str:
    """A Markdown table: hit rate of every policy per capacity, and OPT / infinite."""
    policies = list(rows[0].hit_rates)
    head = "| capacity | blocks | " + " | ".join(policies) + " | OPT | infinite |"
    sep = "|---" * (len(policies) + 4) + "|"
    lines = [head, sep]
    for r in rows:
        cells = [f"{r.hit_rates[p]:.3f}" for p in policies]
        lines.append(
            f"| {r.fraction:.0%} | {r.capacity_blocks} | "
            + " | ".join(cells)
            + f" | {r.opt_hit_rate:.3f} | {r.infinite_hit_rate:.3f} |"
        )
    for label, attr in (("wall", "refs_per_second"), ("CPU", "refs_per_cpu_second")):
        speed = " | ".join(f"{min(getattr(r, attr)[p] for r in rows) / 1e3:.0f}k" for p in policies)
        lines.append(f"| min refs/s ({label}) | | {speed} | | |")
    return "\n".join(lines)


def draw_chart(rows: Sequence[SweepRow], path: Path, title: str) -> Path:
    """Hit rate against capacity, one line per policy plus OPT and infinite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.fraction * 100 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for p in rows[0].hit_rates:
        ax.plot(xs, [r.hit_rates[p] for r in rows], marker="o", label=p)
    ax.plot(xs, [r.opt_hit_rate for r in rows], "k--", marker="s", label="Belady OPT")
    ax.plot(xs, [r.infinite_hit_rate for r in rows], "k:", label="infinite cache")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}%" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("cache capacity (fraction of the trace's unique blocks)")
    ax.set_ylabel("prefix hit rate (hit blocks / referenced blocks)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- CLI
def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.trace_replay", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--trace", required=True, help="Mooncake-format JSONL trace")
    ap.add_argument("--policy", default=DEFAULT_POLICY, help=f"default: {DEFAULT_POLICY}")
    ap.add_argument("--capacity-fraction", type=_fraction, default=0.05)
    ap.add_argument("--nvme-fraction", type=_fraction, default=None, help="add an NVMe tier")
    ap.add_argument("--nvme-policy", default=None, help="default: same as --policy")
    ap.add_argument("--nvme-admission", default="always")
    ap.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--sweep", action="store_true", help="every policy x 2..40%%, PNG chart")
    ap.add_argument("--chart", type=Path, default=None, help="chart path for --sweep")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tune_gc()  # the collector settings the daemon runs with (kvstore.gc_tuning)
    try:
        for name in filter(None, [args.policy, args.nvme_policy]):
            POLICIES.get(name)
        ADMISSIONS.get(args.nvme_admission)
        trace = load_trace(args.trace, args.limit)
    except (UnknownNameError, TraceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    refs = sum(len(ids) for ids in trace)
    if args.sweep:
        rows = sweep(trace, POLICIES.names())
        chart = args.chart or CHART_DIR / f"policies_{Path(args.trace).stem}.png"
        draw_chart(rows, chart, f"{Path(args.trace).name}: {refs:,} block references")
        if args.json:
            print(json.dumps([asdict(r) for r in rows]))
        else:
            print(sweep_table(rows))
            print(f"chart: {chart}")
        return 0
    res = run_one(
        trace,
        args.policy,
        args.capacity_fraction,
        args.nvme_fraction or 0.0,
        args.nvme_policy,
        args.nvme_admission,
    )
    lru = res if args.policy == "lru" else run_one(trace, "lru", args.capacity_fraction)
    cap = capacity_of(trace, args.capacity_fraction)
    # The limit, measured in the same run: a bare OrderedDict LRU of the trace (no
    # index, no tail-first rule, no pins), what pure Python does per reference at best.
    t0 = time.perf_counter()
    plain_lru = plain_lru_hits(trace, cap)
    plain_seconds = time.perf_counter() - t0
    # The tighter limit: the same data model and the same decisions as ``lru``
    # through the hierarchy, fused into one function (bench/replay_floor.py).
    floor_hits, _, floor_seconds = fused_lru_replay(
        [[key_of(x) for x in ids] for ids in trace], cap
    )
    out = {
        "policy": args.policy,
        "capacity_fraction": args.capacity_fraction,
        "capacity_blocks": cap,
        "hit_rate": res.hit_rate,
        "lru_hit_rate": lru.hit_rate,
        "opt_hit_rate": opt_hits(trace, cap) / refs,
        "plain_lru_hit_rate": plain_lru / refs,
        "infinite_hit_rate": infinite_hits(trace) / refs,
        "refs_per_second": res.refs_per_second,
        "refs_per_cpu_second": res.refs_per_cpu_second,
        "plain_lru_refs_per_second": refs / plain_seconds if plain_seconds > 0 else 0.0,
        "index_floor_refs_per_second": refs / floor_seconds if floor_seconds > 0 else 0.0,
        "index_floor_hit_rate": floor_hits / refs,
        "refs": refs,
        "unique_blocks": unique_blocks(trace),
    }
    if args.nvme_fraction:
        out.update(
            nvme_fraction=args.nvme_fraction,
            nvme_admission=args.nvme_admission,
            hits_by_tier={"dram": res.hits_by_tier[0], "nvme": res.hits_by_tier[1]},
            hit_rate_by_tier={
                "dram": res.hits_by_tier[0] / refs,
                "nvme": res.hits_by_tier[1] / refs,
            },
        )
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>20}: {v:.4f}" if isinstance(v, float) else f"{k:>20}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
