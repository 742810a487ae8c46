"""The strict safetensors header parser: every lie in a header is a clear error."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from loader.errors import ModelFormatError
from loader.safetensors_format import parse_file
from tests.loader.conftest import small_model, write_model


def raw_file(path: Path, header: dict[str, Any], data: bytes, pad: bytes = b"") -> Path:
    h = json.dumps(header).encode() + pad
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def test_parses_what_safetensors_writes(tmp_path: Path) -> None:
    ts = small_model()
    f = parse_file(write_model(tmp_path / "m.safetensors", ts))
    assert {t.name for t in f.tensors} == set(ts)
    for t in f.tensors:
        assert t.nbytes == ts[t.name].numel() * ts[t.name].element_size()
        assert t.shape == tuple(ts[t.name].shape)


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors at all......")
    with pytest.raises(ModelFormatError, match="not a safetensors file|truncated"):
        parse_file(p)
    p.write_bytes(struct.pack("<Q", 12) + b"not json!!!!")
    with pytest.raises(ModelFormatError, match="not JSON"):
        parse_file(p)
    p.write_bytes(b"abc")
    with pytest.raises(ModelFormatError, match="shorter than"):
        parse_file(p)


def test_truncated_file(tmp_path: Path) -> None:
    good = write_model(tmp_path / "m.safetensors", small_model()).read_bytes()
    p = tmp_path / "t.safetensors"
    p.write_bytes(good[:-100])
    with pytest.raises(ModelFormatError, match="past the data buffer|truncated"):
        parse_file(p)
    p.write_bytes(good[:20])  # cut inside the header
    with pytest.raises(ModelFormatError, match="truncated"):
        parse_file(p)


def test_overlapping_tensors(tmp_path: Path) -> None:
    hdr = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    with pytest.raises(ModelFormatError, match="overlaps"):
        parse_file(raw_file(tmp_path / "o.safetensors", hdr, bytes(24)))


def test_out_of_bounds_offsets(tmp_path: Path) -> None:
    hdr = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    with pytest.raises(ModelFormatError, match="past the data buffer"):
        parse_file(raw_file(tmp_path / "b.safetensors", hdr, bytes(8)))


def test_size_not_dtype_times_shape(tmp_path: Path) -> None:
    hdr = {"a": {"dtype": "BF16", "shape": [3, 4], "data_offsets": [0, 16]}}
    with pytest.raises(
        ModelFormatError, match=r"holds 16 bytes but dtype BF16 x shape \[3, 4\] needs 24"
    ):
        parse_file(raw_file(tmp_path / "s.safetensors", hdr, bytes(16)))


def test_unknown_dtype(tmp_path: Path) -> None:
    hdr = {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}
    with pytest.raises(ModelFormatError, match="unknown dtype 'F128'"):
        parse_file(raw_file(tmp_path / "d.safetensors", hdr, bytes(16)))


@pytest.mark.parametrize(
    "info,match",
    [
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "begin"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "F32", "shape": [1]}, "exactly the keys"),
    ],
)
def test_malformed_entries(tmp_path: Path, info: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelFormatError, match=match):
        parse_file(raw_file(tmp_path / "e.safetensors", {"a": info}, bytes(4)))


def test_gap_and_trailing_bytes(tmp_path: Path) -> None:
    hdr = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    with pytest.raises(ModelFormatError, match="belong to no tensor"):
        parse_file(raw_file(tmp_path / "g.safetensors", hdr, bytes(8)))
    hdr = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    with pytest.raises(ModelFormatError, match="trailing"):
        parse_file(raw_file(tmp_path / "t.safetensors", hdr, bytes(8)))


def test_duplicate_key_in_header(tmp_path: Path) -> None:
    h = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    p = tmp_path / "dup.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + bytes(4))
    with pytest.raises(ModelFormatError, match="duplicate key 'a'"):
        parse_file(p)


def test_header_padding_and_metadata_accepted(tmp_path: Path) -> None:
    hdr = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    f = parse_file(raw_file(tmp_path / "p.safetensors", hdr, bytes(4), pad=b"    "))
    assert f.metadata == {"format": "pt"} and f.tensors[0].name == "a"


def test_dtypes_map_to_torch() -> None:
    from loader.client import torch_dtype
    from loader.safetensors_format import DTYPES

    for name, (size, _) in DTYPES.items():
        assert torch.empty(0, dtype=torch_dtype(name)).element_size() == size
