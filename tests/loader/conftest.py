"""Fixtures for the model store: safetensors files and a Models-only gRPC server."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from loader import client as mclient
from loader.config import ModelsConfig
from loader.service import ModelsServicer
from loader.store import ModelStore


def small_model(seed: int = 0, layers: int = 3) -> dict[str, torch.Tensor]:
    """A few transformer-shaped bf16 tensors plus odd ones (scalar, empty, int)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {
        "embed.weight": torch.randn(97, 64, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(1.5, dtype=torch.float32),
        "empty": torch.zeros(0, 8, dtype=torch.float16),
        "positions": torch.arange(33, dtype=torch.int64),
    }
    for i in range(layers):
        out[f"layers.{i}.attn.qkv"] = torch.randn(192, 64, generator=g).to(torch.bfloat16)
        out[f"layers.{i}.mlp.up"] = torch.randn(256, 64, generator=g).to(torch.bfloat16)
        out[f"layers.{i}.norm"] = torch.randn(64, generator=g)
    return out


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    """Corrupts one byte of ``path`` in place (XOR ``mask``)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def write_model(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ModelStore]:
    s = ModelStore(tmp_path / "data")
    yield s
    s.close()


@dataclass
class ServerHandle:
    socket: str
    servicer: ModelsServicer
    channel: grpc.Channel
    data_dir: Path


def _start(data_dir: Path, options: ModelsConfig) -> Iterator[ServerHandle]:
    sock_dir = Path(tempfile.mkdtemp(prefix="ldr", dir="/tmp"))
    sock = str(sock_dir / "s.sock")
    servicer = ModelsServicer(data_dir, options.validate())
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: asyncio.Event | None = None

    async def run() -> None:
        nonlocal stop
        stop = asyncio.Event()
        server = grpc.aio.server()
        pb_grpc.add_ModelsServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix://{sock}")
        await server.start()
        started.set()
        await stop.wait()
        await server.stop(0.5)

    th = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    th.start()
    assert started.wait(10)
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        yield ServerHandle(sock, servicer, channel, data_dir)
    finally:
        channel.close()
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        th.join(10)
        loop.close()
        servicer.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerHandle]:
    """A Models server over a fresh data dir (8 MiB budget, small ring)."""
    opts = ModelsConfig(dram_budget=8 << 20, ring_buffers=4, ring_buffer_bytes=64 << 10)
    yield from _start(tmp_path / "data", opts)


def same_tensors(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> None:
    """Asserts ``got`` has exactly ``ref``'s tensors, bit for bit."""
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


def model_pins(socket: str) -> dict[str, int]:
    """Pins per registered model, as the daemon at ``socket`` lists them."""
    return {m["name"]: m["pins"] for m in mclient.list_models(socket)}


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Polls ``cond`` until it holds or ``timeout`` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()
