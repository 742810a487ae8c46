"""Model pins across an involuntary session end, through the real daemon.

A session that ends while its client lives (its Watch stream broke) keeps its model
pins for ``models.pin_grace_s``: the model's extent cannot be reused under the
client's tensors, and the client's reconnect takes the pins over.  Pins not taken
over in time are dropped and the client reports the model lost (``ModelPinLost``)
instead of letting it go unnoticed.  A client whose process is gone gets no grace.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from kvstore import AsyncClient, Client
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from loader import client as mclient
from loader.errors import ModelBudgetError, ModelPinLost
from loader.store import ModelStore
from tests.kvstore.conftest import ROOT, DaemonProc
from tests.loader.conftest import model_pins, same_tensors, small_model, wait_for, write_model

# Two of these models (~0.6 MiB each) do not fit the 1 MiB budget together.
CONFIG = """
[server]
lease_timeout_s = 2.0

[[tiers]]
name = "dram"
kind = "dram"
capacity = "8MiB"
options = {{ slab_bytes = "1MiB" }}

[models]
dram_budget = "{budget}"
prefault = false
pin_grace_s = {grace}
"""

Models = dict[str, dict[str, torch.Tensor]]


def _daemon(tmp_path: Path, grace: float, budget: str) -> tuple[DaemonProc, Models]:
    d = tmp_path / "d"
    d.mkdir()
    refs = {"a": small_model(4, layers=10), "b": small_model(5, layers=10)}
    with ModelStore(d / "data") as st:
        for name, ref in refs.items():
            st.add(name, write_model(tmp_path / f"{name}.safetensors", ref))
    return DaemonProc(d, CONFIG.format(grace=grace, budget=budget)).start(), refs


@pytest.fixture
def daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[DaemonProc, Models]]:
    grace, budget = getattr(request, "param", (30.0, "1MiB"))
    proc, refs = _daemon(tmp_path, grace, budget)
    try:
        yield proc, refs
    finally:
        if proc.alive():
            assert proc.stop() == 0, proc.log()


def _open_sessions(socket: str) -> int:
    with grpc.insecure_channel(f"unix:{socket}") as ch:
        resp = pb_grpc.KVStoreStub(ch).Stats(pb.StatsRequest(), timeout=5.0)
    return int(json.loads(resp.json)["sessions"]["open"])


def _break_watch(c: Client, socket: str) -> int:
    """Ends ``c``'s Watch stream as a broken connection would (the client process
    lives on) and waits until the daemon has ended the session; returns its id."""
    sid = c.session_id
    c._watch.cancel()
    assert wait_for(lambda: _open_sessions(socket) == 0, 10.0), "the daemon to end the session"
    return sid


def test_a_reconnect_within_the_grace_keeps_the_models_pin(
    daemon: tuple[DaemonProc, Models],
) -> None:
    proc, refs = daemon
    c = Client(proc.socket, timeout=20.0)
    a = c.load_model("a")
    old = _break_watch(c, proc.socket)
    # The session is gone, its pin is not: "a"'s extent stays, so "b" does not fit.
    assert model_pins(proc.socket) == {"a": 1, "b": 0}
    with pytest.raises(ModelBudgetError, match="a .*1 of a disconnected client"):
        mclient.load_model(proc.socket, "b", pin=False)
    # Only the same client process may take the pins over.
    with grpc.insecure_channel(f"unix:{proc.socket}") as ch:
        resp = pb_grpc.KVStoreStub(ch).OpenSession(
            pb.OpenSessionRequest(client_pid=1, previous_session_id=old), timeout=5.0
        )
        assert list(resp.adopted_models) == []
    # The client's next call finds its session lost, reconnects and adopts the pin.
    assert c.release_model("a") == 1
    assert c.session_id != old and c.lost_models == frozenset()
    same_tensors(a, refs["a"])  # never released: the bytes under the views never changed
    assert model_pins(proc.socket) == {"a": 0, "b": 0}
    same_tensors(c.swap("", "b"), refs["b"])  # "a" may go now
    c.close()


@pytest.mark.parametrize("daemon", [(0.3, "1MiB")], indirect=True)
def test_pins_not_taken_over_in_time_are_reported_lost(
    daemon: tuple[DaemonProc, Models],
) -> None:
    proc, refs = daemon
    with Client(proc.socket, timeout=20.0) as c:
        c.load_model("a")
        _break_watch(c, proc.socket)
        assert wait_for(lambda: model_pins(proc.socket)["a"] == 0, 10.0), "the parked pin to expire"
        # Its extent may be reused now (here: "b" evicts "a").
        same_tensors(mclient.load_model(proc.socket, "b", pin=False), refs["b"])
        with pytest.raises(ModelPinLost, match="'a'") as err:
            c.release_model("a")  # reconnects first: the daemon kept nothing
        assert err.value.lost == 1
        assert c.lost_models == frozenset()  # reported once
        # Loading it again gives fresh tensors and a pin that releases normally.
        same_tensors(c.load_model("a"), refs["a"])
        assert c.release_model("a") == 1


@pytest.mark.parametrize("daemon", [(30.0, "2MiB")], indirect=True)  # room for both
def test_a_swap_after_a_reconnect_within_the_grace_swaps(
    daemon: tuple[DaemonProc, Models],
) -> None:
    proc, refs = daemon
    with Client(proc.socket, timeout=20.0) as c:
        c.load_model("a")
        _break_watch(c, proc.socket)
        same_tensors(c.swap("a", "b"), refs["b"])  # "a"'s adopted pin is what it swaps from
        assert model_pins(proc.socket) == {"a": 0, "b": 1}
        assert c.release_model("b") == 1


@pytest.mark.parametrize("daemon", [(30.0, "2MiB")], indirect=True)
@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_swap_after_another_call_reconnected_loads_the_new_model(
    daemon: tuple[DaemonProc, Models], client: str
) -> None:
    """After a daemon restart the old pin is gone; the first call to notice (here a KV
    lookup, as an engine's traffic would be) reconnects, and a swap from the lost
    model then just loads and pins the new one."""
    proc, refs = daemon
    if client == "sync":
        with Client(proc.socket, timeout=20.0) as c:
            c.load_model("a")
            proc.stop()
            proc.start()
            assert c.lookup([bytes(32)]).num_cached == 0  # reconnects
            assert c.lost_models == frozenset({"a"})
            same_tensors(c.swap("a", "b"), refs["b"])
            assert c.lost_models == frozenset()
            assert model_pins(proc.socket) == {"a": 0, "b": 1}
        return

    async def go() -> None:
        c = await AsyncClient.connect(proc.socket, timeout=20.0)
        await c.load_model("a")
        proc.stop()
        proc.start()
        assert (await c.lookup([bytes(32)])).num_cached == 0
        assert c.lost_models == frozenset({"a"})
        same_tensors(await c.swap("a", "b"), refs["b"])
        assert model_pins(proc.socket) == {"a": 0, "b": 1}
        await c.close()

    asyncio.run(go())


def test_async_client_takes_its_pins_over(daemon: tuple[DaemonProc, Models]) -> None:
    proc, refs = daemon

    async def go() -> None:
        c = await AsyncClient.connect(proc.socket, timeout=20.0)
        a = await c.load_model("a")
        task = c._watch_task
        assert task is not None
        task.cancel()
        assert await asyncio.to_thread(wait_for, lambda: _open_sessions(proc.socket) == 0, 10.0)
        assert model_pins(proc.socket)["a"] == 1
        assert await c.release_model("a") == 1
        same_tensors(a, refs["a"])
        await c.close()

    asyncio.run(go())


CHILD = """
import sys, time
from kvstore import Client
c = Client(sys.argv[1])
c.load_model("a")
print("pinned", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_a_dead_client_gets_no_grace(daemon: tuple[DaemonProc, Models], reap: bool) -> None:
    """The grace is for clients that may come back: a killed one's pins go at once
    (also while it is a zombie its parent has not reaped yet)."""
    proc, _ = daemon
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, proc.socket],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == b"pinned"
            assert model_pins(proc.socket)["a"] == 1
            child.kill()
            if reap:
                child.wait()
            # Well within the 30 s grace: the daemon saw the process was gone.
            assert wait_for(lambda: model_pins(proc.socket)["a"] == 0, 5.0), (
                "the dead client's pin to go"
            )
        finally:
            child.kill()
