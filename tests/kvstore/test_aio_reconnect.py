"""AsyncClient across a daemon restart: the sync Client's behaviour, under asyncio.

A call that finds the daemon gone or its session unknown reconnects once (one
reconnect for all the coroutines that find it so) and is retried; pins and leases of
the ended session release nothing and raise LeaseLost; errors the caller causes still
raise.  Each test
restarts a real daemon on the same socket (the sync versions: test_client_connect,
test_lease_restart, test_release_restart).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from kvstore import AsyncClient, LeaseLost
from kvstore.errors import DaemonUnavailable, FailedPrecondition
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS, blocks_for

TOKS = np.arange(32)
KEYS = NS.block_keys(TOKS)


def _count_opens(c: AsyncClient) -> list[int]:
    """Counts the sessions ``c`` opens from now on (each reconnect opens one)."""
    opens: list[int] = []
    real: Callable[[int], Awaitable[None]] = c._open

    async def counted(previous: int = 0) -> None:
        opens.append(1)
        await real(previous)

    c._open = counted  # type: ignore[method-assign]
    return opens


async def _pins(c: AsyncClient) -> int:
    return int((await c.stats())["sessions"]["pins"])


def test_call_after_a_restart_runs_in_a_new_session(daemon: DaemonProc) -> None:
    async def go() -> None:
        async with await AsyncClient.connect(daemon.socket, timeout=10.0) as c:
            await c.store_tokens(NS, TOKS, blocks_for(NS, TOKS))
            old = c.session_id
            daemon.kill()
            daemon.start()
            # Finds the session unknown (or the daemon gone), reconnects, retries.
            assert (await c.lookup(KEYS)).num_cached == 0  # a new, empty daemon
            assert c.session_id != old
            assert (await c.stats())["sessions"]["open"] == 1

    asyncio.run(go())


def test_reconnect_waits_for_the_restarted_daemons_socket(daemon: DaemonProc) -> None:
    async def go() -> None:
        async with await AsyncClient.connect(daemon.socket, timeout=20.0) as c:
            await c.stats()
            assert daemon.stop() == 0
            assert not os.path.exists(daemon.socket)  # a clean stop removes it
            restart = asyncio.create_task(asyncio.to_thread(daemon.start))
            await asyncio.sleep(0)
            assert not os.path.exists(daemon.socket)
            # The call finds the daemon gone and reconnects, waiting for the socket.
            assert (await c.stats())["sessions"]["open"] == 1
            await restart

    asyncio.run(go())


def test_store_restart_lookup_and_the_old_lease(daemon: DaemonProc) -> None:
    async def go() -> None:
        async with await AsyncClient.connect(daemon.socket, timeout=10.0) as c:
            assert (await c.store_tokens(NS, TOKS, blocks_for(NS, TOKS))).new == 2
            lease = await c.load_tokens(NS, TOKS)
            assert len(lease.keys) == 2
            old = c.session_id
            daemon.kill()
            daemon.start()
            with pytest.raises(LeaseLost, match="2 pin"):
                await lease.close()  # the daemon released those pins when the session ended
            await lease.close()  # once only
            # A DRAM-only daemon starts empty: the blocks are misses in the new session.
            assert await c.lookup_tokens(NS, TOKS) == 0
            assert c.session_id != old
            # The namespace was registered again in the new session: storing works.
            assert (await c.store_tokens(NS, TOKS, blocks_for(NS, TOKS))).new == 2
            async with await c.load_tokens(NS, TOKS) as again:
                assert len(again.keys) == 2
                assert bytes(again.arrays[0]) == bytes(blocks_for(NS, TOKS)[0])
            st = (await c.stats())["sessions"]
            assert st["open"] == 1 and st["pins"] == 0

    asyncio.run(go())


def test_release_right_after_a_restart_says_the_pins_were_lost(daemon: DaemonProc) -> None:
    async def go() -> None:
        async with await AsyncClient.connect(daemon.socket, timeout=10.0) as c:
            await c.store_tokens(NS, TOKS, blocks_for(NS, TOKS))
            assert all(v is not None for v in await c.acquire(KEYS))
            old = c.session_id
            daemon.kill()
            daemon.start()
            with pytest.raises(LeaseLost, match="2 pin"):
                await c.release(KEYS)  # finds its session gone: releases nothing
            assert (await c.lookup(KEYS)).num_cached == 0  # reconnected by now
            assert c.session_id != old
            assert await _pins(c) == 0
            with pytest.raises(FailedPrecondition, match="not acquired by this session"):
                await c.release(KEYS)  # a second release: a caller bug, as before

    asyncio.run(go())


def test_release_after_another_call_reconnected_says_the_pins_were_lost(daemon: DaemonProc) -> None:
    async def go() -> None:
        async with await AsyncClient.connect(daemon.socket, timeout=10.0) as c:
            await c.store_tokens(NS, TOKS, blocks_for(NS, TOKS))
            await c.acquire(KEYS)
            daemon.kill()
            daemon.start()
            assert (await c.store_tokens(NS, TOKS, blocks_for(NS, TOKS))).new == 2
            assert (await c.acquire(KEYS[:1]))[0] is not None  # pinned in the new session
            with pytest.raises(LeaseLost, match="1 pin"):
                await c.release(KEYS)  # key 0: the new pin, released; key 1: ended
            assert await _pins(c) == 0
            with pytest.raises(LeaseLost, match="1 pin"):
                await c.release(KEYS[:1])  # key 0's old pin: ended too
            with pytest.raises(FailedPrecondition, match="not acquired by this session"):
                await c.release(KEYS[:1])

    asyncio.run(go())


def test_errors_the_caller_causes_still_raise(daemon: DaemonProc) -> None:
    async def go() -> None:
        async with await AsyncClient.connect(daemon.socket, timeout=10.0) as c:
            daemon.kill()
            daemon.start()
            await c.store_tokens(NS, TOKS, blocks_for(NS, TOKS))  # reconnects
            sid = c.session_id
            lease = await c.load_tokens(NS, TOKS)
            await c.release(lease.keys)  # released behind the lease's back: a caller bug
            with pytest.raises(FailedPrecondition, match="not acquired by this session"):
                await lease.close()
            with pytest.raises(FailedPrecondition, match="not acquired by this session"):
                await c.release(KEYS[:1])
            await c.acquire(KEYS[:1])
            with pytest.raises(FailedPrecondition):
                await c.release([KEYS[0], KEYS[0]])  # one too many: nothing released
            assert await _pins(c) == 1
            await c.release(KEYS[:1])  # the failed release left its pin counted
            assert await _pins(c) == 0
            assert c.session_id == sid  # none of these reconnected

    asyncio.run(go())


def test_concurrent_calls_after_a_restart_reconnect_once(daemon: DaemonProc) -> None:
    async def go() -> None:
        async with await AsyncClient.connect(daemon.socket, timeout=10.0) as c:
            await c.store_tokens(NS, TOKS, blocks_for(NS, TOKS))
            opens = _count_opens(c)
            daemon.kill()
            daemon.start()
            # Session-bound calls (stats is not: a new daemon answers it in any session).
            calls: list[Awaitable[Any]] = [c.lookup(KEYS) for _ in range(3)]
            calls += [c.acquire(KEYS), c.store_tokens(NS, TOKS, blocks_for(NS, TOKS))]
            out = await asyncio.gather(*calls)
            assert len(opens) == 1
            assert out[3] == [None, None] and out[4].new == 2
            assert (await c.stats())["sessions"]["open"] == 1

    asyncio.run(go())


def test_calls_in_flight_during_a_reconnect_are_retried(daemon: DaemonProc) -> None:
    async def go() -> None:
        async with await AsyncClient.connect(daemon.socket, timeout=10.0) as c:
            opens = _count_opens(c)
            old = c.session_id
            # The stats calls are on the wire when reconnect() closes their channel.
            out = await asyncio.gather(c.stats(), c.stats(), c.reconnect(), c.stats())
            assert len(opens) == 1 and c.session_id != old
            assert all(st["sessions"]["open"] >= 1 for st in (out[0], out[1], out[3]))
            assert (await c.lookup(KEYS)).num_cached == 0  # the new session works

    asyncio.run(go())


def test_a_failed_reconnect_is_shared_and_bounded(daemon: DaemonProc) -> None:
    async def go() -> None:
        c = await AsyncClient.connect(daemon.socket, timeout=1.0)
        opens = _count_opens(c)
        daemon.stop()
        t0 = time.monotonic()
        out = await asyncio.gather(*(c.stats() for _ in range(3)), return_exceptions=True)
        assert all(isinstance(e, DaemonUnavailable) for e in out), out
        assert len(opens) == 1 and time.monotonic() - t0 < 2.5  # one wait, not three
        with pytest.raises(DaemonUnavailable, match="client is closed"):
            await c.stats()  # as Client: closed until reconnect() succeeds
        daemon.start()
        # The 1 s timeout was for the failed wait above.  A reconnect right after the
        # restart may wait out grpc's reconnect backoff (~1 s, longer on a loaded
        # machine): give it room, that wait is not what this test bounds.
        c.timeout = 20.0
        await c.reconnect()
        assert (await c.stats())["sessions"]["open"] == 1
        await c.close()

    asyncio.run(go())


@pytest.mark.parametrize("verb", ["Acquire", "Allocate"])
def test_an_answer_from_a_replaced_session_is_not_used(daemon: DaemonProc, verb: str) -> None:
    """A reconnect (another coroutine's) lands between an Acquire/Allocate answer and
    its caller: the answer's pins or slots ended with the old session, so the call is
    made again in the new one instead of handing out views nothing holds."""

    async def go() -> None:
        async with await AsyncClient.connect(daemon.socket, timeout=10.0) as c:
            if verb == "Acquire":
                await c.store_tokens(NS, TOKS, blocks_for(NS, TOKS))
            else:
                await c.register_namespace(NS)
            real = c._send
            sent: list[int] = []

            async def racing(method: str, build: Callable[[int], Any]) -> tuple[int, Any]:
                out = await real(method, build)
                if method == verb:
                    sent.append(out[0])
                    if len(sent) == 1:
                        await c.reconnect()  # as if another coroutine's ran meanwhile
                return out

            c._send = racing  # type: ignore[method-assign]
            if verb == "Acquire":
                views = await c.acquire(KEYS)
                for v, want in zip(views, blocks_for(NS, TOKS), strict=True):
                    assert v is not None and np.array_equal(np.frombuffer(v, np.uint8), want)
            else:
                allocs = await c.allocate(NS, KEYS)
                assert [a.status for a in allocs] == ["NEW"] * len(KEYS)
            assert len(sent) == 2 and sent[1] == c.session_id != sent[0]

            # What the caller holds is the current session's: the old one is gone
            # with what it took, and the new one holds one pin or slot per key.
            async def settled() -> bool:
                st = (await c.stats())["sessions"]
                held = st["pins"] if verb == "Acquire" else st["pending_allocations"]
                return bool(st["open"] == 1 and held == len(KEYS))

            deadline = time.monotonic() + 10
            while not await settled():
                assert time.monotonic() < deadline, (await c.stats())["sessions"]
                await asyncio.sleep(0.05)
            if verb == "Acquire":
                await c.release(KEYS)
                assert await _pins(c) == 0

    asyncio.run(go())
