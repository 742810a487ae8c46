"""What the block index's data model costs per reference in CPython: the replay floor.

``python -m bench.trace_replay`` serves a trace through the daemon's own
``Hierarchy`` with its policy and tier objects.  This module replays the same
trace with the same decisions as the ``lru`` policy through that hierarchy, and
the same data per block (one ``BlockEntry`` with its lists and children set, the
index and its ready map, pins, tail-first touches and evictions), but fused into
one function: no policy or tier objects, no statuses, no counters, no call per
block.  Its hit count equals the ``lru`` replay's (``tests/bench`` checks it), so
its speed is an upper bound on what any layering of this data model reaches on
the machine it runs on: the limit that ``refs_per_second`` is compared with.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from kvstore.entry import PENDING, READY, BlockEntry

_NS = b"\x00" * 32


def fused_lru_replay(keyed: list[list[bytes]], capacity: int) -> tuple[int, int, float]:
    """Replays ``keyed`` (each request's 32-byte block keys) through a fused LRU
    index of ``capacity`` blocks.  Returns (hits, references, seconds)."""
    index: dict[bytes, BlockEntry] = {}
    ready: dict[bytes, BlockEntry] = {}
    order: OrderedDict[BlockEntry, None] = OrderedDict()
    move, used = order.move_to_end, 0
    hits = refs = 0
    t0 = time.perf_counter()
    for keys in keyed:
        n = len(keys)
        refs += n
        found = list(map(ready.get, keys))
        if None in found:
            del found[found.index(None) :]
        k = len(found)
        hits += k
        for e in found:  # acquire: pin, then touch tail first
            e.pins += 1
        for e in reversed(found):
            e.hits += 1
            move(e)
        parent = found[-1] if k else None
        depth = k
        new: list[BlockEntry] = []
        for i in range(k, n):  # allocate
            key = keys[i]
            e = index.get(key)
            if e is not None:
                parent, depth = e, e.depth + 1
                continue
            e = BlockEntry(key, _NS, 1, parent, depth, [None], [0], PENDING, -1, 0, 0, 1)
            index[key] = e
            if parent is not None:
                pc = parent.children
                if pc is None:
                    parent.children = {e}
                else:
                    pc.add(e)
            if used >= capacity:
                # Room for this block and the rest of the chain in one pass, one
                # victim at a time: the first evictable entry from the cold end,
                # those passed over rotated to the hot end.
                need = sum(1 for kk in keys[i:] if kk not in index) + 1 - (capacity - used)
                while need > 0 and order:
                    skipped = []
                    v = None
                    for x in order:
                        if x.state == READY and not x.pins and not x.kid_tops[0]:
                            v = x
                            break
                        skipped.append(x)
                    if v is None:
                        break
                    for x in skipped:
                        move(x)
                    del order[v]
                    p = v.parent
                    if p is not None:
                        p.kid_tops[0] -= 1
                        if p.children is not None:
                            p.children.discard(v)
                        v.parent = None
                    v.top = -1
                    del index[v.key]
                    ready.pop(v.key, None)
                    used -= 1
                    need -= 1
                if used >= capacity:  # all or nothing: no room for the chain
                    for x in (e, *reversed(new)):
                        if x.parent is not None:
                            x.parent.children.discard(x)  # type: ignore[union-attr]
                            x.parent.kid_tops[0] -= x.top == 0
                        del index[x.key]
                    used -= len(new)
                    new = []
                    break
            used += 1
            e.top = 0
            if parent is not None:
                parent.kid_tops[0] += 1
            new.append(e)
            parent = e
            depth += 1
        for e in new:  # commit, then insert tail first
            e.state = READY
            e.owner = 0
            ready[e.key] = e
        for e in reversed(new):
            order[e] = None
        for e in found:  # release
            e.pins -= 1
    return hits, refs, time.perf_counter() - t0
