"""The Models service through the real ``kvstore serve`` daemon.

The session contract: a model pin belongs to an open session (closing the kvstore
``Client`` drops it; a pin for a session that is not open is refused, so none can
outlive its session), and the clients' model verbs recover from a daemon restart as
their KV verbs do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from kvstore import AsyncClient, Client
from kvstore.errors import DaemonUnavailable, KVStoreError
from loader import client as mclient
from loader.errors import ModelUnavailableError
from loader.store import ModelStore
from tests.kvstore.conftest import DaemonProc
from tests.loader.conftest import model_pins, same_tensors, small_model, write_model

CONFIG = """
[server]
lease_timeout_s = 2.0

[[tiers]]
name = "dram"
kind = "dram"
capacity = "32MiB"
options = { slab_bytes = "4MiB" }

[models]
dram_budget = "16MiB"
prefault = false
"""

Models = dict[str, dict[str, torch.Tensor]]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[DaemonProc, Models]]:
    d = tmp_path / "d"
    d.mkdir()
    refs = {"a": small_model(4), "b": small_model(5)}
    with ModelStore(d / "data") as st:
        for name, ref in refs.items():
            st.add(name, write_model(tmp_path / f"{name}.safetensors", ref))
    proc = DaemonProc(d, CONFIG).start()
    try:
        yield proc, refs
    finally:
        if proc.alive():
            assert proc.stop() == 0, proc.log()


def test_models_through_the_daemon(daemon: tuple[DaemonProc, Models]) -> None:
    proc, refs = daemon
    with grpc.insecure_channel(f"unix:{proc.socket}") as ch:
        c = Client(proc.socket, name="loader-test")
        same_tensors(mclient.load_model(ch, "a", session_id=c.session_id), refs["a"])
        # The daemon's Client raises model errors as KVStoreErrors (as the README
        # says of every client error), and a swap from a model it does not hold
        # fails without pinning the new one.
        with pytest.raises(KVStoreError, match="'nope'"):
            c.load_model("nope")
        with pytest.raises(KVStoreError, match="'nope'"):
            c.swap("nope", "a")
        assert mclient.list_models(ch)[0]["pins"] == 1
        from kvstore.cli import format_stats

        text = format_stats(c.stats())  # `kvstore stats` shows the models too
        assert "models DRAM" in text and "resident: a " in text and "loads 1" in text, text
        # No pre-fault in this config: the arena's contiguity is unknown, and not shown.
        assert c.stats()["models"]["arena_runs_per_4mib"] == -1
        assert "contiguous runs" not in text
        st = c.stats()
        st["models"]["arena_runs_per_4mib"] = 7
        assert "arena pages: 7 contiguous runs per 4 MiB" in format_stats(st)
        c.close()
        assert mclient.list_models(ch)[0]["pins"] == 0  # the session's pins went with it


def test_a_pin_needs_an_open_session(daemon: tuple[DaemonProc, Models]) -> None:
    """A pin taken for a session that ended would never be released: refused."""
    proc, refs = daemon
    with Client(proc.socket) as c:
        gone = c.session_id
    with Client(proc.socket) as c:
        for call in (
            lambda: mclient.load_model(proc.socket, "a", session_id=gone),
            lambda: mclient.swap_models(proc.socket, "", "a", session_id=gone),
            lambda: mclient.load_model(proc.socket, "a", session_id=c.session_id + 1000),
        ):
            with pytest.raises(KVStoreError, match="unknown session") as err:
                call()
            assert err.value.session_lost
        assert model_pins(proc.socket) == {"a": 0, "b": 0}
        # Unpinned loads need no session; anonymous pins (session 0) are the caller's.
        same_tensors(mclient.load_model(proc.socket, "a", session_id=gone, pin=False), refs["a"])
        same_tensors(mclient.load_model(proc.socket, "b"), refs["b"])
        assert model_pins(proc.socket) == {"a": 0, "b": 1}
        assert mclient.release_model(proc.socket, "b") == 1
        # The open session's own calls still work.
        same_tensors(c.load_model("a"), refs["a"])
        assert model_pins(proc.socket) == {"a": 1, "b": 0}
    assert model_pins(proc.socket) == {"a": 0, "b": 0}


def test_client_model_verbs_across_a_daemon_restart(daemon: tuple[DaemonProc, Models]) -> None:
    proc, refs = daemon
    with Client(proc.socket, timeout=20.0) as c:
        same_tensors(c.load_model("a"), refs["a"])
        old = c.session_id
        proc.stop()
        proc.start()
        # The old session and its pin ended with the daemon: the call reconnects and
        # pins in the new session; a swap from "a" (no longer held) loads "b".
        same_tensors(c.swap("a", "b"), refs["b"])
        assert c.session_id != old
        assert model_pins(proc.socket) == {"a": 0, "b": 1}
        same_tensors(c.load_model("a"), refs["a"])
        assert c.release_model("a") == 1
        assert [m["name"] for m in c.models()] == ["a", "b"]
    assert model_pins(proc.socket) == {"a": 0, "b": 0}


def test_client_model_verbs_with_the_daemon_gone(daemon: tuple[DaemonProc, Models]) -> None:
    proc, _ = daemon
    c = Client(proc.socket, timeout=1.0)
    proc.stop()
    with pytest.raises(DaemonUnavailable) as err:
        c.load_model("a")
    assert isinstance(err.value, ModelUnavailableError)
    with pytest.raises(DaemonUnavailable, match="client is closed"):
        c.models()  # as the KV verbs: closed until reconnect() succeeds
    c.close()


def test_async_model_verbs_across_a_daemon_restart(daemon: tuple[DaemonProc, Models]) -> None:
    proc, refs = daemon

    async def go() -> None:
        c = await AsyncClient.connect(proc.socket, timeout=20.0)
        try:
            same_tensors(await c.load_model("a"), refs["a"])
            old = c.session_id
            await asyncio.to_thread(proc.stop)
            await asyncio.to_thread(proc.start)
            # Two calls at once find the session lost: one reconnect serves both.
            got = await asyncio.gather(c.swap("a", "b"), c.load_model("a"))
            same_tensors(got[0], refs["b"])
            same_tensors(got[1], refs["a"])
            assert c.session_id != old
            assert model_pins(proc.socket) == {"a": 1, "b": 1}
        finally:
            await c.close()
        assert model_pins(proc.socket) == {"a": 0, "b": 0}

        c = await AsyncClient.connect(proc.socket, timeout=1.0)
        await asyncio.to_thread(proc.stop)
        with pytest.raises(ModelUnavailableError):
            await c.models()
        await c.close()

    asyncio.run(go())
