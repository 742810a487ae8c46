"""Sessions own their pins and allocations; the daemon reclaims them when a client goes away."""

from __future__ import annotations

import json
import os
import signal
import time

import grpc
import numpy as np

from kvstore import Client
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS, blocks_for, content, popen_client


def _wait(pred: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_client_killed_mid_write_is_reclaimed(daemon: DaemonProc) -> None:
    toks = np.arange(16 * 6)
    p = popen_client(
        f"""
        import sys, time
        import numpy as np
        from kvstore import Client
        from tests.kvstore.helpers import NS
        c = Client({daemon.socket!r}, name="doomed")
        allocs = c.allocate(NS, NS.block_keys(np.arange({len(toks)})))
        # Write half of the first block, then wait to be killed before committing.
        np.frombuffer(allocs[0].view, np.uint8)[: NS.block_nbytes // 2] = 0xAB
        print("written", flush=True)
        time.sleep(60)
        """
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "written"
    with Client(daemon.socket) as c:
        assert c.stats()["sessions"]["pending_allocations"] == 6
        assert c.lookup_tokens(NS, toks) == 0  # uncommitted slots are invisible
        os.kill(p.pid, signal.SIGKILL)
        p.communicate()
        assert _wait(lambda: c.stats()["sessions"]["pending_allocations"] == 0, 10.0)
        st = c.stats()
        assert st["tiers"][0]["used_bytes"] == 0
        assert st["sessions"]["reclaimed_total"] >= 1
        # The same keys can be written again, and readers see only complete blocks.
        r = c.store_tokens(NS, toks, blocks_for(NS, toks))
        assert r.new == 6
        with c.load_tokens(NS, toks) as lease:
            for k, a in zip(lease.keys, lease.arrays, strict=True):
                assert np.array_equal(a, content(k, NS.block_nbytes))


def test_pins_of_killed_client_are_released(daemon: DaemonProc) -> None:
    toks = np.arange(16 * 4)
    with Client(daemon.socket) as c:
        c.store_tokens(NS, toks, blocks_for(NS, toks))
        p = popen_client(
            f"""
            import time
            import numpy as np
            from kvstore import Client
            from tests.kvstore.helpers import NS
            c = Client({daemon.socket!r})
            lease = c.load_tokens(NS, np.arange({len(toks)}))
            print(lease.num_tokens, flush=True)
            time.sleep(60)
            """
        )
        assert p.stdout is not None
        assert p.stdout.readline().strip() == str(len(toks))
        assert c.stats()["sessions"]["pins"] == 4
        p.kill()
        p.communicate()
        assert _wait(lambda: c.stats()["sessions"]["pins"] == 0, 10.0)
        # Unpinned blocks can be deleted again.
        assert c.delete(list(reversed(NS.block_keys(toks)))) == ["OK"] * 4


def test_session_without_watch_expires(daemon: DaemonProc) -> None:
    # The fixture's lease_timeout_s is 2 s.
    with grpc.insecure_channel(f"unix:{daemon.socket}") as ch:
        s = pb_grpc.KVStoreStub(ch)

        def reclaimed() -> int:  # Stats names no session: asking does not renew the lease
            st = json.loads(s.Stats(pb.StatsRequest()).json)
            return int(st["sessions"]["reclaimed_total"])

        t0 = time.monotonic()
        sid = s.OpenSession(pb.OpenSessionRequest(client_name="no-watch")).session_id
        s.Lookup(pb.LookupRequest(session_id=sid))
        # Reclaimed once idle past the lease (not before), however slow the machine.
        assert _wait(lambda: reclaimed() == 1, 30.0)
        assert time.monotonic() - t0 >= 2.0
        try:
            s.Lookup(pb.LookupRequest(session_id=sid))
            raise AssertionError("session should have expired")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND


def test_close_releases_everything(daemon: DaemonProc) -> None:
    toks = np.arange(32)
    c = Client(daemon.socket)
    c.store_tokens(NS, toks, blocks_for(NS, toks))
    c.acquire(NS.block_keys(toks))
    c.allocate(NS, NS.block_keys(np.arange(500, 532)))
    c.close()
    with Client(daemon.socket) as d:
        st = d.stats()["sessions"]
        assert st["pins"] == 0 and st["pending_allocations"] == 0


def test_sigterm_is_graceful(daemon: DaemonProc) -> None:
    assert daemon.stop(signal.SIGTERM) == 0
    assert not os.path.exists(daemon.socket)
    assert "stopped" in daemon.log()


def test_client_survives_daemon_restart(daemon: DaemonProc) -> None:
    toks = np.arange(32)
    c = Client(daemon.socket, timeout=5.0)
    try:
        c.store_tokens(NS, toks, blocks_for(NS, toks))
        daemon.kill()
        daemon.start()
        # DRAM-only blocks are gone after a crash; the client reconnects by itself.
        assert c.lookup_tokens(NS, toks) == 0
        assert c.store_tokens(NS, toks, blocks_for(NS, toks)).new == 2
        assert c.lookup_tokens(NS, toks) == 32
    finally:
        c.close()
