"""A real daemon in a subprocess, for tests that go over the wire."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]


class DaemonProc:
    """Runs ``python -m kvstore serve`` with a TOML config in a temp folder."""

    def __init__(self, tmp: Path, config: str = "", args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.socket = str(tmp / "kvstore.sock")
        self.config_path = tmp / "kvstore.toml"
        self.config_path.write_text(config)
        self.args = args
        self.log_path = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> DaemonProc:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "kvstore", "serve", "--config", str(self.config_path)]
        cmd += ["--socket", self.socket, "--data-dir", str(self.tmp / "data"), *self.args]
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited early:\n{self.log()}")
            if os.path.exists(self.socket):
                with grpc.insecure_channel(f"unix:{self.socket}") as ch:
                    try:
                        grpc.channel_ready_future(ch).result(timeout=1.0)
                        return self
                    except grpc.FutureTimeoutError:
                        pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[type[DaemonProc]]:
    started: list[DaemonProc] = []

    class _Factory(DaemonProc):
        def __init__(self, config: str = "", args: tuple[str, ...] = (), sub: str = "d") -> None:
            d = tmp_path / sub
            d.mkdir(exist_ok=True)
            super().__init__(d, config, args)
            started.append(self)

    yield _Factory
    for d in started:
        if d.alive():
            d.stop()


SMALL = """
[server]
lease_timeout_s = 2.0

[[tiers]]
name = "dram"
kind = "dram"
capacity = "64MiB"
options = { slab_bytes = "4MiB" }
"""


@pytest.fixture
def daemon(make_daemon: type[DaemonProc]) -> DaemonProc:
    return make_daemon(SMALL).start()
