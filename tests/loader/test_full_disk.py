"""LMDB on a full filesystem: a clear error, never a SIGBUS (LMDB writes its lock file
through a shared mapping; on a full disk the first store to it killed the process)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore import Client
from kvstore.errors import KVStoreError
from tests.conftest import mounted_tmpfs
from tests.kvstore.conftest import SMALL, DaemonProc

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "full", "2m") as mnt:
        with open(mnt / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (64 << 10))
                    f.flush()
            except OSError:
                pass
        yield mnt


def _child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_new_model_store_on_a_full_disk_is_an_error(full_tmpfs: Path) -> None:
    code = (
        "import sys\nfrom loader.store import ModelStore\nfrom loader.errors import ModelStoreError\n"
        "try:\n    ModelStore(sys.argv[1])\nexcept ModelStoreError as e:\n    print('ERR', e)\n"
    )
    r = _child(code, str(full_tmpfs / "data"))
    assert r.returncode == 0, f"rc {r.returncode} (-7: SIGBUS): {r.stderr}"
    assert "ERR cannot open the model store's index" in r.stdout
    assert "No space left" in r.stdout


def test_new_nvme_index_on_a_full_disk_is_an_error(full_tmpfs: Path) -> None:
    code = (
        "import sys\nfrom pathlib import Path\nfrom kvstore.tiers.nvme_index import Index\n"
        "try:\n    Index(Path(sys.argv[1]), 1 << 30)\nexcept Exception as e:\n"
        "    print('ERR', type(e).__name__, e)\n"
    )
    (full_tmpfs / "idx").mkdir()
    r = _child(code, str(full_tmpfs / "idx" / "index"))
    assert r.returncode == 0, f"rc {r.returncode} (-7: SIGBUS): {r.stderr}"
    assert "ERR NvmeIndexError cannot open the NVMe index" in r.stdout


def test_daemon_on_a_full_disk_serves_kv_and_says_why_models_are_unavailable(
    full_tmpfs: Path, tmp_path: Path
) -> None:
    d = DaemonProc(tmp_path, SMALL, ("--data-dir", str(full_tmpfs / "data"))).start()
    try:
        with Client(d.socket) as c:
            st = c.stats()
            assert st["sessions"]["open"] == 1
            with pytest.raises(KVStoreError, match="model weights are unavailable.*No space left"):
                c.load_model("m")
        assert "model weights unavailable" in d.log()
    finally:
        assert d.stop() == 0
    assert os.path.exists(full_tmpfs / "filler")
