"""Calls in flight when the daemon stops: they complete within the grace period, or
fail as DaemonUnavailable (the daemon went away), never as a bare CANCELLED."""

from __future__ import annotations

import signal
from typing import Any

import grpc
import pytest

from kvstore import Client
from kvstore import _wire as w
from kvstore.errors import DaemonUnavailable, KVStoreError, LeaseLost, from_rpc_error
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS
from tests.kvstore.test_daemon_promote import DELAY_S, Acquirer, _check, _in_flight, _seq, _start
from tests.kvstore.test_daemon_promote import _wait as wait_for


class _Err(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_cancelled_by_the_server_is_daemon_unavailable() -> None:
    err = from_rpc_error(_Err(grpc.StatusCode.CANCELLED, "CANCELLED"))
    assert isinstance(err, DaemonUnavailable) and err.code == grpc.StatusCode.CANCELLED
    assert w.is_session_lost(_Err(grpc.StatusCode.CANCELLED))
    other = from_rpc_error(_Err(grpc.StatusCode.INTERNAL, "bug"))
    assert type(other) is KVStoreError and not w.is_session_lost(_Err(grpc.StatusCode.INTERNAL))


def test_sync_client_reconnects_after_a_cancelled_call(daemon: DaemonProc) -> None:
    with Client(daemon.socket) as c:
        old, real = c.session_id, c._stub.Lookup
        calls: list[int] = []

        def lookup(req: Any, timeout: float) -> Any:
            calls.append(req.session_id)
            if len(calls) == 1:
                raise _Err(grpc.StatusCode.CANCELLED, "CANCELLED")
            return real(req, timeout=timeout)

        c._stub.Lookup = lookup  # the reconnect makes a new stub: patch this one only
        assert c.lookup(NS.block_keys(_seq(0))).num_cached == 0
        assert calls == [old] and c.session_id != old  # reconnected, retried there


def test_call_past_the_grace_period_is_unavailable(make_daemon: type[DaemonProc]) -> None:
    d, c = _start(make_daemon, "[server]\nshutdown_grace_s = 0.1\n")
    a = Acquirer(d.socket, NS.block_keys(_seq(3)), reconnect=False)
    a.start()
    wait_for(lambda: _in_flight(c) == 1)
    c.close()
    assert d.stop(signal.SIGTERM) == 0
    a.join(10)
    assert isinstance(a.error, DaemonUnavailable), repr(a.error)
    assert a.error.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in str(a.error)
    log = d.log()
    assert "grace period over" in log and "Traceback" not in log
    assert log.rstrip().endswith("msg=stopped"), log


def test_call_within_the_grace_period_completes(make_daemon: type[DaemonProc]) -> None:
    d, c = _start(make_daemon, f"[server]\nshutdown_grace_s = {DELAY_S * 4}\n")
    keys = NS.block_keys(_seq(3))
    a = Acquirer(d.socket, keys, reconnect=False)
    a.start()
    wait_for(lambda: _in_flight(c) == 1)
    c.close()
    assert d.stop(signal.SIGTERM) == 0
    a.join(10)
    if a.error is not None:  # only its Release may come too late: the daemon is gone,
        # and with it the proof that the pins were held (the bytes are checked below)
        assert isinstance(a.error, (DaemonUnavailable, LeaseLost)), repr(a.error)
    _check(keys, a.views)
    assert "grace period over" not in d.log()


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_release_of_a_cancelled_session_reconnects(daemon: DaemonProc, code: Any) -> None:
    with Client(daemon.socket) as c:
        old = c.session_id

        def release(req: Any, timeout: float) -> Any:
            raise _Err(code, "gone")

        c._stub.Release = release
        # The session ended (daemon stopping) before the release: nothing to release,
        # but the pin was not held throughout, and the client has reconnected.
        with pytest.raises(LeaseLost, match="1 pin"):
            c.release([b"k" * 32])
        assert c.session_id != old
