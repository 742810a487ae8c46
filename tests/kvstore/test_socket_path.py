"""``--socket`` never removes anything but a stale socket of a dead daemon."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kvstore.helpers import ROOT


def _serve(sock: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kvstore", "serve", "--socket", str(sock), "--dram", "16MiB"]
    cmd += ["--no-nvme", "--data-dir", str(tmp / "data")]
    # A reverted fix would serve (and then delete the file): the timeout fails the test.
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("what", ["file", "dir", "dangling-link"])
def test_existing_non_socket_path_is_refused_and_kept(tmp_path: Path, what: str) -> None:
    path = tmp_path / "notes.txt"
    if what == "file":
        path.write_text("notes\n")
    elif what == "dir":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "nowhere")
    out = _serve(path, tmp_path)
    assert out.returncode == 2, out.stderr
    assert str(path) in out.stderr and "not a socket" in out.stderr
    assert "Traceback" not in out.stderr
    if what == "file":
        assert path.is_file() and path.read_text() == "notes\n"
    elif what == "dir":
        assert path.is_dir()
    else:
        assert path.is_symlink()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    from kvstore.daemon import _prepare_socket

    sock = tmp_path / "kvstore.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))
    s.close()  # bound, never listening: what a killed daemon leaves behind
    assert sock.is_socket()
    _prepare_socket(sock)
    assert not sock.exists()
