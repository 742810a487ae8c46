"""Stopping the daemon with clients connected: quick, clean, and the clients see it."""

from __future__ import annotations

import signal
import time

from kvstore import Client
from tests.kvstore.conftest import SMALL, DaemonProc


def test_ctrl_c_with_idle_clients_is_quick_and_clean(make_daemon: type[DaemonProc]) -> None:
    # shutdown_grace_s stays at its 5 s default: an open Watch stream used to hold it all.
    d = make_daemon(SMALL, args=("--log-level", "debug")).start()
    c = Client(d.socket, reconnect=False)
    c2 = Client(d.socket, reconnect=False)
    try:
        c.stats()
        t0 = time.monotonic()
        assert d.stop(signal.SIGINT) == 0
        took = time.monotonic() - t0
        log = d.log()
        assert took < 2.0, f"stop took {took:.2f}s:\n{log}"
        assert "level=ERROR" not in log and "Traceback" not in log, log
        assert "stopped" in log
        # Debug is the daemon's own: grpc and asyncio stay at warning (one line per poll).
        assert "logger=kvstore" in log
        assert "logger=grpc" not in log and "logger=asyncio" not in log, log
        c._watch_thread.join(10.0)  # the Watch stream ended: the client can tell
        assert not c._watch_thread.is_alive()
    finally:
        c.close()
        c2.close()
