"""A namespace lives as long as an open session that registered it.

Every registered namespace used to stay in the daemon for good: sessions that come and
go with a new model or tenant salt each grew ``Daemon.namespaces`` by one, without
bound.  The clients register their namespaces again in every new session.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore._wire import register_req
from kvstore.daemon import Daemon
from kvstore.keys import Namespace
from tests.kvstore.helpers import small_config, until

N = 100


def _ns(model: str, salt: bytes = b"") -> Namespace:
    return Namespace(
        model, num_layers=1, num_kv_heads=1, head_dim=64, block_tokens=16, tenant_salt=salt
    )


def test_namespaces_go_with_the_sessions_that_registered_them(tmp_path: Path) -> None:
    async def main() -> None:
        d = Daemon(small_config(tmp_path))
        await d.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'kv.sock'}") as ch:
                stub = pb_grpc.KVStoreStub(ch)

                async def session(ns: Namespace) -> int:
                    sid = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
                    await stub.RegisterNamespace(register_req(sid, ns))
                    return int(sid)

                # A new namespace per session, ended every way a session ends.
                closed = [await session(_ns(f"m{i}")) for i in range(N)]
                for sid in closed:
                    await stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
                assert len(d.namespaces) == 0
                # Abandoned (no Watch): reclaimed by lease expiry, made short only once
                # they are all registered (a slow machine must not reclaim one midway).
                for i in range(N):
                    await session(_ns(f"e{i}", salt=i.to_bytes(4, "little")))
                watched = await session(_ns("watched"))
                watch = stub.Watch(pb.WatchRequest(session_id=watched))
                await watch.read()
                watch.cancel()  # the client went away
                assert len(d.namespaces) >= N  # the abandoned ones: not expired yet
                d.sessions.lease_timeout_s = 0.3
                assert await until(lambda: not d.sessions.sessions)
                assert d.namespaces == {} and not d.sessions._ns_users
                assert d.stats()["namespaces"] == 0
                d.sessions.lease_timeout_s = 60.0

                # Shared by two sessions (registered twice by one): kept until both end.
                ns = _ns("shared")
                a, b = await session(ns), await session(ns)
                await stub.RegisterNamespace(register_req(b, ns))
                await stub.CloseSession(pb.CloseSessionRequest(session_id=a))
                alloc = pb.AllocateRequest(
                    session_id=b,
                    namespace_id=ns.digest(),
                    block_nbytes=ns.block_nbytes,
                    keys=ns.block_keys(list(range(16))),
                )
                assert (await stub.Allocate(alloc)).status == [pb.NEW]
                await stub.CloseSession(pb.CloseSessionRequest(session_id=b))
                assert d.namespaces == {}

                # A new session must register it again (the clients do).
                c = await session(_ns("other"))
                alloc.session_id = c
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Allocate(alloc)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                assert "call RegisterNamespace" in (err.value.details() or "")
        finally:
            await d.stop()
        assert d.namespaces == {}

    asyncio.run(main())
