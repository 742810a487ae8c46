"""The NVMe tier's LMDB index: block key -> where its bytes are and what recovery needs.

One LMDB environment under ``<path>/index`` with two named databases:

* ``blocks``: key -> a packed :class:`Record` (segment, offset, length, checksum,
  codec, plus the namespace digest, parent key, depth and size that
  ``Hierarchy.recover`` rebuilds entries from);
* ``meta``: the on-disk format version.

Every change goes through :meth:`Index.apply`, one write transaction per batch
(LMDB commits are durable and atomic: after a crash the index is exactly the last
committed batch).  Deletes and moves are conditional on the record still naming the
extent the caller saw, so a late delete never removes a newer record of the same key.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import lmdb

from kvstore.lmdb_space import reserve_lock_file

FORMAT_VERSION = 1
_HEAD = struct.Struct("<BBHIQQQQIHH")  # version codec flags seg off length nbytes csum depth nsl pl


class Record(NamedTuple):
    """Where one block's bytes are, and its identity for recovery."""

    seg: int
    off: int
    length: int  # bytes on disk (4 KiB-aligned)
    nbytes: int  # block size
    checksum: int  # xxh3_64 of the block bytes
    codec: int  # 0: raw bytes
    depth: int
    ns: bytes
    parent: bytes | None

    def encode(self) -> bytes:
        parent = self.parent or b""
        head = _HEAD.pack(
            FORMAT_VERSION,
            self.codec,
            0,
            self.seg,
            self.off,
            self.length,
            self.nbytes,
            self.checksum,
            self.depth,
            len(self.ns),
            len(parent),
        )
        return head + self.ns + parent

    @classmethod
    def decode(cls, raw: bytes) -> Record:
        """Raises ``ValueError`` on a record this version cannot read."""
        if len(raw) < _HEAD.size:
            raise ValueError("truncated index record")
        ver, codec, _flags, seg, off, length, nbytes, csum, depth, nsl, pl = _HEAD.unpack_from(raw)
        if ver != FORMAT_VERSION or len(raw) != _HEAD.size + nsl + pl:
            raise ValueError(f"index record version {ver} / length {len(raw)} not understood")
        ns = bytes(raw[_HEAD.size : _HEAD.size + nsl])
        parent = bytes(raw[_HEAD.size + nsl :]) or None
        return cls(seg, off, length, nbytes, csum, codec, depth, ns, parent)


class Put(NamedTuple):
    key: bytes
    rec: Record


class DeleteIf(NamedTuple):
    """Delete ``key`` if its record still names extent (seg, off)."""

    key: bytes
    seg: int
    off: int


class MoveIf(NamedTuple):
    """Point ``key`` at ``rec`` if its record still names extent (old_seg, old_off)."""

    key: bytes
    rec: Record
    old_seg: int
    old_off: int


Op = Put | DeleteIf | MoveIf


class NvmeIndexError(Exception):
    """The index cannot be opened or written (the message names the path)."""


def advice(index_dir: Path) -> str:
    """What an operator does with an index the tier cannot use."""
    return (
        f"move {index_dir / 'data.mdb'} aside (rename it) and restart: the tier then starts "
        f"empty and its segment files are reclaimed"
    )


class Index:
    """The LMDB environment of one NVMe tier directory."""

    def __init__(self, path: Path, map_bytes: int) -> None:
        self.path = path
        try:
            path.mkdir(exist_ok=True)
            reserve_lock_file(path)  # a full disk: an error here, not SIGBUS in LMDB
            # sync + metasync: a committed transaction survives power loss.
            self.env = lmdb.open(
                str(path), map_size=map_bytes, max_dbs=2, subdir=True, sync=True, metasync=True
            )
        except lmdb.InvalidError as exc:  # MDB_INVALID: not an LMDB file (garbage header)
            raise NvmeIndexError(
                f"cannot open the NVMe index at {path}: {exc}; {advice(path)}"
            ) from exc
        except (OSError, lmdb.Error) as exc:
            raise NvmeIndexError(f"cannot open the NVMe index at {path}: {exc}") from exc
        self.blocks = self.env.open_db(b"blocks")
        self.meta = self.env.open_db(b"meta")
        with self.env.begin(write=True, db=self.meta) as txn:
            v = txn.get(b"format")
            if v is None:
                txn.put(b"format", str(FORMAT_VERSION).encode())
            elif int(v) != FORMAT_VERSION:
                raise NvmeIndexError(
                    f"index at {path} has format {int(v)}, this build reads {FORMAT_VERSION}"
                )

    def scan(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, raw record); decode with :meth:`Record.decode`."""
        with self.env.begin(db=self.blocks) as txn:
            for k, v in txn.cursor():
                yield bytes(k), bytes(v)

    def count(self) -> int:
        with self.env.begin(db=self.blocks) as txn:
            return int(txn.stat(self.blocks)["entries"])

    def get(self, key: bytes) -> Record | None:
        with self.env.begin(db=self.blocks) as txn:
            raw = txn.get(key)
        return None if raw is None else Record.decode(raw)

    def apply(self, ops: Sequence[Op]) -> int:
        """Apply ``ops`` in order in one durable transaction; returns how many took effect.

        Raises:
            lmdb.Error: the transaction failed (map full, disk full); nothing applied.
        """
        done = 0
        with self.env.begin(write=True, db=self.blocks) as txn:
            for op in ops:
                if isinstance(op, Put):
                    txn.put(op.key, op.rec.encode())
                    done += 1
                    continue
                raw = txn.get(op.key)
                if raw is None:
                    continue
                cur = Record.decode(raw)
                if isinstance(op, DeleteIf):
                    if (cur.seg, cur.off) == (op.seg, op.off):
                        txn.delete(op.key)
                        done += 1
                elif (cur.seg, cur.off) == (op.old_seg, op.old_off):
                    txn.put(op.key, op.rec.encode())
                    done += 1
        return done

    def delete_keys(self, keys: Sequence[bytes]) -> None:
        """Unconditional deletes (recovery drops records that point at nothing)."""
        with self.env.begin(write=True, db=self.blocks) as txn:
            for k in keys:
                txn.delete(k)

    def close(self) -> None:
        self.env.close()
