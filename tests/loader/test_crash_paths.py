"""The model path through a real ``kvstore serve`` daemon when things go wrong.

A client SIGKILLed mid-load or while it holds a pin, ``kvstore models rm`` of a
model a client is using, a data file corrupted or truncated on disk, two clients
loading the same cold model at once: afterwards the daemon still serves, holds no pin
of the dead, has its arena space back, leaves no file behind and never served wrong
bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from kvstore import Client
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from loader import client as mclient
from loader.arena import EXTENT_ALIGN
from loader.cli import main as models_cli
from loader.errors import (
    ModelBudgetError,
    ModelChecksumError,
    ModelNotFoundError,
    ModelStoreError,
)
from loader.store import ModelStore
from tests.kvstore.conftest import ROOT, DaemonProc
from tests.loader.conftest import flip_byte, same_tensors, small_model, wait_for, write_model

MiB = 1 << 20

CONFIG = """
[server]
lease_timeout_s = 2.0

[[tiers]]
name = "dram"
kind = "dram"
capacity = "32MiB"
options = {{ slab_bytes = "4MiB" }}

[models]
dram_budget = "{budget}"
prefault = false
shm_dir = "{shm}"
"""

Tensors = dict[str, torch.Tensor]


def big_model(seed: int, mib: int = 8) -> Tensors:
    """``mib`` MiB of random bf16 weights in a few tensors (plus a small one)."""
    g = torch.Generator().manual_seed(seed)
    rows = mib * MiB // 2 // 1024 // 4
    out = {
        f"layers.{i}.w": torch.randn(rows, 1024, generator=g).to(torch.bfloat16) for i in range(4)
    }
    out["norm"] = torch.randn(100, generator=g)
    return out


class Env:
    """A daemon over a data dir of our own, its arena in a private folder of /dev/shm."""

    def __init__(self, tmp: Path, shm: Path, budget: str) -> None:
        self.tmp, self.shm, self.budget = tmp, shm, budget
        self.dir = tmp / "d"
        self.dir.mkdir()
        self.data = self.dir / "data"
        self.proc: DaemonProc | None = None

    def add(self, name: str, tensors: Tensors) -> Tensors:
        with ModelStore(self.data) as st:
            st.add(
                name, write_model(self.tmp / f"{name}-{time.monotonic_ns()}.safetensors", tensors)
            )
        return tensors

    def data_path(self, name: str) -> Path:
        with ModelStore(self.data) as st:
            return st.data_path(st.get(name))

    def start(self) -> DaemonProc:
        self.proc = DaemonProc(self.dir, CONFIG.format(budget=self.budget, shm=self.shm)).start()
        return self.proc

    @property
    def socket(self) -> str:
        assert self.proc is not None
        return self.proc.socket

    def rows(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in mclient.list_models(self.socket)}

    def stats(self) -> dict[str, Any]:
        with Client(self.socket) as c:
            out: dict[str, Any] = c.stats()["models"]
        return out

    def files(self) -> set[str]:
        """Everything in the model store's folder (data files, partials)."""
        return {p.name for p in (self.data / "models" / "data").iterdir()}

    def shm_files(self) -> list[str]:
        return sorted(p.name for p in self.shm.iterdir())


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Callable[[str], Env]]:
    shm = Path(tempfile.mkdtemp(prefix="kvs-crash-", dir="/dev/shm"))
    made: list[Env] = []

    def make(budget: str = "12MiB") -> Env:
        e = Env(tmp_path, shm, budget)
        made.append(e)
        return e

    try:
        yield make
        for e in made:
            if e.proc is not None and e.proc.alive():
                assert e.proc.stop() == 0, e.proc.log()
        # The daemon removes its arena when it stops.
        assert list(shm.iterdir()) == []
    finally:
        for e in made:
            if e.proc is not None and e.proc.alive():
                e.proc.kill()
        for p in shm.iterdir():
            p.unlink()
        shm.rmdir()


# A victim engine without torch (starts fast): opens a session with its Watch stream,
# pins NAME with LoadModel, maps its extent and reads it, starts the call that waits
# for the bytes, then SIGKILLs itself.  MODE "mid-load": the kill lands while the load
# is in flight; "pinned": after the model is loaded; "racing": right after sending the
# pinning call, while the daemon is still handling it.
VICTIM = r"""
import mmap, os, signal, sys, time
import grpc
from kvstore._proto import kvstore_pb2 as pb, kvstore_pb2_grpc as pbg

sock, name, mode = sys.argv[1:4]
ch = grpc.insecure_channel("unix:" + sock)
kv, models = pbg.KVStoreStub(ch), pbg.ModelsStub(ch)
s = kv.OpenSession(pb.OpenSessionRequest(client_name="victim", client_pid=os.getpid()))
watch = kv.Watch(pb.WatchRequest(session_id=s.session_id))
next(watch)
req = pb.LoadModelRequest(session_id=s.session_id, name=name, no_wait=True)
if mode == "racing":
    calls = []
    for _ in range(8):  # handled at once: they parse the manifest side by side
        calls.append(models.LoadModel.future(req))
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)
first = models.LoadModel(req)
fd = os.open(first.shm_path, os.O_RDWR)
mm = mmap.mmap(fd, first.nbytes, mmap.MAP_PRIVATE, offset=first.shm_offset)
os.close(fd)
mm.madvise(22)  # MADV_POPULATE_READ
wait = pb.LoadModelRequest(session_id=s.session_id, name=name, no_pin=True)
if mode == "pinned":
    models.LoadModel(wait)
else:
    models.LoadModel.future(wait)
print(first.state, os.getpid(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _victim(socket: str, name: str, mode: str) -> str:
    """Runs the victim; returns the state its first LoadModel answered."""
    state, _ = _victim_pid(socket, name, mode)
    return state


def _victim_pid(socket: str, name: str, mode: str) -> tuple[str, int]:
    """Runs the victim; returns the state its first LoadModel answered and its pid."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-c", VICTIM, socket, name, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == -9, run.stderr
    state, _, pid = run.stdout.strip().partition(" ")
    return state, int(pid or 0)


def test_client_killed_mid_load_and_while_pinned_leaves_nothing(
    env: Callable[[str], Env],
) -> None:
    e = env("12MiB")  # room for one 8 MiB model only
    refs = {"big": e.add("big", big_model(1)), "other": e.add("other", big_model(2))}
    files = e.files()
    e.start()
    assert e.proc is not None
    daemon_pid = e.proc.proc.pid if e.proc.proc else 0
    # Killed while its cold load of "big" is in flight: the load finishes, unpinned.
    state, pid1 = _victim_pid(e.socket, "big", "mid-load")
    assert state == "loading"
    assert wait_for(lambda: e.rows()["big"] == {**e.rows()["big"], "state": "ready", "pins": 0})
    # Its space is reusable: "other" needs it ("big" is evicted).
    with Client(e.socket) as c:
        same_tensors(c.load_model("other"), refs["other"])
        assert e.stats()["resident"] == ["other"]
        assert c.release_model("other") == 1

    # Killed while it holds "big" pinned (loaded, mapped).
    state, pid2 = _victim_pid(e.socket, "big", "pinned")
    assert state == "loading"
    assert wait_for(lambda: e.rows()["big"]["pins"] == 0), e.rows()
    with Client(e.socket) as c:
        same_tensors(c.load_model("other"), refs["other"])
        assert c.release_model("other") == 1
        same_tensors(c.load_model("big"), refs["big"])
        assert e.stats()["resident"] == ["big"]
    assert e.rows()["big"]["pins"] == 0

    # No file left: one arena (the daemon's) in its folder, nothing of the victims
    # in /dev/shm, nothing new in the data dir.
    assert [n.split("-")[2] for n in e.shm_files()] == [str(daemon_pid)]
    assert pid1 and pid2
    assert not [n for n in os.listdir("/dev/shm") if {str(pid1), str(pid2)} & set(n.split("-"))]
    assert e.files() == files


def test_pin_taken_as_its_client_dies_is_dropped(env: Callable[[str], Env]) -> None:
    """The daemon drops a dead session's pins when its Watch stream breaks; a pinning
    call still running then (a first load parses a big manifest, or waits for a free
    worker thread) must not pin for the dead session afterwards."""
    e = env("48MiB")
    # Thousands of tensors (MoE models have tens of thousands): the daemon parses the
    # manifest on the first load of the name, which takes a while.
    many = {f"experts.{i}.w": torch.full((4,), float(i)) for i in range(10000)}
    e.add("many", many)
    e.start()
    _victim(e.socket, "many", "racing")
    # The dead client's calls did reach the model (else this tests nothing) ...
    assert wait_for(lambda: e.rows()["many"]["state"] == "ready"), e.rows()
    time.sleep(0.5)  # ... and the last of them are done
    assert wait_for(lambda: e.rows()["many"]["pins"] == 0, 3.0), e.rows()
    with Client(e.socket) as c:
        got = c.load_model("many")
        assert torch.equal(got["experts.9999.w"], many["experts.9999.w"])
        assert e.rows()["many"]["pins"] == 1
    assert e.rows()["many"]["pins"] == 0


def test_models_rm_of_a_pinned_model(env: Callable[[str], Env]) -> None:
    """``kvstore models rm`` while a client holds the model: the client's bytes stay
    (the daemon frees the extent when the last pin goes), the name is gone for new
    loads, and a model re-added under the name loads with its new bytes."""
    e = env("4MiB")
    old = e.add("a", small_model(1))
    other = e.add("b", small_model(2))
    e.start()
    holder = Client(e.socket, name="holder")
    try:
        held = holder.load_model("a")
        same_tensors(held, old)
        used = e.stats()["dram_used"]
        assert models_cli(["models", "--data-dir", str(e.data), "rm", "a"]) == 0
        assert "a" not in e.rows()
        with pytest.raises(ModelNotFoundError, match="no model named 'a'"):
            mclient.load_model(e.socket, "a", pin=False)
        same_tensors(held, old)  # the pin keeps the extent: never other bytes under the views
        same_tensors(mclient.load_model(e.socket, "b", pin=False), other)

        new = e.add("a", small_model(9))
        with Client(e.socket, name="reader") as c:
            same_tensors(c.load_model("a"), new)
            same_tensors(held, old)
            assert e.rows()["a"]["pins"] == 1
            # The holder lets go of its (removed) model: its extent goes at once (it
            # can never be loaded again), the re-added model's pin is untouched.
            assert holder.release_model("a") == 1
            same_tensors(c.load_model("a"), new)
            assert e.rows()["a"]["pins"] == 2
            assert sorted(e.stats()["resident"]) == ["a", "b"]
            assert c.release_model("a", evict=True) == 2
        assert e.stats()["resident"] == ["b"]
        assert mclient.release_model(e.socket, "b", evict=True) == 0
        stats = e.stats()
        assert stats["resident"] == [] and stats["dram_used"] == 0, stats
        assert used > 0
    finally:
        holder.close()


def test_models_rm_of_a_model_resident_unpinned_frees_it(env: Callable[[str], Env]) -> None:
    e = env("4MiB")
    e.add("a", small_model(1))
    e.start()
    mclient.load_model(e.socket, "a", pin=False)
    assert e.stats()["resident"] == ["a"]
    assert models_cli(["models", "--data-dir", str(e.data), "rm", "a"]) == 0
    # The daemon learns of the removal when it next looks at the store.
    assert [m["name"] for m in mclient.list_models(e.socket)] == []
    stats = e.stats()
    assert stats["resident"] == [] and stats["dram_used"] == 0, stats


def test_corrupt_or_truncated_data_file_on_a_cold_load(env: Callable[[str], Env]) -> None:
    e = env("4MiB")
    ref = e.add("a", small_model(1))
    other = e.add("b", small_model(2))
    e.start()
    with Client(e.socket) as c:
        same_tensors(c.load_model("a"), ref)
        assert c.release_model("a", evict=True) == 1
        assert e.stats()["resident"] == []

        path = e.data_path("a")
        with ModelStore(e.data) as st:
            t = next(t for t in st.get("a").tensors if t.name == "layers.1.mlp.up")
        flip_byte(path, t.offset + t.nbytes // 2)
        with pytest.raises(ModelChecksumError, match="layers.1.mlp.up"):
            c.load_model("a")
        # Nothing of it stays; the daemon serves the other model and says why.
        assert e.rows()["a"]["state"] == "stored" and e.rows()["a"]["pins"] == 0
        same_tensors(c.load_model("b"), other)
        assert e.stats()["resident"] == ["b"]
        flip_byte(path, t.offset + t.nbytes // 2)  # repaired: loads again
        same_tensors(c.load_model("a"), ref)
        assert c.release_model("a", evict=True) == 1

        os.truncate(path, path.stat().st_size - 8192)
        with pytest.raises(ModelStoreError, match="truncated"):
            c.load_model("a")
        with pytest.raises(ModelStoreError, match="truncated"):
            c.swap("b", "a")
        assert e.rows()["b"]["pins"] == 1  # the failed swap kept "b" pinned
        assert e.stats()["resident"] == ["b"]

    # `models rm` + re-add of good bytes: loads.
    assert models_cli(["models", "--data-dir", str(e.data), "rm", "a"]) == 0
    ref2 = e.add("a", small_model(3))
    same_tensors(mclient.load_model(e.socket, "a", pin=False), ref2)
    assert e.stats()["failures"] >= 3  # each failed load is counted


def test_two_clients_load_one_cold_model_at_once(env: Callable[[str], Env]) -> None:
    e = env("12MiB")
    ref = e.add("big", big_model(3))
    e.start()
    go = threading.Barrier(2)
    got: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    clients = [Client(e.socket, name=f"c{i}") for i in range(2)]

    def load(c: Client) -> None:
        try:
            go.wait()
            got.append(c.load_model("big"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(c,)) for c in clients]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert len(got) == 2
        for g in got:
            same_tensors(g, ref)
        stats = e.stats()
        assert stats["loads"] == 1 and stats["resident"] == ["big"], stats
        nbytes = e.rows()["big"]["nbytes"]
        assert nbytes > 8 * MiB
        assert stats["dram_used"] == -(-nbytes // EXTENT_ALIGN) * EXTENT_ALIGN  # one extent
        assert e.rows()["big"]["pins"] == 2
    finally:
        for c in clients:
            c.close()
    assert e.rows()["big"]["pins"] == 0


def test_the_wait_for_a_failed_load_answers_its_error(env: Callable[[str], Env]) -> None:
    """The client's first LoadModel reserves, pins and starts the read; its second
    waits for that load (by its load id).  When the load fails, the second call
    answers that failure, even if the file reads well by then: no second read of the
    model (which would also evict others for it), no tensors on an unpinned extent."""
    e = env("1MiB")
    ref = e.add("a", small_model(1, layers=10))
    e.start()
    path = e.data_path("a")
    good = path.read_bytes()
    path.write_bytes(good[:4096])
    with Client(e.socket) as c, grpc.insecure_channel(f"unix:{e.socket}") as ch:
        stub = pb_grpc.ModelsStub(ch)
        steps = mclient.open_steps("a", c.session_id, True, None)
        first = stub.LoadModel(mclient.advance(steps, None))
        assert first.state == "loading" and first.load_id
        wait = mclient.advance(steps, first)
        assert isinstance(wait, pb.LoadModelRequest) and wait.wait_load_id == first.load_id
        assert wait_for(lambda: e.rows()["a"]["state"] == "stored")  # that load failed
        path.write_bytes(good)
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadModel(wait)
        assert "truncated" in str(err.value.details())
        assert e.stats()["failures"] == 1 and e.stats()["loads"] == 0  # read once
        assert e.rows()["a"]["pins"] == 0
        # A new load reads the repaired file and pins it.
        same_tensors(c.load_model("a"), ref)
        assert e.rows()["a"]["pins"] == 1 and e.stats()["loads"] == 1
        assert c.release_model("a") == 1


def test_a_load_retried_after_a_failure_is_pinned(env: Callable[[str], Env]) -> None:
    """With a daemon that answers no load ids (the client's fallback): when the first
    load fails and the second call loads the model again (the file read well this
    time: a transient error), the pin went with the failed load, and the new load may
    sit in the same extent: the client pins it, or the extent could be reused under
    tensors it believes pinned."""
    e = env("1MiB")  # room for one of these two models
    ref = e.add("a", small_model(1, layers=10))
    e.add("b", small_model(2, layers=10))
    e.start()
    path = e.data_path("a")
    good = path.read_bytes()
    path.write_bytes(good[:4096])
    with Client(e.socket) as c, grpc.insecure_channel(f"unix:{e.socket}") as ch:
        stub = pb_grpc.ModelsStub(ch)
        steps = mclient.open_steps("a", c.session_id, True, None)
        first = stub.LoadModel(mclient.advance(steps, None))
        assert first.state == "loading"
        first.load_id = 0  # as a daemon without load ids answers
        wait = mclient.advance(steps, first)
        assert wait_for(lambda: e.rows()["a"]["state"] == "stored")  # that load failed
        path.write_bytes(good)
        step = mclient.advance(steps, stub.LoadModel(wait))
        while not isinstance(step, mclient.LoadedModel):
            step = mclient.advance(steps, stub.LoadModel(step))
        assert step.info.shm_offset == first.shm_offset  # the same extent, loaded again
        same_tensors(step.tensors, ref)
        assert e.rows()["a"]["pins"] == 1
        with pytest.raises(ModelBudgetError, match="a \\(ready, 1 pins"):
            mclient.load_model(e.socket, "b", pin=False)
        same_tensors(step.tensors, ref)
        assert c.release_model("a") == 1
