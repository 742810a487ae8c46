"""``chain``: our own policy, frequency-filtered, aware of the prefix tree, self-sizing.

What a block's key chain tells, and how it is used here:

* **How often its prefix was reused.**  A block is used whenever a request
  extends it, so its reference count is the reuse count of its prefix.  The count
  outlives residency: a bounded history (keys only, ``HISTORY_FACTOR`` times the
  tier's size) remembers the count of blocks that left, so a block that comes back
  is recognised instead of starting over.
* **Distinct continuations.**  A block with two or more children is a branch
  point (a shared system prompt or document): every continuation needs it, so it
  is treated as reused even when its own count is still one.
* **Depth / tail-first.**  The hierarchy touches and inserts chains tail first,
  so in each LRU segment the deep end of a chain is met before its head; the
  ``evictable`` predicate enforces the rest.  Depth is not used as a priority of
  its own: on the Mooncake trace the chance that a block seen once is reused only
  moves between 0.2 and 0.4 with depth, and depth classes measured worse.
  Recompute cost (which grows with depth) is not weighed either: every block
  counts the same in a prefix-hit rate.

Structure: a *window* (LRU) for blocks referenced once and a *main* segment (LRU)
for reused blocks, so one-off prompts pass through the window without washing out
what is reused.  How to split the tier between the two is not a constant: it
depends on how far apart reuses are compared with the tier's size.  The policy
measures it.  For every reuse it records the reuse distance in the segment's own
clock (insertions and touches since the block's last reference), both for hits
and for blocks that come back after eviction (from the history), and in the
global clock (what a plain LRU of the whole tier would have seen).  Those
histograms are miss-ratio curves; every half-tier of references the window size
is set to the split that would have hit most over recent (decayed) history, or
the policy becomes plain LRU when that would have hit more.  A split with a larger
window is approached at most twofold per period: growing the window evicts reused
blocks from main at once, and the first choices rest on little data (shrinking it,
or switching to and from LRU mode, is not bounded).  With reuse distances
beyond the tier the window shrinks to a filter; with reuses that an LRU of the
whole tier catches, it turns into LRU.  Sizes are in blocks: when the size hint
is off (blocks much larger or smaller than typical), the real size is learnt the
first time the tier is full.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from kvstore.policies._util import first_victim, look_ahead, scan
from kvstore.policies.base import POLICIES, EvictionPolicy

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry

HISTORY_FACTOR = 4
"""The history remembers keys of this many tiers' worth of departed blocks."""
SPLITS = 32
"""Window sizes considered: multiples of 1/SPLITS of the tier."""
DECAY = 0.5
"""Weight kept by the distance histograms at each resize (recent reuse counts more)."""
MIN_WINDOW_FRACTION = 1 / 64
SCAN_LIMIT = 8
SPLIT_MARGIN = 1.0
"""Plain LRU is chosen when its estimated hits exceed this share of the best split's."""

_WIN, _MAIN = 0, 1
_BINS = (HISTORY_FACTOR + 1) * SPLITS
"""Buckets of each reuse-distance histogram (of ``capacity // SPLITS`` ticks each)."""

Meta = tuple[int, int, int, int]
"""A block's metadata: (segment, reference count, segment clock and global clock at
its last reference).  A tuple, built anew at each reference: cheaper to create than
a list, and the history holds it as is once the block leaves."""


@POLICIES.register("chain")
class ChainPolicy(EvictionPolicy):
    """Window + main LRU segments over a reference-count history, split by measured
    reuse distances."""

    name = "chain"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        # The two segments, LRU order, map entry -> its metadata (see ``Meta``).
        self._segs: tuple[OrderedDict[BlockEntry, Meta], OrderedDict[BlockEntry, Meta]] = (
            OrderedDict(),
            OrderedDict(),
        )
        # key -> the departed entry's metadata (the same tuple)
        self._history: OrderedDict[bytes, Meta] = OrderedDict()
        self._clock = [0, 0]
        self._now = 0
        self._refs = 0
        self._rescale(self.capacity_blocks)

    # ------------------------------------------------------------------ helpers
    def _rescale(self, cap: int) -> None:
        """Size the distance histograms, window and history for ``cap`` blocks."""
        self.capacity_blocks = cap
        self._width = max(1, cap // SPLITS)
        # Reuse-distance histograms: window clock, main clock, global clock.
        self._dist = ([0.0] * _BINS, [0.0] * _BINS, [0.0] * _BINS)
        self._window = max(1, int(cap * MIN_WINDOW_FRACTION))
        self._period = max(SPLITS, cap // 2)
        self._hist_limit = HISTORY_FACTOR * cap
        self._lru_mode = False
        # ``cap`` is off (to be learnt again) when the tier holds fewer than half or
        # more than twice as many blocks: ``2 * held < cap or held > 2 * cap``.
        self._held_min, self._held_max = (cap + 1) // 2, 2 * cap

    def _resize(self) -> None:
        """Window size := the split whose two LRU segments would have hit most (a
        larger window: at most twice the current one)."""
        win, main, glob = self._dist
        cum_w = [0.0]
        for k in range(SPLITS):
            cum_w.append(cum_w[-1] + win[k])
        cum_m = [0.0]
        for k in range(SPLITS):
            cum_m.append(cum_m[-1] + main[k])
        best_k, best = 0, -1.0
        for k in range(SPLITS + 1):
            # Ties go to the smaller window (the filter protects reused blocks).
            g = cum_w[k] + cum_m[SPLITS - k]
            if g > best + 1e-9:
                best_k, best = k, g
        if sum(glob[:SPLITS]) > SPLIT_MARGIN * best + 1e-9:
            # A plain LRU of the whole tier would have hit at least as much.
            best_k = SPLITS
        floor = max(1, int(self.capacity_blocks * MIN_WINDOW_FRACTION))
        if best_k == SPLITS:
            self._window = self.capacity_blocks
        else:
            # A larger window evicts reused blocks from main at once (a smaller one
            # only sheds blocks seen once), and early choices rest on little data:
            # the window grows at most twofold per period.  (From LRU mode, whose
            # window is the whole tier, any split is a shrink.)
            self._window = min(max(floor, best_k * self._width), 2 * self._window)
        self._lru_mode = self._window >= self.capacity_blocks
        self._hist_limit = HISTORY_FACTOR * max(self.capacity_blocks, len(self))
        for d in self._dist:
            for i in range(len(d)):
                d[i] *= DECAY

    # ------------------------------------------------------------------ protocol
    def on_insert(self, entry: BlockEntry) -> None:
        self.on_insert_many((entry,))

    def on_insert_many(self, entries: Iterable[BlockEntry]) -> None:
        # One loop for a whole committed chain (once per inserted block: the hot path),
        # the policy's state in locals, written back at the end (_resize reads none of
        # it; it decays the histograms in place).
        hpop = self._history.pop
        win, main = self._segs
        clock = self._clock
        cw, cm = clock
        now, refs, period, lru = self._now, self._refs, self._period, self._lru_mode
        width = self._width
        dist_w, dist_m, dist_g = self._dist
        for entry in entries:
            past = hpop(entry.key, None)
            if past is None:
                # A first reference (count 1): the window, unless it is a branch point.
                children = entry.children
                if lru or not children or len(children) < 2:
                    win[entry] = (_WIN, 1, cw, now)
                    cw += 1
                else:
                    main[entry] = (_MAIN, 1, cm, now)
                    cm += 1
            else:
                # It was here before: a reuse, as in on_access (keep the two alike).
                # With the whole tier as window (reuses all within the tier's reach)
                # the policy is plain LRU: nothing is promoted and main drains.
                seg, count, last, glast = past
                if seg == _WIN:
                    b = (cw - last) // width
                    if b < _BINS:
                        dist_w[b] += 1.0
                else:
                    b = (cm - last) // width
                    if b < _BINS:
                        dist_m[b] += 1.0
                b = (now - glast) // width
                if b < _BINS:
                    dist_g[b] += 1.0
                if lru:
                    win[entry] = (_WIN, count + 1, cw, now)
                    cw += 1
                else:
                    main[entry] = (_MAIN, count + 1, cm, now)
                    cm += 1
            now += 1
            refs += 1
            if refs >= period:
                refs = 0
                self._resize()
                period, lru = self._period, self._lru_mode
        self._now, self._refs = now, refs
        clock[0], clock[1] = cw, cm

    def on_access(self, entry: BlockEntry) -> None:
        win, main = self._segs
        # (A metadata tuple is never empty, so never false.)
        m = win.pop(entry, None) or main.pop(entry, None)
        if m is None:
            return
        # A reuse: as for a block that comes back from the history in on_insert_many
        # (keep the two alike), its reuse distance in its segment's clock and in the
        # global clock (what a plain LRU of the tier would have seen), then its count
        # goes on: two or more, so main, unless the policy is plain LRU.
        seg, count, last, glast = m
        clock, now, width = self._clock, self._now, self._width
        b = (clock[seg] - last) // width
        if b < _BINS:
            self._dist[seg][b] += 1.0
        b = (now - glast) // width
        if b < _BINS:
            self._dist[2][b] += 1.0
        s = _WIN if self._lru_mode else _MAIN
        self._segs[s][entry] = (s, count + 1, clock[s], now)
        clock[s] += 1
        self._now = now + 1
        refs = self._refs = self._refs + 1
        if refs >= self._period:
            self._refs = 0
            self._resize()

    def on_remove(self, entry: BlockEntry) -> None:
        # Once per evicted block: the segments' pops and the history without helpers.
        win, main = self._segs
        m = win.pop(entry, None) or main.pop(entry, None)
        if m is None:
            return
        hist = self._history
        hist[entry.key] = m
        if len(hist) > self._hist_limit:
            hist.popitem(False)  # the oldest (``last=False``: positional is cheaper)

    def _cold_ends(
        self,
    ) -> tuple[OrderedDict[BlockEntry, Meta], OrderedDict[BlockEntry, Meta]]:
        """The segment to evict from first and the other one (rescaling the split
        when the tier's observed capacity moved: ``observed_capacity`` inlined).
        Inlined in :meth:`stream_victims`: keep the two alike."""
        win, main = self._segs
        held = len(win) + len(main)
        if held < self._held_min or held > self._held_max:
            self._rescale(max(1, held))
        if self._lru_mode and main and win:
            # LRU mode: the older of the two cold ends goes first.
            older = main[next(iter(main))][3] < win[next(iter(win))][3]
            return (main, win) if older else (win, main)
        if len(win) > self._window or not main:
            return win, main
        return main, win

    def victims(self, n: int, evictable: Callable[[BlockEntry], bool]) -> list[BlockEntry]:
        first, second = self._cold_ends()
        out: list[BlockEntry] = []
        # A bounded look first: the cold end of one segment is often a parent of
        # blocks in the other (not evictable yet); evict there instead.
        scan(first, n, evictable, out, SCAN_LIMIT)
        named_first = bool(out)
        if len(out) < n:
            scan(second, n, evictable, out)
        if len(out) < n and not named_first:
            # The bounded look rotated SCAN_LIMIT entries without naming one: look
            # further.  (When it named one, a second pass over ``first`` would meet
            # the same entries in the same state and name nothing new: skipped.)
            named = set(out)
            if out:  # scan() would only look ahead: skip its predicate wrapper
                look_ahead(iter(first), n, evictable, out, named)
            else:
                scan(first, n, lambda e: e not in named and evictable(e), out)
        return out

    def stream_victims(self, evictable: Callable[[BlockEntry], bool]) -> Iterator[BlockEntry]:
        # victims(1, ...) as a generator: with n = 1 it names the first evictable
        # entry of ``first`` (within SCAN_LIMIT), else of ``second``, else of ``first``.
        win, main = self._segs
        while True:
            # _cold_ends() inlined: this runs once per evicted block.
            nw, nm = len(win), len(main)
            held = nw + nm
            if held < self._held_min or held > self._held_max:  # also when empty
                if not held:
                    return
                self._rescale(held)
            if self._lru_mode and nm and nw:
                # LRU mode: the older of the two cold ends goes first.
                older = main[next(iter(main))][3] < win[next(iter(win))][3]
                first = main if older else win
            elif nw > self._window or not nm:
                first = win
            else:
                first = main
            head = next(iter(first))
            if evictable(head):  # the common case: the cold end itself
                yield head
                continue
            v = first_victim(first, evictable, SCAN_LIMIT)
            if v is None:
                second = main if first is win else win
                v = first_victim(second, evictable) or first_victim(first, evictable)
                if v is None:
                    return
            yield v

    def __len__(self) -> int:
        win, main = self._segs
        return len(win) + len(main)
