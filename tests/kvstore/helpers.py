"""Deterministic block contents, client subprocesses and in-process daemons for tests."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from kvstore.config import Config, ServerConfig, TierConfig
from kvstore.keys import Namespace

ROOT = Path(__file__).resolve().parents[2]

NS = Namespace("test-model", num_layers=2, num_kv_heads=2, head_dim=32, block_tokens=16)


def content(key: bytes, nbytes: int) -> np.ndarray:
    """Bytes every writer of ``key`` writes: a function of the key alone."""
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def blocks_for(ns: Namespace, tokens: np.ndarray) -> list[np.ndarray]:
    return [content(k, ns.block_nbytes) for k in ns.block_keys(tokens)]


def run_client(code: str, timeout: float = 60.0, **kw: object) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter with the project importable."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,  # type: ignore[arg-type]
    )


def popen_client(code: str, stdin: bool = False) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def small_config(tmp_path: Path, lease_s: float = 60.0, tcp: str = "") -> Config:
    """A daemon config with a 4 MiB DRAM tier, its socket and data under ``tmp_path``
    (for :class:`kvstore.daemon.Daemon` run in the test's own event loop)."""
    return Config(
        server=ServerConfig(socket=str(tmp_path / "kv.sock"), tcp=tcp, lease_timeout_s=lease_s),
        tiers=[TierConfig("dram", "dram", 4 << 20, options={"slab_bytes": "1MiB"})],
        data_dir=str(tmp_path / "data"),
    ).validate()


async def until(pred: object, timeout: float = 10.0) -> bool:
    """Polls ``pred()`` on the running event loop until true (True) or ``timeout`` (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if pred():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False
