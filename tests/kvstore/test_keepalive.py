"""A client whose host vanishes (no FIN, no RST: the connection just goes silent)
loses its session once the daemon's keepalive pings go unanswered.

Before the daemon pinged, such a TCP client kept its session (its Watch stream stayed
open, so no lease expiry) and its pins for good.  A daemon on its Unix socket alone
does not ping: a local client that dies closes its socket, and one that is merely
stopped (a debugger, SIGSTOP) keeps its session and pins.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import grpc
import pytest

from kvstore import daemon as daemon_mod
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.daemon import Daemon
from tests.kvstore.helpers import popen_client, small_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FreezingProxy:
    """Forwards TCP both ways until :meth:`freeze`, then forwards nothing (and never
    closes): to the daemon, a peer whose host went away."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while not self.frozen.is_set():
            read = asyncio.ensure_future(r.read(65536))
            frozen = asyncio.ensure_future(self.frozen.wait())
            await asyncio.wait({read, frozen}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                read.cancel()
                frozen.cancel()
                return
            frozen.cancel()
            data = read.result()
            if not data or self.frozen.is_set():
                return
            w.write(data)
            await w.drain()

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)
        self._held = (cw, uw)  # frozen: kept open, never read or written again
        await asyncio.gather(self._pipe(cr, uw), self._pipe(ur, cw))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in getattr(self, "_held", ()):
            w.transport.abort()


@pytest.fixture
def fast_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_mod, "KEEPALIVE_MS", 500)
    monkeypatch.setattr(daemon_mod, "KEEPALIVE_TIMEOUT_MS", 500)


def test_a_silent_tcp_client_loses_its_session(tmp_path: Path, fast_pings: None) -> None:
    port = _free_port()
    cfg = small_config(tmp_path, tcp=f"127.0.0.1:{port}")

    async def main() -> None:
        d = Daemon(cfg)
        await d.start()
        proxy = FreezingProxy(port)
        await proxy.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as ch:
                stub = pb_grpc.KVStoreStub(ch)
                s = await stub.OpenSession(pb.OpenSessionRequest(client_name="far"))
                watch = stub.Watch(pb.WatchRequest(session_id=s.session_id))
                await watch.read()
                await asyncio.sleep(2.0)  # pings answered meanwhile: the session stays
                assert s.session_id in d.sessions.sessions
                proxy.frozen.set()
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 20.0
                while s.session_id in d.sessions.sessions and loop.time() < deadline:
                    await asyncio.sleep(0.1)
                assert s.session_id not in d.sessions.sessions, "the silent client kept its session"
                assert d.sessions.reclaimed_total == 1
                watch.cancel()
        finally:
            proxy.close()
            await d.stop()

    asyncio.run(main())


def test_a_stopped_local_client_keeps_its_session(tmp_path: Path, fast_pings: None) -> None:
    cfg = small_config(tmp_path)

    async def main() -> None:
        d = Daemon(cfg)
        await d.start()
        p = popen_client(
            stdin=True,
            code=f"""
            import sys, time
            from kvstore import Client
            c = Client({cfg.server.socket!r}, name="paused")
            print(c.session_id, flush=True)
            assert sys.stdin.readline() == "go\\n"
            c.close()
            """,
        )
        try:
            assert p.stdout is not None
            line = await asyncio.to_thread(p.stdout.readline)
            sid = int(line)
            assert sid in d.sessions.sessions
            p.send_signal(signal.SIGSTOP)
            await asyncio.sleep(3.0)  # six ping timeouts, were the daemon pinging
            assert sid in d.sessions.sessions, "a stopped local client lost its session"
            p.send_signal(signal.SIGCONT)
            out, err = await asyncio.to_thread(p.communicate, "go\n", 30)
            assert p.returncode == 0, err
            assert sid not in d.sessions.sessions  # closed by the client itself
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()  # and closes the pipes
            await d.stop()

    asyncio.run(main())
