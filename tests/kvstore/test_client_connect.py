"""Connecting: a missing socket fails fast; a reconnect after a restart still waits for it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from kvstore import AsyncClient, Client
from kvstore.cli import main
from kvstore.errors import DaemonUnavailable
from tests.kvstore.conftest import SMALL, DaemonProc


def test_missing_socket_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nope = str(tmp_path / "nope.sock")
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable, match="no kvstore daemon answers at unix:.*nope.sock"):
        Client(nope, timeout=10.0)
    assert main(["stats", "--socket", nope]) == 1
    assert time.monotonic() - t0 < 1.0
    assert "no kvstore daemon answers" in capsys.readouterr().err


def test_async_connect_to_missing_socket_fails_fast(tmp_path: Path) -> None:
    import asyncio

    nope = str(tmp_path / "nope.sock")
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable, match="no kvstore daemon answers at unix:.*nope.sock"):
        asyncio.run(AsyncClient.connect(nope, timeout=10.0))
    assert time.monotonic() - t0 < 1.0


def test_reconnect_waits_for_the_restarted_daemons_socket(make_daemon: type[DaemonProc]) -> None:
    d = make_daemon(SMALL).start()
    with Client(d.socket, timeout=20.0) as c:
        c.stats()
        assert d.stop() == 0
        assert not os.path.exists(d.socket)  # a clean stop removes it
        restart = threading.Thread(target=d.start)
        restart.start()
        try:
            # The first call finds the daemon gone and reconnects, waiting for the socket.
            assert not os.path.exists(d.socket)
            assert c.stats()["sessions"]["open"] == 1
        finally:
            restart.join()


def test_a_reconnect_refused_by_the_daemon_leaves_the_client_closed_cleanly(
    daemon: DaemonProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSession failing (the daemon answers, but refuses) is a DaemonUnavailable-style
    error, and later calls say the client is closed (not "closed channel")."""
    import grpc

    from kvstore import client as client_mod
    from kvstore.errors import KVStoreError

    class Refused(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "the daemon is shutting down"

    class RefusingStub:
        def __init__(self, ch: grpc.Channel) -> None:
            pass

        def OpenSession(self, *a: object, **kw: object) -> None:
            raise Refused()

    c = Client(daemon.socket, timeout=5.0)
    monkeypatch.setattr(client_mod.pb_grpc, "KVStoreStub", RefusingStub)
    with pytest.raises(KVStoreError, match="shutting down"):
        c.reconnect()
    with pytest.raises(DaemonUnavailable, match="client is closed"):
        c.stats()
    monkeypatch.undo()
    c.reconnect()  # and a later reconnect works
    assert c.stats()["sessions"]["open"] == 1
    c.close()
