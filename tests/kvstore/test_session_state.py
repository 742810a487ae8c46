"""However a session ends, no per-session state is left in the server or the manager.

Sessions that expired by lease timeout (no Watch, no CloseSession) used to leave an
entry each in the servicer's ``_closed`` map: a leak of ~1 KiB per session.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.daemon import Daemon
from tests.kvstore.helpers import small_config, until

N = 200


def _state(d: Daemon) -> tuple[int, int]:
    assert d._servicer is not None
    return len(d._servicer._closed), len(d.sessions.sessions)


def test_every_way_a_session_ends_drops_its_state(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon(small_config(tmp_path, lease_s=0.2))
        await d.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'kv.sock'}") as ch:
                stub = pb_grpc.KVStoreStub(ch)
                # Lease expiry: sessions opened and forgotten (no Watch, no CloseSession).
                for _ in range(N):
                    await stub.OpenSession(pb.OpenSessionRequest(client_name="leak"))
                # A slow machine may already have reclaimed the first few (0.2 s lease):
                # every session is either live, with its one server-side entry, or gone.
                closed, live = _state(d)
                assert closed == live
                assert live + d.sessions.reclaimed_total == N
                assert live > 0
                assert await until(lambda: d.sessions.reclaimed_total == N)
                assert _state(d) == (0, 0)
                # The rest is not about the lease: a long one keeps a slow machine from
                # reclaiming the sessions below before they are checked, and makes sure
                # it is the CloseSession and the Watch's end that drop them.
                d.sessions.lease_timeout_s = 60.0

                # CloseSession, and a Watch that ends when its client goes.
                a = await stub.OpenSession(pb.OpenSessionRequest())
                await stub.CloseSession(pb.CloseSessionRequest(session_id=a.session_id))
                b = await stub.OpenSession(pb.OpenSessionRequest())
                watch = stub.Watch(pb.WatchRequest(session_id=b.session_id))
                await watch.read()
                watch.cancel()
                assert await until(lambda: _state(d) == (0, 0))

                # Daemon stop: sessions still open, one with a Watch.
                c = await stub.OpenSession(pb.OpenSessionRequest())
                await stub.OpenSession(pb.OpenSessionRequest())
                watch = stub.Watch(pb.WatchRequest(session_id=c.session_id))
                await watch.read()
                assert _state(d) == (2, 2)
        finally:
            await d.stop()
        assert _state(d) == (0, 0)

    asyncio.run(main())


def test_a_failing_close_hook_does_not_skip_the_others(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon(small_config(tmp_path))
        await d.start()
        try:
            seen: list[int] = []

            def bad(sid: int) -> None:
                raise RuntimeError("boom")

            d.sessions.on_close.insert(0, bad)
            d.sessions.on_close.append(seen.append)
            async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'kv.sock'}") as ch:
                stub = pb_grpc.KVStoreStub(ch)
                a = await stub.OpenSession(pb.OpenSessionRequest())
                await stub.CloseSession(pb.CloseSessionRequest(session_id=a.session_id))
            assert seen == [a.session_id]
            assert _state(d) == (0, 0)
        finally:
            d.sessions.on_close.pop(0)
            await d.stop()

    asyncio.run(main())
