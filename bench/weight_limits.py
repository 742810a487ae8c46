"""What a model load is measured against, for ``bench.weight_swap`` and ``bench.load_gap``:
the page-cache drop, the disk's raw direct read into several kinds of memory, memcpy,
and a Models daemon in its own process."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from loader.arena import ARENA_SOAK_ORDER
from loader.physmem import MADV_POPULATE_WRITE, one_cpu, soak_limit, soaked_small_blocks
from loader.pipeline import HostSink, NullSink, ReadPipeline

OPTIONS: dict[str, Any] = {"settle_s": 2.0, "global_drop": True}
"""Set by the benchmarks' command lines: idle seconds after a drop, global drop or not."""


# ---------------------------------------------------------------------- limits
def drop_caches(files: list[Path]) -> str:
    """Drops the page cache; returns '' or the reason it could not (then fadvise)."""
    os.sync()
    if not OPTIONS["global_drop"]:
        reason = "--no-drop-caches: used fadvise(DONTNEED) on the benchmark's files"
    else:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            # Every process on the box re-reads what it needs right after a global
            # drop, and the disk is throttled: idle a while so each method starts alike.
            time.sleep(OPTIONS["settle_s"])
            return ""
        except OSError as exc:
            reason = f"/proc/sys/vm/drop_caches: {exc.strerror}; used fadvise(DONTNEED) per file"
    time.sleep(OPTIONS["settle_s"])
    for p in files:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return reason


def raw_pipeline() -> ReadPipeline:
    """64 x 8 MiB O_DIRECT reads in flight into a reused (pre-faulted) 512 MiB ring:
    the deepest pattern we measured, as deep as Run:ai's io_uring queue (64)."""
    pipe = ReadPipeline(64, 64, 8 << 20)
    pipe.ring.populate()
    return pipe


SHM_DIR = "/dev/shm"


def shm_buffer(nbytes: int, shm_dir: str = SHM_DIR) -> mmap.mmap:
    """A shared mapping of a tmpfs file in ``shm_dir`` that has no name.

    The same memory as the daemon's arena (a ``/dev/shm`` file mapped shared), but
    nothing a killed or failed run could leave behind: the file is created unnamed
    (``O_TMPFILE``) and goes when its last mapping does, however the process ends.
    A tmpfs without ``O_TMPFILE`` gets a random name, unlinked right after creation.
    """
    try:
        fd = os.open(shm_dir, os.O_RDWR | os.O_TMPFILE, 0o600)
    except OSError:
        fd, name = tempfile.mkstemp(prefix="kvstore-bench-raw-", dir=shm_dir)
        os.unlink(name)
    try:
        os.ftruncate(fd, nbytes)
        return mmap.mmap(fd, nbytes)  # the mapping keeps the file (and its pages)
    finally:
        os.close(fd)


class RawReader:
    """The disk's direct sequential read of a file: no checksum, 64 x 8 MiB in flight.

    Three destinations, because they do not read equally fast here: a reused 512 MiB
    ring, a pre-faulted anonymous buffer of the file's size, and a pre-faulted
    shared-memory buffer of the file's size (what the loader reads into); plus the
    ring from a fresh process.  The round's limit is the fastest of them.
    """

    def __init__(self, nbytes: int) -> None:
        # Faulted in while the kernel's scattered free pages are held aside, as the
        # daemon's arena is: the limit is the disk's, not a fragmented buffer's.
        with one_cpu(), soaked_small_blocks(soak_limit(2 * nbytes), ARENA_SOAK_ORDER):
            self.pipes = [raw_pipeline(), ReadPipeline(64, 1, 8 << 20, max_inflight=64)]
            self._anon = mmap.mmap(-1, nbytes)
            self._anon.madvise(MADV_POPULATE_WRITE)
            self._shm = shm_buffer(nbytes)
            self._shm.madvise(MADV_POPULATE_WRITE)
        self.samples: dict[str, list[float]] = {}

    def read_one(self, kind: str, path: Path, nbytes: int) -> float:
        """One raw read of ``path`` into destination ``kind`` (ring, anon or shm)."""
        if kind == "ring":
            st = self.pipes[0].read(path, nbytes, NullSink(), None)
        else:
            buf = memoryview(self._anon if kind == "anon" else self._shm)
            try:
                st = self.pipes[1].read(path, nbytes, HostSink(buf), None)
            finally:
                buf.release()
        self.direct = st.direct
        self.samples.setdefault(kind, []).append(st.seconds)
        return st.seconds

    def read_fresh(self, path: Path, nbytes: int) -> float:
        out = subprocess.run(
            [sys.executable, "-m", "bench.weight_swap", "--raw-read", str(path), str(nbytes)]
            + ["--settle", str(OPTIONS["settle_s"])],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        s = float(out.stdout.split()[0])
        self.samples.setdefault("ring, fresh process", []).append(s)
        return s

    def close(self) -> None:
        for p in self.pipes:
            p.close()
        self._anon.close()
        self._shm.close()


def memcpy_gbps(nbytes: int = 256 << 20) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


# ---------------------------------------------------------------------- daemon
@contextlib.contextmanager
def daemon(
    data_dir: Path, budget: int, extra: Sequence[str] = (), info: dict[str, Any] | None = None
) -> Iterator[str]:
    """A Models daemon in its own process, ready once its arena is pre-faulted; yields
    its socket.  ``info`` (if given) gets ``arena_runs_per_4mib`` from its ready line:
    the arena's physically contiguous runs per 4 MiB (-1: unknown, not root), and
    ``prefault_retries``: how often a scattered arena was faulted in again."""
    sock_dir = Path(tempfile.mkdtemp(prefix="kvws", dir="/tmp"))  # short: socket path limit
    sock = str(sock_dir / "models.sock")
    cmd = [sys.executable, "-m", "loader.service", "--data-dir", str(data_dir)]
    cmd += ["--socket", sock, "--dram-budget", str(budget), "--wait-prefault", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"models daemon did not start (exit {proc.wait()})")
        if info is not None:
            fields = dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
            info["arena_runs_per_4mib"] = int(fields.get("arena_runs_per_4mib", -1))
            info["prefault_retries"] = int(fields.get("prefault_retries", 0))
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
