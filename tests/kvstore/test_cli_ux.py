"""The command line's small promises: flags its help names exist, output and errors are clean."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.cli import CONFIG_HELP, LIB_LOGGERS, _serve_parser, main, setup_logging
from kvstore.config import config_from_dict
from kvstore.daemon import DaemonError, build_tiers
from tests.kvstore.helpers import ROOT


def test_flags_named_in_serve_help_exist() -> None:
    sub = argparse.ArgumentParser().add_subparsers()
    _serve_parser(sub)
    serve = sub.choices["serve"]
    flags = {s for a in serve._actions for s in a.option_strings}
    named = set(re.findall(r"(--[a-z][a-z-]+)", CONFIG_HELP))
    assert "--list-kinds" in named
    assert named <= flags, named - flags


def test_list_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--list-kinds"]) == 0
    lines = capsys.readouterr().out.splitlines()
    kinds = [ln.split()[0] for ln in lines if ln.startswith("  ")]
    assert kinds == ["cxl", "dram", "gpu", "nvme"]  # not the trace-replay-only null tier
    assert any(ln.startswith("eviction policies: ") and "lru" in ln for ln in lines)
    assert any(ln.startswith("admission policies: ") and "always" in ln for ln in lines)


def _kvstore(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore", *argv], text=True, cwd=ROOT, timeout=60, **kw
    )


def test_closed_stdout_exits_quietly() -> None:
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written: `kvstore ... | head -0`
    try:
        out = _kvstore("serve", "--list-kinds", stdout=w, stderr=subprocess.PIPE)
    finally:
        os.close(w)
    assert out.stderr == "" and out.returncode == 1


def test_metrics_port_in_use_names_the_setting(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _kvstore(
            "serve", "--socket", str(tmp_path / "s.sock"), "--dram", "16MiB", "--no-nvme",
            "--data-dir", str(tmp_path / "data"), "--metrics-port", str(port),
            capture_output=True,
        )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert f"127.0.0.1:{port}" in out.stderr and "metrics_port" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "s.sock").exists()  # the socket it had bound is cleaned up


def _dram_only(tmp_path: Path, capacity: str) -> Any:
    return config_from_dict(
        {
            "data_dir": str(tmp_path),
            "tiers": [{"name": "fast", "kind": "dram", "capacity": capacity}],
        }
    )


def test_dram_larger_than_the_machine_names_the_tier(tmp_path: Path) -> None:
    with pytest.raises(DaemonError, match=r"tier 'fast' \(dram\): cannot allocate 102,400.0 GiB"):
        build_tiers(_dram_only(tmp_path, "100TiB"))


def test_dram_above_available_memory_is_refused_when_pre_faulted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pre-faulting more than is available would push other processes to swap or the
    OOM killer, slowly and silently: refused, unless the tier is not pre-faulted."""
    import psutil

    real = psutil.virtual_memory()
    tight = real._replace(available=8 << 20)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: tight)
    with pytest.raises(DaemonError) as exc:
        build_tiers(_dram_only(tmp_path, "16MiB"))
    assert "cannot allocate 16 MiB (more than is available now" in str(exc.value)
    assert "8 MiB of memory available" in str(exc.value)
    cfg = _dram_only(tmp_path, "16MiB")
    cfg.tiers[0].options["prefault"] = False
    for t in build_tiers(cfg):
        t.close()


def test_dram_allocation_failure_names_the_tier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvstore.tiers import dram

    def no_memory(*a: object, **kw: object) -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(dram.SharedArena, "__init__", no_memory)
    with pytest.raises(DaemonError) as exc:
        build_tiers(_dram_only(tmp_path, "16MiB"))
    msg = str(exc.value)
    assert "tier 'fast' (dram): cannot allocate 16 MiB (Cannot allocate memory)" in msg
    assert "of memory available" in msg


@pytest.fixture
def lib_loggers() -> Iterator[None]:
    saved = {n: logging.getLogger(n).level for n in LIB_LOGGERS}
    yield
    for n, level in saved.items():
        logging.getLogger(n).setLevel(level)


@pytest.mark.usefixtures("lib_loggers")
def test_third_party_loggers_stay_quiet_unless_asked() -> None:
    def levels() -> set[int]:
        return {logging.getLogger(n).level for n in LIB_LOGGERS}

    setup_logging("debug")
    assert levels() == {logging.WARNING}
    assert not logging.getLogger("grpc._cython.cygrpc").isEnabledFor(logging.DEBUG)
    setup_logging("error")
    assert levels() == {logging.ERROR}
    setup_logging("debug", "debug")
    assert levels() == {logging.DEBUG}
