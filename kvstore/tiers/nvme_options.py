"""Options of the NVMe tier (the ``options`` table of a ``kind = "nvme"`` tier) and the
checks of its directory at start."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kvstore.config import ConfigError, parse_size
from kvstore.tiers.nvme_io import ALIGN

COMPRESSIONS = ("off", "byteplane-zstd")
"""Values of the ``compression`` option (codec numbers: ``kvstore.tiers.nvme_codec``)."""


class NvmeDirError(ConfigError):
    """The tier's directory is missing, not a directory, unwritable or in use."""


@dataclass(slots=True)
class NvmeOptions:
    """Tunables of one NVMe tier; every field has a default that works on a laptop.

    Attributes:
        segment_bytes: size at which a segment file is sealed and a new one started.
        io_threads: threads issuing writes.
        read_threads: threads issuing reads for ``read_many`` (a virtio or NVMe disk
            reads faster with more requests in flight).
        staging_bytes: memory for writes in flight; ``write`` waits when it is spent.
        o_direct: ``"auto"`` (use it where the filesystem accepts it), ``True``
            (fail at start if it does not) or ``False`` (buffered I/O).
        io_backend: ``"auto"``, ``"posix"`` or ``"kvikio"``.
        compact_min_dead_ratio: a sealed segment whose freed share reaches this is
            compacted (its live blocks copied forward, the file deleted).
        max_write_bytes: queued extents that lie back to back are written in one
            request of up to this size.
        read_run_bytes: ``read_many`` reads blocks that lie back to back in requests of
            up to this size (a few large requests beat many 2 MiB ones on virtio disks).
        commit_interval_ms: a group commit (``fdatasync`` + index transaction) waits up
            to this long for more finished writes; ``flush`` cuts the wait short.
        background_compaction: compact on a background thread (else only on
            :meth:`NvmeTier.compact`).
        create_dir: create ``path`` when missing (else a missing path is an error).
        index_map_bytes: LMDB map size (an upper bound, not allocated up front).
        index_check: at start, walk every page of the LMDB index in a child process
            before mapping it here, so that a damaged file is found (and set aside)
            instead of killing the daemon with ``SIGBUS`` (~65 ms for 5,000 blocks).
            Off: only a file cut short is caught.
        read_delay_ms: for tests only: every ``read_many`` sleeps this long first (a
            slow disk, deterministically).
        compression: ``"off"`` (default: every block stored raw, as before the codec
            existed) or ``"byteplane-zstd"`` (16-bit values split into byte planes, the
            high plane zstd-compressed, per block only where that saves a 4 KiB page;
            see :mod:`kvstore.tiers.nvme_codec`).  Off by default: on a fast disk and a
            few cores, decoding costs more read time than the smaller extents save.
        compression_level: zstd level for ``byteplane-zstd`` (1..19; 1 is the fastest
            and, on bf16 exponent planes, compresses about as well as 3).
    """

    segment_bytes: int = 256 << 20
    io_threads: int = 4
    read_threads: int = 8
    staging_bytes: int = 64 << 20
    o_direct: str | bool = "auto"
    io_backend: str = "auto"
    compact_min_dead_ratio: float = 0.5
    max_write_bytes: int = 16 << 20
    read_run_bytes: int = 8 << 20
    commit_interval_ms: float = 20.0
    background_compaction: bool = True
    create_dir: bool = True
    index_map_bytes: int = 4 << 30
    index_check: bool = True
    read_delay_ms: float = 0.0
    compression: str = "off"
    compression_level: int = 1

    @classmethod
    def known(cls) -> list[str]:
        return ["path"] + [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, opts: dict[str, Any], where: str) -> NvmeOptions:
        """Validated options from a config table (``path`` is handled by the caller).

        Raises:
            ConfigError: an unknown option or a bad value, naming it.
        """
        known = cls.known()
        o = cls()
        for k, v in opts.items():
            if k not in known:
                raise ConfigError(
                    f"{where}: unknown nvme option {k!r}; known: {', '.join(sorted(known))}"
                )
            if k == "path":
                continue
            f = f"{where}.options.{k}"
            if k in (
                "segment_bytes",
                "staging_bytes",
                "index_map_bytes",
                "max_write_bytes",
                "read_run_bytes",
            ):
                setattr(o, k, parse_size(v, f))
            elif k in ("io_threads", "read_threads"):
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64:
                    raise ConfigError(f"{f}: expected an integer in 1..64, got {v!r}")
                setattr(o, k, v)
            elif k == "o_direct":
                if v not in ("auto", True, False):
                    raise ConfigError(f"{f}: expected 'auto', true or false, got {v!r}")
                o.o_direct = v
            elif k == "io_backend":
                if v not in ("auto", "posix", "kvikio"):
                    raise ConfigError(f"{f}: expected 'auto', 'posix' or 'kvikio', got {v!r}")
                o.io_backend = v
            elif k == "compact_min_dead_ratio":
                if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1:
                    raise ConfigError(f"{f}: expected a number in (0, 1], got {v!r}")
                o.compact_min_dead_ratio = float(v)
            elif k in ("commit_interval_ms", "read_delay_ms"):
                if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 10_000:
                    raise ConfigError(f"{f}: expected milliseconds in 0..10000, got {v!r}")
                setattr(o, k, float(v))
            elif k == "compression":
                if v not in COMPRESSIONS:
                    raise ConfigError(
                        f"{f}: expected one of {', '.join(map(repr, COMPRESSIONS))}, got {v!r}"
                    )
                o.compression = v
            elif k == "compression_level":
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 19:
                    raise ConfigError(f"{f}: expected an integer in 1..19, got {v!r}")
                o.compression_level = v
            elif k in ("background_compaction", "create_dir", "index_check"):
                if not isinstance(v, bool):
                    raise ConfigError(f"{f}: expected true or false, got {v!r}")
                setattr(o, k, v)
        o.validate(where)
        return o

    def validate(self, where: str = "nvme") -> None:
        """Raises ConfigError on values no option parser would catch alone."""
        if self.segment_bytes < (1 << 20) or self.segment_bytes % ALIGN:
            raise ConfigError(
                f"{where}.options.segment_bytes: must be >= 1 MiB and a multiple of 4 KiB, "
                f"got {self.segment_bytes}"
            )
        for k in ("max_write_bytes", "read_run_bytes"):
            if getattr(self, k) < ALIGN:
                raise ConfigError(f"{where}.options.{k}: must be >= 4 KiB")
        if self.staging_bytes < ALIGN:
            raise ConfigError(f"{where}.options.staging_bytes: must be >= 4 KiB")
        if self.index_map_bytes < (1 << 20):
            raise ConfigError(f"{where}.options.index_map_bytes: must be >= 1 MiB")
        if self.compression not in COMPRESSIONS:
            known = ", ".join(map(repr, COMPRESSIONS))
            raise ConfigError(
                f"{where}.options.compression: expected one of {known}, got {self.compression!r}"
            )
        if not 1 <= self.compression_level <= 19:
            raise ConfigError(
                f"{where}.options.compression_level: expected an integer in 1..19, "
                f"got {self.compression_level!r}"
            )


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def open_dir(path: Path, create: bool) -> tuple[Path, OSError | None]:
    """The tier directory, created if allowed; a clear error naming the path if unusable.

    Returns:
        The path, and the probe's error when the directory is usable but its disk is
        full (``ENOSPC``/``EDQUOT``): the tier then starts degraded instead of failing.
    """
    if not path.exists():
        if not create:
            raise NvmeDirError(f"nvme tier directory {path} does not exist (create_dir = false)")
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise NvmeDirError(f"cannot create nvme tier directory {path}: {exc}") from exc
    if not path.is_dir():
        raise NvmeDirError(f"nvme tier path {path} exists but is not a directory")
    return path, probe_write(path)


def probe_write(path: Path) -> OSError | None:
    """Writes and removes a 1-byte file in ``path``; the error if its disk is full.

    Raises:
        NvmeDirError: any other failure (``EACCES``, ``EROFS`` ...), naming the path.
    """
    probe = path / ".write-probe"
    try:
        probe.write_bytes(b"x")
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()  # a disk-full write may leave the file behind, empty
        if exc.errno in DISK_FULL:
            return exc
        raise NvmeDirError(f"nvme tier directory {path} is not writable: {exc}") from exc
    probe.unlink()
    return None


def take_dir_lock(path: Path) -> int:
    """An exclusive ``flock`` on ``path/LOCK`` (released when the fd closes or the process dies).

    Raises:
        NvmeDirError: another process holds it.
    """
    lock_path = path / "LOCK"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise NvmeDirError(
            f"nvme tier directory {path} is in use by another process ({lock_path} is locked)"
        ) from None
    return fd
