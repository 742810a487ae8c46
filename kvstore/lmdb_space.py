"""LMDB on a full filesystem: give the lock file real pages before LMDB maps it.

LMDB sizes its lock file (``lock.mdb``, the reader table) with ``ftruncate`` and
then writes it through a shared mapping.  On a full filesystem the file is sparse,
and the first store to a page with no backing block kills the process with SIGBUS
(tmpfs, ext4 and xfs alike): no exception, no log line.  Allocating the pages first
turns that into an ``OSError`` (ENOSPC) the caller can report.  The data file needs
no such care: LMDB writes it with ``pwrite`` and reports a full disk as an error.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

LOCK_RESERVE = 64 << 10
"""Bytes allocated for ``lock.mdb``: LMDB's default reader table needs about 8 KiB."""


def reserve_lock_file(env_dir: Path) -> None:
    """Allocates ``env_dir/lock.mdb`` (creating it) before ``lmdb.open(env_dir)``.

    Raises:
        OSError: ENOSPC / EDQUOT when the filesystem has no room for it.
    """
    fd = os.open(env_dir / "lock.mdb", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.posix_fallocate(fd, 0, LOCK_RESERVE)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate: as before
            raise
    finally:
        os.close(fd)
