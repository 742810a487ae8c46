"""The weight benchmarks' limits leave nothing behind, and a quick run keeps the
committed chart (no benchmark runs here: the read pipelines are made small)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench import weight_limits as lim
from bench import weight_swap as ws
from loader.pipeline import ReadPipeline

ROOT = Path(__file__).resolve().parents[2]


def _mapping_of(buf: memoryview) -> str:
    """The /proc/self/maps path of the mapping holding ``buf``."""
    import ctypes

    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))  # type: ignore[arg-type]
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= addr < hi:
            return fields[5] if len(fields) > 5 else ""
    raise AssertionError("mapping not found")


def _shm_names() -> set[str]:
    return set(os.listdir(lim.SHM_DIR))


def test_raw_reader_shm_buffer_has_no_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small pipelines instead of the 512 MiB ring and 64 threads of a real run.
    monkeypatch.setattr(lim, "raw_pipeline", lambda: ReadPipeline(2, 2, 1 << 20))
    monkeypatch.setattr(lim, "ReadPipeline", lambda *a, **k: ReadPipeline(2, 1, 1 << 20))
    nbytes = 4 << 20
    src = tmp_path / "data.bin"
    payload = os.urandom(nbytes)
    src.write_bytes(payload)
    before = _shm_names()
    raw = lim.RawReader(nbytes)
    try:
        # Nothing named in /dev/shm while it lives, so a SIGKILL, an exception or a
        # failed daemon start cannot leave the buffer behind.
        assert not {n for n in _shm_names() - before if "kvstore-bench-raw" in n}
        # Still a /dev/shm (tmpfs) file mapped shared: the arena's kind of memory.
        view = memoryview(raw._shm)
        try:
            where = _mapping_of(view)
        finally:
            view.release()
        assert where.startswith(lim.SHM_DIR + "/") and where.endswith("(deleted)"), where
        assert raw.read_one("shm", src, nbytes) > 0
        assert raw._shm[:nbytes] == payload
    finally:
        raw.close()
    assert not {n for n in _shm_names() - before if "kvstore-bench-raw" in n}


def test_shm_buffer_without_o_tmpfile_is_unlinked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_tmpfile(path: str, flags: int, *a: int) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(95, "Operation not supported")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_tmpfile)
    buf = lim.shm_buffer(1 << 20, str(tmp_path))
    try:
        assert list(tmp_path.iterdir()) == []
        buf[:5] = b"hello"
        assert buf[:5] == b"hello"
    finally:
        buf.close()


def test_quick_run_does_not_default_to_the_committed_chart() -> None:
    p = ws.parser()
    committed = ws.CHARTS / "weight_swap.png"
    assert ws.chart_path(p.parse_args([])) == str(committed)
    quick = Path(ws.chart_path(p.parse_args(["--quick"])))
    assert quick != committed and quick.is_relative_to(ROOT / "bench" / "out")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(quick)], cwd=ROOT)
    assert ignored.returncode == 0, f"{quick} is not ignored by git"
    assert ws.chart_path(p.parse_args(["--quick", "--chart", ""])) == ""
    assert ws.chart_path(p.parse_args(["--quick", "--chart", "x.png"])) == "x.png"
    assert "--quick bench/out/weight_swap_quick.png" in " ".join(p.format_help().split())


def test_daemon_leaves_no_socket_folder(tmp_path: Path) -> None:
    with lim.daemon(tmp_path / "data", 64 << 20, ["--no-prefault"]) as sock:
        assert os.path.exists(sock)
        folder = Path(sock).parent
    assert not folder.exists()
