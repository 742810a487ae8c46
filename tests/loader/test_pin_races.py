"""Model pins and reconnects racing each other, through the real daemon.

The client's record of the models it holds (``lost_models``, ``ModelPinLost``) must
match the daemon's pins even when a reconnect runs while a model call is under way.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvstore import AsyncClient, Client
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from loader import aio
from loader import client as mclient
from loader.cli import main as models_cli
from loader.errors import ModelPinLost
from tests.kvstore.conftest import DaemonProc
from tests.loader import test_crash_paths as crash
from tests.loader.conftest import model_pins, same_tensors, small_model
from tests.loader.test_pin_grace import Models, _daemon

env = crash.env  # the fixture


@pytest.fixture
def no_grace(tmp_path: Path) -> Iterator[tuple[DaemonProc, Models]]:
    proc, refs = _daemon(tmp_path, 0.0, "4MiB")
    try:
        yield proc, refs
    finally:
        if proc.alive():
            assert proc.stop() == 0, proc.log()


def test_a_load_that_a_reconnect_overtook_is_reported_lost(
    no_grace: tuple[DaemonProc, Models], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load pinned in the old session finishes after another coroutine's reconnect
    that did not keep the pin: the model is lost, not held."""
    proc, _ = no_grace
    entered, gate = threading.Event(), threading.Event()
    place = aio.place

    def slow_place(tensors: Any, device: Any) -> Any:
        entered.set()
        gate.wait(10.0)
        return place(tensors, device)

    monkeypatch.setattr(aio, "place", slow_place)

    async def go() -> None:
        c = await AsyncClient.connect(proc.socket, timeout=20.0)
        load = asyncio.create_task(c.load_model("a"))
        assert await asyncio.to_thread(entered.wait, 10.0)
        await c.reconnect()  # no grace: the old session's pin on "a" goes
        gate.set()
        await load
        assert model_pins(proc.socket)["a"] == 0
        assert c.lost_models == frozenset({"a"})
        with pytest.raises(ModelPinLost):
            await c.release_model("a")
        await c.close()

    asyncio.run(go())


def test_the_wait_for_a_load_of_a_model_removed_meanwhile_answers_its_copy(
    env: Callable[[str], crash.Env],
) -> None:
    """``models rm`` between the client's first LoadModel (which pinned the copy being
    loaded) and its wait: the wait answers that copy (its bytes stay while pinned)
    rather than "no model named", which left the first call's pin for the session's
    life on a copy the client never got."""
    e = env("4MiB")
    ref = e.add("a", small_model(1))
    e.start()
    with Client(e.socket) as c, grpc.insecure_channel(f"unix:{e.socket}") as ch:
        stub = pb_grpc.ModelsStub(ch)
        first = stub.LoadModel(
            pb.LoadModelRequest(session_id=c.session_id, name="a", no_wait=True), timeout=20.0
        )
        assert models_cli(["models", "--data-dir", str(e.data), "rm", "a"]) == 0
        done = stub.LoadModel(
            pb.LoadModelRequest(
                session_id=c.session_id, name="a", no_pin=True, wait_load_id=first.load_id
            ),
            timeout=20.0,
        )
        assert (done.load_id, done.shm_offset, done.state) == (
            first.load_id,
            first.shm_offset,
            "ready",
        )
        same_tensors(mclient.tensors_from_response(done), ref)
        assert c.release_model("a") == 1  # the removed model's copy goes with its pin
        assert e.stats()["resident"] == []
