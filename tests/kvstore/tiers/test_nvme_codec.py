"""NVMe tier compression (codec 1, byteplane-zstd): round trips, fallbacks, damage,
restart, compaction, batched reads, options, and the default staying raw."""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
import zstandard

from kvstore.config import ConfigError, TierConfig
from kvstore.tiers import nvme_codec
from kvstore.tiers.base import ChecksumMismatch
from kvstore.tiers.nvme import NvmeOptions, NvmeTier
from kvstore.tiers.nvme_codec import CodecError, decode_into, encode_into
from kvstore.tiers.nvme_index import Put
from kvstore.tiers.nvme_io import ALIGN, align_up
from kvstore.tiers.nvme_segments import SlotState

from .nvme_util import data_for, entry, key_of, open_tier, read

KB = 1024
ZSTD = {"compression": "byteplane-zstd"}


def bf16_bytes(key: bytes, nbytes: int) -> bytes:
    """bf16 values of a normal distribution (like KV-cache activations), from the key."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    t = torch.randn(nbytes // 2, generator=g).to(torch.bfloat16)
    return bytes(t.view(torch.uint8).numpy().tobytes())


def put_bytes(t: NvmeTier, key: bytes, data: bytes) -> tuple[Any, Any, bytes]:
    e = entry(key, len(data))
    h = t.reserve(len(data), e)
    assert h is not None
    t.write(h, e, memoryview(data))
    return h, e, data


def put_bf16(t: NvmeTier, i: int, nbytes: int = 256 * KB) -> tuple[Any, Any, bytes]:
    return put_bytes(t, key_of(i), bf16_bytes(key_of(i), nbytes))


def put_random(t: NvmeTier, i: int, nbytes: int = 256 * KB) -> tuple[Any, Any, bytes]:
    return put_bytes(t, key_of(i), data_for(key_of(i), nbytes))


def on_disk(h: Any) -> bytes:
    fd = os.open(h.seg.path, os.O_RDONLY)
    try:
        return os.pread(fd, h.length, h.off)
    finally:
        os.close(fd)


def flip(h: Any, at: int) -> None:
    fd = os.open(h.seg.path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, h.off + at)
        os.pwrite(fd, bytes([b[0] ^ 0x40]), h.off + at)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the codec alone


def test_encode_decode_round_trip_and_declines() -> None:
    cctx = zstandard.ZstdCompressor(level=1)
    dctx = zstandard.ZstdDecompressor()
    data = bf16_bytes(key_of(1), 64 * KB)
    out = mmap.mmap(-1, 64 * KB)
    n = encode_into(memoryview(data), len(data), memoryview(out), cctx)
    assert 0 < n <= 64 * KB - ALIGN and n % ALIGN == 0
    dst = bytearray(len(data))
    decode_into(
        memoryview(out)[:n], len(data), memoryview(dst), np.empty(len(data), np.uint8), dctx
    )
    assert bytes(dst) == data
    # Random bytes, an odd size and a single page stay raw (0).
    rnd = data_for(key_of(2), 64 * KB)
    assert encode_into(memoryview(rnd), len(rnd), memoryview(out), cctx) == 0
    assert encode_into(memoryview(data), 10_001, memoryview(out), cctx) == 0
    assert encode_into(memoryview(data), 4 * KB, memoryview(out), cctx) == 0
    # A frame that declares another size is refused before anything is allocated for it.
    half = len(data) // 2
    bad = bytes(out[:half]) + cctx.compress(b"\0" * (half + 2))
    with pytest.raises(CodecError, match="declares"):
        decode_into(
            memoryview(bad), len(data), memoryview(dst), np.empty(len(data), np.uint8), dctx
        )
    out.close()


# ---------------------------------------------------------------- the tier


def test_default_off_stores_raw_bytes(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t")
    try:
        h, e, data = put_bf16(t, 1)
        t.flush()
        assert t.opts.compression == "off"
        assert (h.codec, h.length) == (0, align_up(len(data)))
        assert on_disk(h) == data  # the extent is the block's bytes, as before the codec
        rec = t.index.get(e.key)
        assert rec is not None and rec.codec == 0 and rec.length == len(data)
        st = t.stats()
        assert st["compression"] == "off"
        assert st["compressed_blocks"] == st["compressed_writes"] == st["compress_fallbacks"] == 0
    finally:
        t.close()


@pytest.mark.parametrize("nbytes", [256 * KB, 64 * KB + 2, 2 << 20])
def test_bf16_round_trip_is_compressed(tmp_path: Path, nbytes: int) -> None:
    t = open_tier(tmp_path / "t", capacity=64 << 20, segment_bytes=8 << 20, **ZSTD)
    try:
        blocks = [put_bf16(t, i, nbytes) for i in range(4)]
        t.flush()
        for h, e, data in blocks:
            assert h.state == SlotState.DURABLE
            assert h.codec == 1 and h.length <= align_up(nbytes) - ALIGN
            assert read(t, h, e) == data
            assert h.checksum == xxhash.xxh3_64_intdigest(data)  # of the logical bytes
            rec = t.index.get(e.key)
            assert rec is not None and (rec.codec, rec.length, rec.nbytes) == (1, h.length, nbytes)
            assert on_disk(h)[: nbytes // 2] == data[0::2]  # the low plane, raw
        # An unaligned destination too.
        h, e, data = blocks[0]
        big = bytearray(nbytes + 1)
        t.read_into(h, e, memoryview(big)[1:])
        assert bytes(big[1:]) == data
        st = t.stats()
        assert st["compressed_blocks"] == st["compressed_writes"] == 4
        assert st["compressed_bytes"] == 4 * nbytes
        assert st["compressed_disk_bytes"] == sum(h.length for h, _, _ in blocks)
        assert 1.2 < st["compressed_bytes"] / st["compressed_disk_bytes"] < 2
        assert st["live_bytes"] == st["compressed_disk_bytes"]
        assert st["used_bytes"] == 4 * align_up(nbytes)  # capacity counts the raw size
        assert st["compressed_reads"] == 5 and st["checksum_failures"] == 0
        for h, _, _ in blocks:
            t.free(h)
        assert t.used_bytes == 0 and t.stats()["compressed_blocks"] == 0
    finally:
        t.close()


def test_incompressible_odd_and_small_blocks_stay_raw(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t", **ZSTD)
    try:
        blocks = [
            put_random(t, 1),  # tried, saves nothing: raw
            put_bytes(t, key_of(2), bf16_bytes(key_of(2), 64 * KB)[:-1]),  # odd: not tried
            put_bytes(t, key_of(3), bf16_bytes(key_of(3), 4 * KB)),  # one page: not tried
            put_random(t, 4, 1),
            put_bf16(t, 5),  # compressed, between raw ones
        ]
        t.flush()
        assert [h.codec for h, _, _ in blocks] == [0, 0, 0, 0, 1]
        for h, e, data in blocks:
            assert read(t, h, e) == data
            if h.codec == 0:
                assert h.length == align_up(e.nbytes) and on_disk(h)[: e.nbytes] == data
        st = t.stats()
        assert (st["compressed_writes"], st["compress_fallbacks"]) == (1, 1)
    finally:
        t.close()


def test_compression_runs_on_the_writer_threads(tmp_path: Path, monkeypatch: Any) -> None:
    names: list[str] = []
    real = nvme_codec.encode_into

    def spy(*a: Any) -> int:
        names.append(threading.current_thread().name)
        return real(*a)

    monkeypatch.setattr(nvme_codec, "encode_into", spy)
    t = open_tier(tmp_path / "t", **ZSTD)
    try:
        for i in range(6):
            put_bf16(t, i, 64 * KB)
        t.flush()
        assert len(names) == 6 and all(n.startswith("nvme-w") for n in names), names
    finally:
        t.close()


def test_read_of_in_flight_block_and_free_before_placement(tmp_path: Path) -> None:
    from .test_nvme import Gate

    t = open_tier(tmp_path / "t", io_threads=1, **ZSTD)
    gate = Gate(t.io.pwritev, first_only=True)
    t.io.pwritev = gate  # type: ignore[method-assign]
    try:
        a = put_bf16(t, 1)
        assert gate.entered.acquire(timeout=5)  # the only writer is busy with a
        b = put_bf16(t, 2)
        c = put_bf16(t, 3)
        assert read(t, *b[:2]) == b[2]  # not placed yet: served from staging
        assert b[0].seg is None
        t.free(b[0])  # freed before a writer placed it: never written
        gate.open()
        t.flush()
        assert t.stats()["pending_writes"] == 0
        assert b[0].seg is None and t.index.get(b[1].key) is None
        assert t.stats()["dead_bytes"] == 0 and t.stats()["staging_in_use_bytes"] == 0
        for h, e, data in (a, c):
            assert h.codec == 1 and read(t, h, e) == data
        assert t.used_bytes == 2 * 256 * KB
    finally:
        gate.open()
        t.close()


@pytest.mark.parametrize(
    ("where", "what"),
    [("low", "low plane"), ("frame", "zstd data"), ("head", "zstd frame header")],
)
def test_damaged_compressed_extent_is_a_miss(tmp_path: Path, where: str, what: str) -> None:
    t = open_tier(tmp_path / "t", read_threads=2, **ZSTD)
    try:
        blocks = [put_bf16(t, i) for i in range(4)]
        t.flush()
        h, e, _ = blocks[1]
        half = e.nbytes // 2
        flip(h, {"low": 100, "frame": half + 2000, "head": half + 1}[where])
        with pytest.raises(ChecksumMismatch):
            read(t, h, e)
        bufs = [mmap.mmap(-1, 256 * KB) for _ in blocks]
        items = [(bh, be, memoryview(b)) for (bh, be, _), b in zip(blocks, bufs, strict=True)]
        res = t.read_many(items)
        assert isinstance(res[1], ChecksumMismatch), what
        assert [r for i, r in enumerate(res) if i != 1] == [None] * 3
        assert all(
            bytes(b) == d
            for i, (b, (_, _, d)) in enumerate(zip(bufs, blocks, strict=True))
            if i != 1
        )
        assert t.stats()["checksum_failures"] == 2
        # The read threads survived: the tier keeps serving.
        assert t.read_many(items[2:]) == [None, None]
        assert read(t, *blocks[3][:2]) == blocks[3][2]
        for _, _, m in items:
            m.release()
        for b in bufs:
            b.close()
    finally:
        t.close()


def test_restart_serves_the_same_bytes_with_compression_off(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t", **ZSTD)
    blocks = [put_bf16(t, i) if i % 2 else put_random(t, i) for i in range(6)]
    t.close()
    t = open_tier(tmp_path / "t")  # compression off now: compressed blocks still read
    try:
        found = {rb.key: rb for rb in t.recover()}
        assert set(found) == {e.key for _, e, _ in blocks}
        for _, e, data in blocks:
            rb = found[e.key]
            assert rb.handle.codec == (1 if e.key in {b[1].key for b in blocks[1::2]} else 0)
            assert read(t, rb.handle, entry(e.key, rb.nbytes, rb.checksum)) == data
        st = t.stats()
        assert st["recovered_blocks"] == 6 and st["recovered_dropped"] == 0
        assert st["compressed_blocks"] == 3
        assert st["used_bytes"] == 6 * 256 * KB and st["live_bytes"] < st["used_bytes"]
        # New blocks are raw again.
        h, e, data = put_bf16(t, 100)
        t.flush()
        assert h.codec == 0 and read(t, h, e) == data
    finally:
        t.close()


def test_records_no_build_can_read_are_dropped_at_start(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t", **ZSTD)
    ok = put_bf16(t, 1)
    future = put_bf16(t, 2)
    liar = put_bf16(t, 3)
    t.flush()
    rf = t.index.get(future[1].key)
    rl = t.index.get(liar[1].key)
    assert rf is not None and rl is not None
    t.index.apply(
        [
            Put(future[1].key, rf._replace(codec=7)),  # a codec from a newer build
            Put(liar[1].key, rl._replace(length=align_up(rl.nbytes))),  # no page saved
        ]
    )
    t.close()
    t = open_tier(tmp_path / "t")
    try:
        found = {rb.key: rb for rb in t.recover()}
        assert set(found) == {ok[1].key}
        assert t.stats()["recovered_dropped"] == 2
        assert read(t, found[ok[1].key].handle, ok[1]) == ok[2]
    finally:
        t.close()


def test_compaction_carries_compressed_extents(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t", background_compaction=False, **ZSTD)
    try:
        blocks = [put_bf16(t, i) if i % 3 else put_random(t, i) for i in range(18)]
        t.flush()
        first = blocks[0][0].seg
        in_first = [b for b in blocks if b[0].seg is first]
        assert len(in_first) >= 4 and any(b[0].codec == 1 for b in in_first)
        for h, _, _ in in_first[::2]:
            t.free(h)
        live = [b for b in in_first[1::2]]
        bad = next(b for b in live if b[0].codec == 1)
        flip(bad[0], bad[1].nbytes // 2 + 500)  # damaged: must not be carried forward
        before = {id(h): (h.codec, h.length, on_disk(h)) for h, _, _ in live if h is not bad[0]}
        assert t.compact(min_dead_ratio=0.01) > 0
        assert first.retired
        assert bad[0].state == SlotState.CORRUPT and t.stats()["checksum_failures"] == 1
        with pytest.raises(ChecksumMismatch):
            read(t, bad[0], bad[1])
        for h, e, data in live:
            if h is bad[0]:
                continue
            assert h.seg is not first
            assert (h.codec, h.length, on_disk(h)) == before[id(h)]  # copied as stored
            assert read(t, h, e) == data
        st = t.stats()
        assert st["compressed_blocks"] == sum(
            1 for h, _, _ in blocks if h.state == SlotState.DURABLE and h.codec == 1
        )
    finally:
        t.close()
    t = open_tier(tmp_path / "t")
    try:
        found = {rb.key: rb for rb in t.recover()}
        assert bad[1].key not in found
        for h, e, data in live:
            if h is not bad[0]:
                assert read(t, found[e.key].handle, e) == data
    finally:
        t.close()


def test_read_many_adjacent_compressed_and_raw(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t", io_threads=1, read_threads=2, segment_bytes=8 << 20, **ZSTD)
    try:
        blocks = [put_bf16(t, i) if i % 2 else put_random(t, i) for i in range(12)]
        t.flush()
        assert [h.codec for h, _, _ in blocks] == [0, 1] * 6
        for a, b in zip(blocks, blocks[1:], strict=False):  # back to back on disk
            assert a[0].seg is b[0].seg and a[0].off + a[0].length == b[0].off
        bufs = [mmap.mmap(-1, 256 * KB) for _ in blocks]
        dsts = [memoryview(b) for b in bufs]
        dsts[4] = memoryview(bytearray(256 * KB + 1))[1:]  # an unaligned raw one: alone
        dsts[5] = memoryview(bytearray(256 * KB + 1))[1:]  # unaligned compressed: in a run
        items = [(h, e, d) for (h, e, _), d in zip(blocks, dsts, strict=True)]
        before = t.stats()["read_requests"]
        assert t.read_many(items) == [None] * 12
        assert all(bytes(d) == data for d, (_, _, data) in zip(dsts, blocks, strict=True))
        assert t.stats()["read_requests"] - before <= 4  # 12 blocks in a few requests
        assert t.stats()["compressed_reads"] == 6
        flip(blocks[3][0], 300 * 1)  # a compressed block inside a run fails alone
        res = t.read_many(items)
        assert isinstance(res[3], ChecksumMismatch)
        assert [r for i, r in enumerate(res) if i != 3] == [None] * 11
        for d in dsts:
            d.release()
        for b in bufs:
            b.close()
    finally:
        t.close()


# ---------------------------------------------------------------- options


def test_compression_options_from_config(tmp_path: Path) -> None:
    cfg = TierConfig(
        "disk", "nvme", 1 << 30, options={"compression": "byteplane-zstd", "compression_level": 3}
    )
    t = NvmeTier.from_config(cfg, tmp_path)
    try:
        assert (t.opts.compression, t.opts.compression_level) == ("byteplane-zstd", 3)
        assert t.stats()["compression"] == "byteplane-zstd"
        h, e, data = put_bf16(t, 1)
        t.flush()
        assert h.codec == 1 and read(t, h, e) == data
    finally:
        t.close()


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (
            {"compression": "zstd"},
            r"options\.compression: expected one of 'off', 'byteplane-zstd', got 'zstd'",
        ),
        ({"compression": True}, r"compression: expected one of 'off', 'byteplane-zstd'"),
        ({"compression_level": 0}, r"compression_level: expected an integer in 1\.\.19, got 0"),
        ({"compression_level": 20}, r"compression_level: expected an integer in 1\.\.19"),
        ({"compression_level": True}, r"compression_level"),
        ({"compresion": "off"}, r"unknown nvme option 'compresion'; known: .*compression"),
    ],
)
def test_bad_compression_options(tmp_path: Path, opts: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        NvmeTier.from_config(TierConfig("disk", "nvme", 1 << 30, options=opts), tmp_path)


def test_bad_compression_in_code_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected one of 'off', 'byteplane-zstd', got 'lz4'"):
        NvmeTier("n", 1 << 30, tmp_path / "t", NvmeOptions(compression="lz4"))
