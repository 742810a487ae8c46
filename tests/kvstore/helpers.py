"""Deterministic block contents and client subprocesses for daemon tests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

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
