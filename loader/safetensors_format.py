"""A strict parser for safetensors headers.

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the data buffer, offsets relative to its start.  We do not trust the library to
reject a lying header: every offset, size, dtype and name is checked here, and the
data buffer must be covered exactly (no overlap, no gap, nothing out of bounds), which
is what the reference implementation demands too.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader.errors import ModelFormatError

# safetensors dtype -> (itemsize in bytes, torch dtype name)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}

# A header larger than this is not a model header but garbage (the reference
# implementation's limit is 100 MB as well).
MAX_HEADER_BYTES = 100 * 1000 * 1000


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of a source file; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, slots=True)
class SafetensorsFile:
    """A parsed, validated source file."""

    path: Path
    tensors: tuple[TensorSpec, ...]  # in data-offset order
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ModelFormatError(f"duplicate key {k!r} in the JSON header")
        out[k] = v
    return out


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def parse_header_bytes(raw: bytes, file_size: int, where: str) -> SafetensorsFile:
    """Validates a header given its bytes (everything from offset 8 on) and the file size."""
    data_start = 8 + len(raw)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise ModelFormatError(f"{where}: not a safetensors file (header is not UTF-8)") from None
    except json.JSONDecodeError as exc:
        raise ModelFormatError(
            f"{where}: not a safetensors file (header is not JSON: {exc.msg})"
        ) from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{where}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ModelFormatError(f"{where}: __metadata__ must map strings to strings")
    data_len = file_size - data_start
    specs: list[TensorSpec] = []
    for name, info in header.items():
        t = f"{where}: tensor {name!r}"
        if not name:
            raise ModelFormatError(f"{where}: empty tensor name")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ModelFormatError(f"{t}: expected exactly the keys dtype, shape, data_offsets")
        dtype = info["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ModelFormatError(
                f"{t}: unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPES))}"
            )
        shape = info["shape"]
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise ModelFormatError(f"{t}: shape must be a list of non-negative ints, got {shape!r}")
        offs = info["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)):
            raise ModelFormatError(f"{t}: data_offsets must be [begin, end], got {offs!r}")
        begin, end = offs
        if begin > end:
            raise ModelFormatError(f"{t}: data_offsets begin {begin} > end {end}")
        if end > data_len:
            raise ModelFormatError(
                f"{t}: data_offsets end {end} is past the data buffer ({data_len} bytes): "
                "truncated file or lying header"
            )
        want = math.prod(shape) * DTYPES[dtype][0]
        if end - begin != want:
            raise ModelFormatError(
                f"{t}: holds {end - begin} bytes but dtype {dtype} x shape {shape} needs {want}"
            )
        specs.append(TensorSpec(name, dtype, tuple(shape), data_start + begin, data_start + end))
    specs.sort(key=lambda s: (s.begin, s.end))
    pos = data_start
    for s in specs:
        if s.begin < pos:
            raise ModelFormatError(f"{where}: tensor {s.name!r} overlaps the tensor before it")
        if s.begin > pos:
            raise ModelFormatError(
                f"{where}: {s.begin - pos} bytes before tensor {s.name!r} belong to no tensor"
            )
        pos = s.end
    if pos != file_size:
        raise ModelFormatError(
            f"{where}: {file_size - pos} trailing bytes after the last tensor belong to no tensor"
        )
    return SafetensorsFile(Path(where), tuple(specs), dict(metadata), data_start, file_size)


def parse_file(path: str | os.PathLike[str]) -> SafetensorsFile:
    """Reads and validates the header of one safetensors file.

    Raises:
        ModelFormatError: the file is not a safetensors file, is truncated, or its
            header lies (the message names the tensor and what is wrong).
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError(
                    f"{p}: not a safetensors file ({size} bytes, shorter than the 8-byte length)"
                )
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES:
                raise ModelFormatError(
                    f"{p}: not a safetensors file (header length {n} is implausible)"
                )
            if 8 + n > size:
                raise ModelFormatError(
                    f"{p}: truncated: header needs {n} bytes, file has {size - 8} after the length"
                )
            raw = f.read(n)
    except OSError as exc:
        raise ModelFormatError(f"{p}: cannot read: {exc.strerror}") from None
    parsed = parse_header_bytes(raw, size, str(p))
    return SafetensorsFile(p, parsed.tensors, parsed.metadata, parsed.data_start, size)
