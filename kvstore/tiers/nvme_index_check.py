"""Checks of the NVMe tier's LMDB index before the daemon maps it.

LMDB memory-maps ``data.mdb`` and follows the page numbers it finds there.  A file
cut short makes a read past its end a ``SIGBUS``; garbage inside a page can send
LMDB to a wrong page or a wild length (``SIGSEGV``).  Either kills the daemon with
nothing logged.  So before the tier opens the index:

1. the file's header is read with ``pread`` (a read-only environment; LMDB's own
   header check raises ``MDB_INVALID`` on garbage there), and the file's size is
   compared with the pages the last transaction uses (``last_pgno + 1`` pages of
   ``psize`` bytes).  Nothing beyond the two meta pages is touched in this process;
2. a child process (a fresh interpreter) walks every page reachable from the last
   commit: a compacting copy of the environment to ``/dev/null`` (every tree,
   the free list included) and a cursor over the ``blocks`` database.  A
   ``SIGBUS``/``SIGSEGV`` or an LMDB error there marks the index damaged, and the
   daemon lives on.  The file may legitimately be a few pages shorter than
   ``last_pgno + 1`` (pages freed in the transaction that allocated them are never
   written), so a short file is damaged only when the walk fails.

The tier then moves a damaged ``data.mdb`` aside (:func:`set_aside`) and starts
empty; see ``docs/nvme.md``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import lmdb

from kvstore.tiers.nvme_index import NvmeIndexError, advice

CHECK_TIMEOUT_S = 120.0


class IndexDamaged(NvmeIndexError):
    """``data.mdb`` cannot be read safely; ``reason`` says what was found."""

    def __init__(self, data: Path, reason: str) -> None:
        super().__init__(f"the NVMe index {data} is damaged: {reason}")
        self.data = data
        self.reason = reason


class IndexCheck(NamedTuple):
    """What the check found (``file_bytes == 0``: no index yet or an empty file)."""

    file_bytes: int
    entries: int  # records in ``blocks`` (0 without a walk)
    walked: bool  # the child process walked every page
    walk_s: float  # its wall time, start-up included


# The child: only lmdb and the standard library, so it starts fast.  Exit 0 and
# "ok <entries>" on stdout, 3 and a message on an LMDB error, 4 when it cannot run.
_CHILD = r"""
import os, sys
try:
    import lmdb
except ImportError as exc:
    print(f"cannot import lmdb: {exc}"); sys.exit(4)
try:
    env = lmdb.open(sys.argv[1], readonly=True, lock=False, max_dbs=2, subdir=True)
    with open(os.devnull, "wb") as f:
        env.copyfd(f.fileno(), compact=True)
    try:
        db = env.open_db(b"blocks", create=False)
    except lmdb.NotFoundError:
        print("ok 0"); sys.exit(0)
    n = 0
    with env.begin(db=db) as txn:
        for _k, _v in txn.cursor():
            n += 1
    env.close()
except lmdb.Error as exc:
    print(f"{type(exc).__name__}: {exc}"); sys.exit(3)
print(f"ok {n}")
"""


def _signame(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _walk(index_dir: Path, timeout_s: float) -> tuple[int | None, str]:
    """Walks the index in a child: (entries, "") or (None, why it failed)."""
    try:
        r = subprocess.run(
            [sys.executable, "-c", _CHILD, str(index_dir)],
            cwd=index_dir,  # nothing importable there: the child imports only lmdb
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NvmeIndexError(
            f"checking the NVMe index {index_dir / 'data.mdb'} took more than {timeout_s:.0f} s; "
            f"if the disk is not just slow, {advice(index_dir)}"
        ) from None
    except OSError as exc:  # no interpreter to run (an embedded Python)
        raise NvmeIndexError(
            f"cannot start a process to check the NVMe index {index_dir / 'data.mdb'} "
            f"({exc}); set the tier option index_check = false to skip the check"
        ) from exc
    out = r.stdout.strip()
    if r.returncode == 0 and out.startswith("ok "):
        return int(out.split()[1]), ""
    if r.returncode < 0:
        return None, f"reading it crashed a checking process with {_signame(r.returncode)}"
    if r.returncode == 3:
        return None, f"LMDB reports {out}"
    raise NvmeIndexError(  # the check itself could not run: say so, do not guess
        f"cannot check the NVMe index {index_dir / 'data.mdb'}: the checking process "
        f"exited with {r.returncode}: {(out or r.stderr.strip())[-300:]}; set the tier "
        f"option index_check = false to skip the check"
    )


def check_index(
    index_dir: Path, walk: bool = True, timeout_s: float = CHECK_TIMEOUT_S
) -> IndexCheck:
    """Whether ``index_dir/data.mdb`` can be mapped safely.

    Raises:
        IndexDamaged: it cannot (the header is garbage, a page the last commit uses
            is past the end of the file, or walking its pages fails).
        NvmeIndexError: it cannot be checked (unreadable, another LMDB version, the
            check timed out); the message says what to do.
    """
    data = index_dir / "data.mdb"
    try:
        size = data.stat().st_size
    except FileNotFoundError:
        return IndexCheck(0, 0, False, 0.0)
    except OSError as exc:
        raise NvmeIndexError(f"cannot read the NVMe index {data}: {exc}") from exc
    if size == 0:  # LMDB starts a new environment in an empty file
        return IndexCheck(0, 0, False, 0.0)
    try:
        # The header is read with pread; info()/stat() read only the meta pages.
        env = lmdb.open(str(index_dir), readonly=True, lock=False, max_dbs=2, subdir=True)
        try:
            need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        finally:
            env.close()
    except lmdb.VersionMismatchError as exc:
        raise NvmeIndexError(
            f"the NVMe index {data} was written by another LMDB version ({exc}); "
            f"open it with that version, or {advice(index_dir)}"
        ) from exc
    except lmdb.Error as exc:
        raise IndexDamaged(data, f"LMDB cannot open it ({exc})") from exc
    except OSError as exc:
        raise NvmeIndexError(f"cannot read the NVMe index {data}: {exc}") from exc
    short = (
        f"the file has {size} bytes but its last commit uses {need} "
        f"({(need - size + 4095) // 4096} pages missing)"
        if size < need
        else ""
    )
    if not walk:
        if short:
            raise IndexDamaged(data, short)
        return IndexCheck(size, 0, False, 0.0)
    t0 = time.monotonic()
    entries, why = _walk(index_dir, timeout_s)
    dt = time.monotonic() - t0
    if entries is None:
        raise IndexDamaged(data, f"{short}; {why}" if short else why)
    return IndexCheck(size, entries, True, dt)


def set_aside(data: Path) -> Path:
    """Renames a damaged ``data.mdb`` to ``data.mdb.damaged-<UTC time>``; returns the new path.

    Raises:
        NvmeIndexError: the rename failed (the message says what to do by hand).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dst = data.with_name(f"{data.name}.damaged-{stamp}")
    n = 1
    while dst.exists():
        dst = data.with_name(f"{data.name}.damaged-{stamp}-{n}")
        n += 1
    try:
        os.rename(data, dst)
        fd = os.open(data.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise NvmeIndexError(
            f"the NVMe index {data} is damaged and cannot be moved aside ({exc}); "
            f"{advice(data.parent)}"
        ) from exc
    return dst
