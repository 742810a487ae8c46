"""A daemon promoting from NVMe keeps serving: the reads run off its event loop.

The NVMe tier's ``read_delay_ms`` test option makes every batched read take 1.5 s,
so a promotion is reliably in flight while the test acts.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest

from kvstore import Client
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS, blocks_for, content, popen_client

DELAY_S = 1.5
# NS blocks are 8 KiB; 1 MiB of DRAM holds 128 of them.
SLOW = f"""
[[tiers]]
name = "dram"
kind = "dram"
capacity = "1MiB"
options = {{ slab_bytes = "64KiB" }}

[[tiers]]
name = "nvme"
kind = "nvme"
capacity = "16MiB"
options = {{ segment_bytes = "1MiB", read_delay_ms = {DELAY_S * 1000} }}
"""


def _seq(i: int) -> np.ndarray:
    return np.arange(i * 100_000, i * 100_000 + 16 * 8)


def _start(make_daemon: type[DaemonProc], head: str = "") -> tuple[DaemonProc, Client]:
    """A daemon whose oldest sequences (0..9) were demoted to NVMe, newest (39) in DRAM."""
    d = make_daemon(head + SLOW).start()
    c = Client(d.socket)
    for i in range(40):
        s = _seq(i)
        c.store_tokens(NS, s, blocks_for(NS, s))
    for i in range(5):
        assert set(c.lookup(NS.block_keys(_seq(i))).tiers) == {"nvme"}
    assert set(c.lookup(NS.block_keys(_seq(39))).tiers) == {"dram"}
    return d, c


def _wait(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _in_flight(c: Client) -> int:
    return int(c.stats()["promoter"]["in_flight"])


def _check(keys: list[bytes], views: list[Any]) -> None:
    for k, v in zip(keys, views, strict=True):
        assert v is not None
        assert np.array_equal(np.frombuffer(v, np.uint8), content(k, NS.block_nbytes)), k.hex()


def _no_leaks(c: Client) -> dict[str, Any]:
    st = c.stats()
    assert st["sessions"]["pins"] == 0
    assert st["promoter"]["in_flight"] == 0
    dram = st["tiers"][0]
    assert dram["used_bytes"] == dram["blocks"] * NS.block_nbytes  # no slot leaked
    return st


class Acquirer(threading.Thread):
    """Acquires ``keys`` with its own client; records the views and the time it took."""

    def __init__(self, sock: str, keys: list[bytes], reconnect: bool = True) -> None:
        super().__init__(daemon=True)
        self.sock, self.keys, self.reconnect = sock, keys, reconnect
        self.views: list[Any] = []
        self.took = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.sock, reconnect=self.reconnect) as c:
                t0 = time.monotonic()
                views = c.acquire(self.keys)
                self.took = time.monotonic() - t0
                self.views = [None if v is None else bytes(v) for v in views]
                c.release(self.keys)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_calls_are_served_during_a_promotion(make_daemon: type[DaemonProc]) -> None:
    d, c = _start(make_daemon)
    with c:
        cold = NS.block_keys(_seq(0))
        hot = NS.block_keys(_seq(39))
        a = Acquirer(d.socket, cold)
        a.start()
        _wait(lambda: _in_flight(c) == 1)
        # The read is in flight for 1.5 s: Lookup, an Acquire of DRAM blocks and a
        # whole store answer meanwhile.
        t0 = time.monotonic()
        assert c.lookup(cold).num_cached == 8
        views = c.acquire(hot)
        _check(hot, views)
        c.release(hot)
        s = _seq(100)
        c.store_tokens(NS, s, blocks_for(NS, s))
        took = time.monotonic() - t0
        assert _in_flight(c) == 1, "the promotion ended before the other calls did"
        assert took < DELAY_S, took
        a.join(10)
        assert a.error is None and a.took >= DELAY_S * 0.9
        _check(cold, a.views)
        st = _no_leaks(c)
        assert st["promoter"]["offloaded_total"] == 1
        assert set(c.lookup(cold).tiers) == {"dram"}


def test_same_keys_from_two_clients_read_once(make_daemon: type[DaemonProc]) -> None:
    d, c = _start(make_daemon)
    with c:
        keys = NS.block_keys(_seq(1))
        before = c.stats()
        a, b = Acquirer(d.socket, keys), Acquirer(d.socket, keys[:5])
        a.start()
        _wait(lambda: _in_flight(c) == 1)
        b.start()
        _wait(lambda: _in_flight(c) == 2)  # b waits for a's read
        a.join(10)
        b.join(10)
        assert a.error is None and b.error is None
        _check(keys, a.views)
        _check(keys[:5], b.views)
        st = _no_leaks(c)
        nv0, nv1 = before["tiers"][1], st["tiers"][1]
        assert nv1["read_many_calls"] - nv0["read_many_calls"] == 1  # read once
        assert st["counters"]["promotions"] - before["counters"]["promotions"] == 8
        assert c.delete(keys) == ["OK"] * 8  # nothing left pinned


def test_client_killed_mid_promotion(make_daemon: type[DaemonProc]) -> None:
    d, c = _start(make_daemon)
    with c:
        keys = NS.block_keys(_seq(2))
        p = popen_client(
            f"""
            from kvstore import Client
            from tests.kvstore.helpers import NS
            c = Client({d.socket!r}, name="doomed")
            keys = {keys!r}
            print("go", flush=True)
            c.acquire(keys)
            print("acquired", flush=True)
            """
        )
        assert p.stdout is not None and p.stdout.readline().strip() == "go"
        _wait(lambda: _in_flight(c) == 1)
        os.kill(p.pid, signal.SIGKILL)
        p.communicate()
        _wait(lambda: c.stats()["sessions"]["open"] == 1 and _in_flight(c) == 0)
        _no_leaks(c)
        assert c.delete(keys) == ["OK"] * 8  # nothing left pinned
        assert d.alive() and "Traceback" not in d.log()


def test_sigterm_mid_promotion(make_daemon: type[DaemonProc]) -> None:
    # A short grace: the Acquire call is cancelled, its promotion is not.
    d, c = _start(make_daemon, "[server]\nshutdown_grace_s = 0.1\n")
    keys = NS.block_keys(_seq(3))
    a = Acquirer(d.socket, keys, reconnect=False)
    a.start()
    _wait(lambda: _in_flight(c) == 1)
    c.close()
    assert d.stop(signal.SIGTERM) == 0
    a.join(10)
    log = d.log()
    assert "waiting for 1 promotions in flight" in log and "stopped" in log
    assert "Traceback" not in log
    assert a.error is not None  # the call was cancelled


def test_prefetch_promotes_off_the_loop(make_daemon: type[DaemonProc]) -> None:
    _, c = _start(make_daemon)
    with c:
        keys = NS.block_keys(_seq(4))
        assert c.prefetch(keys) == 8
        assert c.lookup(keys).num_cached == 8
        assert _in_flight(c) == 1  # answered while the read runs
        _wait(lambda: _in_flight(c) == 0)
        assert set(c.lookup(keys).tiers) == {"dram"}
        _no_leaks(c)
        views = c.acquire(keys)
        _check(keys, views)
        c.release(keys)


def test_session_closed_mid_promotion(make_daemon: type[DaemonProc]) -> None:
    d, c = _start(make_daemon)
    with c, grpc.insecure_channel(f"unix:{d.socket}") as ch:
        stub = pb_grpc.KVStoreStub(ch)
        sid = stub.OpenSession(pb.OpenSessionRequest(client_name="raw")).session_id
        keys = NS.block_keys(_seq(2))
        call = stub.Acquire.future(pb.AcquireRequest(session_id=sid, keys=keys), timeout=10)
        _wait(lambda: _in_flight(c) == 1)
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
        with pytest.raises(grpc.RpcError) as ei:
            call.result()
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        assert "ended while its blocks were read" in str(ei.value.details())
        _no_leaks(c)
        assert c.delete(keys) == ["OK"] * 8  # the pins were released, not kept
