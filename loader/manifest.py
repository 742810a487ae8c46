"""The manifest of a stored model: where each tensor lies in the aligned data file."""

from __future__ import annotations

import base64
import json
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Every tensor starts on a 4 KiB boundary in the data file and the file's size is a
# multiple of it: O_DIRECT and GPUDirect Storage need aligned offsets and lengths.
ALIGN = 4096


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor: ``offset`` is its byte offset in the data file (4 KiB-aligned)."""

    name: str
    dtype: str  # safetensors dtype name (``BF16``...)
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: int  # xxh3_64 of the tensor's bytes


CHUNK_BYTES = 4 << 20
"""Default size of the data file's checksummed chunks (see :class:`ChunkSums`)."""


@dataclass(frozen=True, slots=True)
class ChunkSums:
    """xxh3_64 of every ``size``-byte chunk of the data file, padding included (the
    last chunk may be shorter).

    The per-tensor checksums name a corrupt tensor, but they can only be computed in
    file order, one tensor at a time.  Chunk checksums let a load verify each read
    on the thread that made it, as soon as it lands, in parallel with the reads still
    in flight; any mismatch sends the load back to the per-tensor checksums, which
    decide (see :mod:`loader.pipeline`).

    In the manifest's JSON they are one base64 string of little-endian uint64s: a
    140 GB model has 35,000 of them, and the daemon reads the manifest on every load
    and swap (``json.loads`` of such a manifest: 10 ms with a list of numbers, 2 ms
    with the string; :meth:`ModelStore.get` also keeps its last parse).
    """

    size: int
    sums: Sequence[int]

    def covers(self, nbytes: int) -> bool:
        """Whether these are the chunks of a file of ``nbytes`` bytes."""
        return self.size > 0 and len(self.sums) == -(-nbytes // self.size)

    def to_doc(self) -> list[Any]:
        a = array("Q", self.sums)
        if sys.byteorder == "big":
            a.byteswap()
        return [self.size, base64.b64encode(a.tobytes()).decode("ascii")]

    @classmethod
    def from_doc(cls, doc: list[Any]) -> ChunkSums:
        a = array("Q")
        a.frombytes(base64.b64decode(doc[1], validate=True))
        if sys.byteorder == "big":
            a.byteswap()
        return cls(int(doc[0]), a)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A registered model.

    ``uid`` changes whenever a model of the same name is removed and added again,
    so a daemon holding the old bytes resident can tell they are stale.
    """

    name: str
    uid: str
    data_file: str  # file name under <data_dir>/models/data/
    nbytes: int  # size of the data file (a multiple of ALIGN)
    tensors: tuple[TensorEntry, ...]
    created: float
    source: str
    metadata: dict[str, str] = field(default_factory=dict)
    chunks: ChunkSums | None = None  # None in manifests written before chunk sums

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data (without alignment padding)."""
        return sum(t.nbytes for t in self.tensors)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "version": 1,
            "name": self.name,
            "uid": self.uid,
            "data_file": self.data_file,
            "nbytes": self.nbytes,
            "created": self.created,
            "source": self.source,
            "metadata": self.metadata,
            "tensors": [
                [t.name, t.dtype, list(t.shape), t.offset, t.nbytes, t.checksum]
                for t in self.tensors
            ],
        }
        if self.chunks is not None:
            doc["chunks"] = self.chunks.to_doc()
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        doc = json.loads(raw)
        if doc.get("version") != 1:
            raise ValueError(f"unsupported manifest version {doc.get('version')!r}")
        chunks = doc.get("chunks")
        return cls(
            name=doc["name"],
            uid=doc["uid"],
            data_file=doc["data_file"],
            nbytes=doc["nbytes"],
            created=doc["created"],
            source=doc["source"],
            metadata=doc.get("metadata", {}),
            tensors=tuple(
                TensorEntry(n, d, tuple(s), o, b, c) for n, d, s, o, b, c in doc["tensors"]
            ),
            chunks=ChunkSums.from_doc(chunks) if chunks else None,
        )
