"""NVMe tier start-up on a damaged index, an empty index and a full disk.

A damaged index used to kill the process with SIGBUS: the tests that open one do it
in a child process, so that a regression fails the test instead of the test run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.tiers.nvme import NvmeDirError
from kvstore.tiers.nvme_index import Index, NvmeIndexError
from kvstore.tiers.nvme_index_check import IndexDamaged, check_index
from tests.conftest import mounted_tmpfs

from .nvme_util import entry, key_of, open_tier, put, read

KB = 1024
REPO = Path(__file__).resolve().parents[3]

# Opens the tier, reads every recovered block back; one JSON line on stdout.
_OPEN = r"""
import json, logging, sys
from pathlib import Path
from tests.kvstore.tiers.nvme_util import data_for, entry, open_tier, read
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
t = open_tier(Path(sys.argv[1]))
ok = wrong = failed = 0
for b in t.recover():
    try:
        got = read(t, b.handle, entry(b.key, b.nbytes, b.checksum))
    except Exception:
        failed += 1
        continue
    if got == data_for(b.key, b.nbytes):
        ok += 1
    else:
        wrong += 1
st = t.stats()
t.close()
print(json.dumps(dict(ok=ok, wrong=wrong, failed=failed, segments=st["segments"])))
"""


def _make(path: Path, n: int) -> None:
    t = open_tier(path, segment_bytes=1 << 20, staging_bytes=4 << 20)
    try:
        for i in range(n):
            put(t, key_of(i), 4 * KB)
        t.flush()
    finally:
        t.close()


def _open_in_child(path: Path) -> tuple[dict[str, Any], str]:
    r = subprocess.run(
        [sys.executable, "-c", _OPEN, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"rc={r.returncode} (-7 is SIGBUS)\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def _data(path: Path) -> Path:
    return path / "index" / "data.mdb"


def _assert_set_aside(path: Path, res: dict[str, Any], err: str) -> None:
    aside = list((path / "index").glob("data.mdb.damaged-*"))
    assert len(aside) == 1, list((path / "index").iterdir())
    assert "is damaged" in err and str(aside[0]) in err, err
    assert "starting the tier empty" in err
    assert res == dict(ok=0, wrong=0, failed=0, segments=0)  # every segment reclaimed
    assert not list((path / "segments").glob("seg-*.dat"))


# ---------------------------------------------------------------- damaged index


def test_truncated_index_is_found_before_mapping_and_set_aside(tmp_path: Path) -> None:
    p = tmp_path / "t"
    _make(p, 400)
    size = _data(p).stat().st_size
    os.truncate(_data(p), size // 2)
    # Caught from the meta pages alone (no page past the end is touched here).
    with pytest.raises(IndexDamaged, match="pages missing"):
        check_index(p / "index", walk=False)
    res, err = _open_in_child(p)
    _assert_set_aside(p, res, err)
    assert "SIGBUS" in err and "pages missing" in err
    res, err = _open_in_child(p)  # the fresh index opens quietly next time
    assert res["segments"] == 0 and "damaged" not in err


def test_garbage_in_index_pages_never_kills_or_serves_wrong_bytes(tmp_path: Path) -> None:
    p = tmp_path / "t"
    _make(p, 1500)
    size = _data(p).stat().st_size
    fd = os.open(_data(p), os.O_RDWR)
    try:  # 64 random bytes every 7th page from page 3 on (the file size is unchanged)
        rng = random.Random(7)
        for pg in range(3, size // 4096, 7):
            os.pwrite(fd, rng.randbytes(64), pg * 4096)
    finally:
        os.close(fd)
    assert _data(p).stat().st_size == size
    res, err = _open_in_child(p)
    assert res["wrong"] == 0
    _assert_set_aside(p, res, err)


def test_garbage_header_is_set_aside_with_advice(tmp_path: Path) -> None:
    p = tmp_path / "t"
    _make(p, 50)
    with open(_data(p), "r+b") as f:
        f.write(random.Random(1).randbytes(8192))
    # Opened without the check, the error says what to do.
    with pytest.raises(NvmeIndexError, match=r"data\.mdb aside \(rename it\) and restart"):
        Index(p / "index", 1 << 30)
    res, err = _open_in_child(p)
    _assert_set_aside(p, res, err)
    assert "LMDB cannot open it" in err


def test_a_healthy_index_passes_the_check(tmp_path: Path) -> None:
    p = tmp_path / "t"
    _make(p, 300)
    chk = check_index(p / "index")
    assert chk.walked and chk.entries == 300
    res, err = _open_in_child(p)
    assert res["ok"] == 300 and res["wrong"] == res["failed"] == 0
    assert "damaged" not in err and not list((p / "index").glob("*.damaged-*"))


def test_empty_index_with_segments_warns_before_reclaiming(tmp_path: Path, caplog: Any) -> None:
    p = tmp_path / "t"
    _make(p, 300)
    segs = list((p / "segments").glob("seg-*.dat"))
    held = sum(f.stat().st_size for f in segs)
    os.truncate(_data(p), 0)
    with caplog.at_level(logging.WARNING, logger="kvstore.tiers.nvme"):
        t = open_tier(p)
    try:
        assert t.stats()["orphan_bytes_reclaimed"] == held
    finally:
        t.close()
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "is new or empty" in m and f"{len(segs)} segment files" in m and "deleting them" in m
        for m in msgs
    ), msgs


# ---------------------------------------------------------------- disk full at start


def test_injected_disk_full_at_start_degrades_instead_of_failing(
    tmp_path: Path, monkeypatch: Any, caplog: Any
) -> None:
    p = tmp_path / "t"
    t = open_tier(p)
    h, e, data = put(t, key_of(1), 64 * KB)
    t.close()
    real = Path.write_bytes

    def full(self: Path, b: Any) -> int:
        if self.name == ".write-probe":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, b)

    monkeypatch.setattr(Path, "write_bytes", full)
    with caplog.at_level(logging.WARNING, logger="kvstore.tiers.nvme"):
        t = open_tier(p)
    try:
        assert t.degraded and "disk full at start" in t.degraded
        assert f"{p} is full" in caplog.text and "free" in caplog.text
        (rb,) = t.recover()
        assert read(t, rb.handle, entry(rb.key, rb.nbytes, rb.checksum)) == data
        assert t.reserve(64 * KB, entry(key_of(2), 64 * KB)) is None
    finally:
        t.close()

    def eacces(self: Path, b: Any) -> int:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(Path, "write_bytes", eacces)
    with pytest.raises(NvmeDirError, match="is not writable: .*Permission denied"):
        open_tier(p)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "mnt", "8m") as mnt:
        yield mnt


def test_real_disk_full_at_start_on_tmpfs(small_tmpfs: Path, caplog: Any) -> None:
    p = small_tmpfs / "t"
    with caplog.at_level(logging.WARNING, logger="kvstore.tiers.nvme"):
        t = open_tier(p, capacity=1 << 30)
    assert "capacity 1.0 GiB exceeds what" in caplog.text and "free +" in caplog.text
    blocks = [put(t, key_of(i), 256 * KB) for i in range(4)]
    t.flush()
    t.close()
    fd = os.open(small_tmpfs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:  # fill the disk to the last byte
        for chunk in (64 * KB, 4 * KB, 1):
            with pytest.raises(OSError) as exc_info:
                while True:
                    os.write(fd, b"\0" * chunk)
            assert exc_info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvstore.tiers.nvme"):
        t = open_tier(p, capacity=1 << 30)  # used to fail: "is not writable: [Errno 28]"
    try:
        assert t.degraded and "No space left on device" in t.degraded
        assert f"starts degraded: {p} is full" in caplog.text
        found = {rb.key: rb for rb in t.recover()}
        assert len(found) == len(blocks)
        for _, e, data in blocks:
            rb = found[e.key]
            assert read(t, rb.handle, entry(rb.key, rb.nbytes, rb.checksum)) == data
        assert t.reserve(256 * KB, entry(key_of(99), 256 * KB)) is None
    finally:
        t.close()
    # Space freed: the next start is healthy again.
    (small_tmpfs / "filler").unlink()
    t = open_tier(p, capacity=1 << 20)
    try:
        assert not t.degraded
    finally:
        t.close()
    # Other probe errors stay fatal, with their own message.
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(NvmeDirError, match="is not writable: .*Read-only file system"):
        open_tier(p)
