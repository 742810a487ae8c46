"""A DRAM-like tier over the NVMe tier in one Hierarchy: demote, promote, restart, persist."""

from __future__ import annotations

from pathlib import Path

import xxhash

from kvstore.hierarchy import Hierarchy, Level, Status
from kvstore.keys import Namespace
from kvstore.tiers.nvme import NvmeTier

from .memtier import MemTier
from .nvme_util import data_for, open_tier

NS = Namespace("m", num_layers=2, num_kv_heads=2, head_dim=64, block_tokens=16)
NB = NS.block_nbytes


def chain(seed: int, n: int) -> list[bytes]:
    return NS.block_keys(list(range(seed * 1000, seed * 1000 + NS.block_tokens * n)))


def build(path: Path, dram_blocks: int) -> Hierarchy:
    mem = MemTier("dram", dram_blocks * NB)
    return Hierarchy([Level.build(mem, block_hint=NB), Level.build(open_tier(path), block_hint=NB)])


def store_chain(h: Hierarchy, keys: list[bytes]) -> None:
    st, ents = h.allocate(7, NS.digest(), NB, None, keys)
    assert Status.NO_SPACE not in st
    sums = []
    for e in ents:
        assert e is not None
        data = data_for(e.key, NB)
        h.levels[0].tier.view(e.locs[0])[:] = data
        sums.append(xxhash.xxh3_64_intdigest(data))
    h.commit(7, keys, sums)


def check_all(h: Hierarchy, keys: list[bytes]) -> None:
    """Acquire every key (promoting from NVMe) and compare its bytes."""
    for k in keys:
        st, ents = h.acquire([k])
        assert st == [Status.OK], (k.hex()[:8], st)
        e = ents[0]
        assert e is not None and e.top == 0
        assert bytes(h.levels[0].tier.view(e.locs[0])) == data_for(k, NB)
        h.release([e])


def nvme(h: Hierarchy) -> NvmeTier:
    t = h.levels[1].tier
    assert isinstance(t, NvmeTier)
    return t


def test_demote_and_promote_bytes(tmp_path: Path) -> None:
    h = build(tmp_path / "t", dram_blocks=4)
    try:
        chains = [chain(i, 3) for i in range(6)]
        for c in chains:
            store_chain(h, c)
        assert h.counters.demotions >= 14 and h.counters.dropped == 0
        nvme(h).flush()
        assert nvme(h).stats()["writes"] == h.counters.demotions
        for c in chains:
            check_all(h, c)
        assert h.counters.promotions > 0 and h.counters.checksum_failures == 0
        st = h.stats()
        assert st["tiers"][1]["io_backend"] == "posix"  # type: ignore[index]
    finally:
        nvme(h).close()


def test_restart_recovers_chains(tmp_path: Path) -> None:
    h = build(tmp_path / "t", dram_blocks=4)
    chains = [chain(i, 4) for i in range(5)]
    for c in chains:
        store_chain(h, c)
    on_nvme = {k for k, e in h.index.items() if e.locs[1] is not None}
    assert on_nvme
    parent_of = {k: e.parent.key if e.parent is not None else None for k, e in h.index.items()}
    nvme(h).close()  # flushes: everything demoted so far is durable
    h2 = build(tmp_path / "t", dram_blocks=4)
    try:
        assert h2.recover() == len(on_nvme)
        assert set(h2.index) == on_nvme == set(h2.ready)
        for k in on_nvme:
            e = h2.get(k)
            assert e is not None and e.top == 1 and e.nbytes == NB and e.checksum
            # A parent that was recovered too is linked again; one that was not
            # (it lived only in DRAM) leaves the block without a parent.
            pk = parent_of[k]
            if pk is not None and pk in on_nvme:
                p = h2.get(pk)
                assert e.parent is p and p is not None
                assert k in {c.key for c in (p.children or ())}
            else:
                assert e.parent is None
        check_all(h2, sorted(on_nvme, key=lambda k: h2.index[k].depth))
        # Lookup works across the restart for a chain whose head survived.
        for c in chains:
            n = len(h2.lookup(c))
            surviving = next((i for i, k in enumerate(c) if k not in on_nvme), len(c))
            assert n == surviving
    finally:
        nvme(h2).close()


def test_persist_all_then_restart(tmp_path: Path) -> None:
    h = build(tmp_path / "t", dram_blocks=16)
    chains = [chain(i, 3) for i in range(4)]
    for c in chains:
        store_chain(h, c)
    assert h.counters.demotions == 0  # all in DRAM
    assert h.persist_all() == 12
    nvme(h).close()
    h2 = build(tmp_path / "t", dram_blocks=16)
    try:
        assert h2.recover() == 12
        for c in chains:
            assert len(h2.lookup(c)) == 3
            check_all(h2, c)
    finally:
        nvme(h2).close()


def test_delete_removes_from_disk_index(tmp_path: Path) -> None:
    h = build(tmp_path / "t", dram_blocks=4)
    c = chain(1, 4)
    store_chain(h, c)
    store_chain(h, chain(2, 4))
    assert h.delete(c) == [Status.OK] * 4
    nvme(h).close()
    h2 = build(tmp_path / "t", dram_blocks=4)
    try:
        h2.recover()
        assert not any(k in h2.index for k in c)
    finally:
        nvme(h2).close()
