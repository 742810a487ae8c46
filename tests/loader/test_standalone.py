"""``python -m loader.service``: a Models-only daemon in its own process."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loader import client
from loader.errors import ModelChecksumError
from loader.store import ModelStore
from tests.loader.conftest import small_model, write_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder for a Unix socket: short (the path limit is 107 bytes), removed after."""
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        yield Path(d)


def test_daemon_process_serves_and_client_maps(tmp_path: Path, short_dir: Path) -> None:
    ref = small_model(3)
    with ModelStore(tmp_path / "d") as st:
        st.add("m", write_model(tmp_path / "m.safetensors", ref))
    sock = str(short_dir / "m.sock")
    cmd = [sys.executable, "-m", "loader.service", "--data-dir", str(tmp_path / "d")]
    cmd += ["--socket", sock, "--dram-budget", "16MiB", "--wait-prefault"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        got = client.load_model(sock, "m", populate=True)
        for k, v in ref.items():
            assert torch.equal(got[k], v), k
        assert client.list_models(sock)[0]["state"] == "ready"
    finally:
        proc.terminate()
        rc = proc.wait(20)
        assert proc.stdout is not None
        proc.stdout.close()
    assert rc == 0
    # The arena file is gone with the daemon; the client's views stay valid (mapped).
    assert torch.equal(got["embed.weight"], ref["embed.weight"])
    assert not list(Path("/dev/shm").glob(f"kvstore-models-{proc.pid}-*"))


def test_no_verify_flag_skips_checksums_and_nothing_else(tmp_path: Path, short_dir: Path) -> None:
    """``--no-verify`` (a diagnosis switch for bench.load_gap) really skips the check:
    a flipped byte fails the load by default and passes with the flag."""
    ref = small_model(4)
    with ModelStore(tmp_path / "d") as st:
        m = st.add("m", write_model(tmp_path / "m.safetensors", ref))
        t = next(t for t in m.tensors if t.name == "layers.1.mlp.up")
        with open(st.data_path(m), "r+b") as f:
            f.seek(t.offset)
            b = f.read(1)
            f.seek(t.offset)
            f.write(bytes([b[0] ^ 0x01]))
    for flags, ok in (([], False), (["--no-verify"], True)):
        sock = str(short_dir / f"m{len(flags)}.sock")
        cmd = [sys.executable, "-m", "loader.service", "--data-dir", str(tmp_path / "d")]
        cmd += ["--socket", sock, "--dram-budget", "16MiB", "--wait-prefault", *flags]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
            if ok:
                got = client.load_model(sock, "m")
                assert not torch.equal(got["layers.1.mlp.up"], ref["layers.1.mlp.up"])
                assert torch.equal(got["layers.0.mlp.up"], ref["layers.0.mlp.up"])
                del got
            else:
                with pytest.raises(ModelChecksumError, match="layers.1.mlp.up"):
                    client.load_model(sock, "m")
        finally:
            proc.terminate()
            assert proc.wait(20) == 0
            assert proc.stdout is not None
            proc.stdout.close()
