"""End to end over the wire: store in one process, load in another, zero copy."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvstore import Client, Namespace
from kvstore._proto import kvstore_pb2 as pb
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS, blocks_for, content, run_client


def longer_keys(tokens: np.ndarray) -> list[bytes]:
    """The keys of ``tokens`` followed by one block that is not cached."""
    return [*NS.block_keys(tokens), b"\xee" * 32]


def test_store_in_one_process_load_in_another(daemon: DaemonProc) -> None:
    tokens = np.arange(16 * 8 + 5)  # 8 full blocks and a partial one (not keyed)
    res = run_client(
        f"""
        import numpy as np
        from kvstore import Client
        from tests.kvstore.helpers import NS, blocks_for
        toks = np.arange({len(tokens)})
        with Client({daemon.socket!r}, name="writer") as c:
            r = c.store_tokens(NS, toks, blocks_for(NS, toks))
            print(r.new, r.present)
        """
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["8", "0"]
    expected = blocks_for(NS, tokens)
    with Client(daemon.socket, name="reader") as c:
        assert c.lookup_tokens(NS, tokens) == 128
        assert c.lookup(NS.block_keys(tokens)).tiers == ["dram"] * 8
        # The repeated-keys form (other clients) answers like the client's packed form.
        raw = c._stub.Lookup(pb.LookupRequest(session_id=c.session_id, keys=longer_keys(tokens)))
        assert (raw.num_cached, list(raw.tier_index), raw.tier_bytes) == (8, [0] * 8, b"")
        # A longer prompt sharing the prefix hits the same 8 blocks.
        longer = np.concatenate([tokens[:128], np.arange(5000, 5100)])
        assert c.lookup_tokens(NS, longer) == 128
        with c.load_tokens(NS, longer) as lease:
            assert lease.num_tokens == 128
            for got, want in zip(lease.arrays, expected, strict=True):
                assert np.array_equal(got, want)
                assert not got.flags.writeable  # a view on the arena, read-only
            t = lease.tensor(0, dtype=__import__("torch").float16, shape=(-1,))
            assert t.numel() == NS.block_nbytes // 2
        st = c.stats()
        assert st["sessions"]["pins"] == 0


def test_views_are_zero_copy(daemon: DaemonProc) -> None:
    tokens = np.arange(32)
    with Client(daemon.socket) as c:
        c.store_tokens(NS, tokens, blocks_for(NS, tokens))
        with c.load_tokens(NS, tokens) as a, c.load_tokens(NS, tokens) as b:
            # Two leases on the same block see the same memory, not copies.
            assert np.shares_memory(a.arrays[0], b.arrays[0])


def test_identical_blocks_from_two_clients_stored_once(daemon: DaemonProc) -> None:
    tokens = np.arange(16 * 4)
    with Client(daemon.socket) as a, Client(daemon.socket) as b:
        ra = a.store_tokens(NS, tokens, blocks_for(NS, tokens))
        rb = b.store_tokens(NS, tokens, blocks_for(NS, tokens))
        assert (ra.new, ra.present) == (4, 0)
        assert (rb.new, rb.present) == (0, 4)
        st = a.stats()
        assert st["blocks"] == 4
        dram = st["tiers"][0]
        assert dram["blocks"] == 4


def test_different_namespaces_do_not_share(daemon: DaemonProc) -> None:
    tokens = np.arange(32)
    other = Namespace("other-model", num_layers=2, num_kv_heads=2, head_dim=32, block_tokens=16)
    with Client(daemon.socket) as c:
        c.store_tokens(NS, tokens, blocks_for(NS, tokens))
        assert c.lookup_tokens(other, tokens) == 0
        assert c.lookup_tokens(NS, tokens) == 32


def test_eviction_keeps_prefixes_whole(make_daemon: type[DaemonProc]) -> None:
    cfg = """
[[tiers]]
name = "dram"
kind = "dram"
capacity = "1MiB"
options = { slab_bytes = "64KiB" }
"""
    d = make_daemon(cfg).start()
    ns = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=128, block_tokens=64)  # 32 KiB
    with Client(d.socket) as c:
        seqs = [np.arange(i * 10_000, i * 10_000 + 64 * 8) for i in range(10)]
        for s in seqs:
            c.store_tokens(ns, s, blocks_for(ns, s))
        st = c.stats()
        assert st["tiers"][0]["used_bytes"] <= 1 << 20
        assert st["counters"]["dropped"] > 0
        for s in seqs:
            n = c.lookup_tokens(ns, s) // 64
            keys = ns.block_keys(s)
            # Tail-first: whatever survives of a sequence is a prefix of it.
            views = c.acquire(keys)
            assert all(v is not None for v in views[:n])
            assert all(v is None for v in views[n:])
            for k, v in zip(keys[:n], views[:n], strict=True):
                assert np.array_equal(np.frombuffer(v, np.uint8), content(k, ns.block_nbytes))
            c.release(keys[:n])


def test_resource_exhausted_at_once_when_all_pinned(make_daemon: type[DaemonProc]) -> None:
    from kvstore.errors import ResourceExhausted

    cfg = """
[[tiers]]
name = "dram"
kind = "dram"
capacity = "256KiB"
options = { slab_bytes = "64KiB" }
"""
    d = make_daemon(cfg).start()
    ns = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=128, block_tokens=64)  # 32 KiB
    toks = np.arange(64 * 8)
    with Client(d.socket) as c:
        c.store_tokens(ns, toks, blocks_for(ns, toks))
        with c.load_tokens(ns, toks) as lease:
            assert lease.num_tokens == 64 * 8
            other = np.arange(10_000, 10_064)
            t0 = time.monotonic()
            with pytest.raises(ResourceExhausted, match="no room"):
                c.store_tokens(ns, other, blocks_for(ns, other))
            assert time.monotonic() - t0 < 2.0
        # Released: now it fits (the LRU tail is evicted).
        other = np.arange(10_000, 10_064)
        assert c.store_tokens(ns, other, blocks_for(ns, other)).new == 1


def test_async_client_round_trip(daemon: DaemonProc) -> None:
    import asyncio

    from kvstore.aio_client import AsyncClient

    tokens = np.arange(16 * 3)

    async def go() -> None:
        async with await AsyncClient.connect(daemon.socket, name="aio") as c:
            r = await c.store_tokens(NS, tokens, blocks_for(NS, tokens))
            assert (r.new, r.present) == (3, 0)
            assert await c.lookup_tokens(NS, tokens) == 48
            async with await c.load_tokens(NS, tokens) as lease:
                for k, a in zip(lease.keys, lease.arrays, strict=True):
                    assert np.array_equal(a, content(k, NS.block_nbytes))
            assert (await c.stats())["sessions"]["pins"] == 0
            keys = NS.block_keys(tokens)
            views = await c.acquire(keys)  # read-only, as the sync client's
            for v in views:
                assert v is not None and v.readonly
                with pytest.raises(TypeError):
                    v[0] = 1
            await c.release(keys)

    asyncio.run(go())
