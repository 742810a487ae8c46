"""NVMe tier: round trips, in-flight reads, backpressure, read_many, recovery, compaction, config."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash

from kvstore.config import ConfigError, TierConfig
from kvstore.tiers.base import TIERS, ChecksumMismatch
from kvstore.tiers.nvme import NvmeDirError, NvmeTier
from kvstore.tiers.nvme_segments import SlotState

from .nvme_util import NS, data_for, entry, key_of, open_tier, put, read

KB = 1024


class Gate:
    """Wraps an I/O method so calls wait until :meth:`open` (counting the waiters)."""

    def __init__(self, fn: Any, first_only: bool = False) -> None:
        self.fn = fn
        self.ev = threading.Event()
        self.entered = threading.Semaphore(0)
        self.first_only = first_only
        self.calls = 0

    def __call__(self, *a: Any) -> Any:
        self.calls += 1
        if not self.first_only or self.calls == 1:
            self.entered.release()
            assert self.ev.wait(10)
        return self.fn(*a)

    def open(self) -> None:
        self.ev.set()


def test_registered() -> None:
    assert TIERS.get("nvme") is NvmeTier


@pytest.mark.parametrize("o_direct", ["auto", False])
def test_round_trip_aligned_and_unaligned(tmp_path: Path, o_direct: Any) -> None:
    t = open_tier(tmp_path / "t", o_direct=o_direct)
    try:
        blocks = [put(t, key_of(i), n) for i, n in enumerate([64 * KB, 10_000, 1, 300 * KB])]
        t.flush()
        for h, e, data in blocks:
            assert read(t, h, e) == data
            assert h.state == SlotState.DURABLE
            assert h.checksum == xxhash.xxh3_64_intdigest(data)  # computed: entry had 0
        # An unaligned destination goes through the bounce buffer.
        h, e, data = blocks[0]
        big = bytearray(e.nbytes + 1)
        t.read_into(h, e, memoryview(big)[1:])
        assert bytes(big[1:]) == data
        st = t.stats()
        assert st["io_backend"] == "posix"
        assert st["o_direct"] is (o_direct == "auto")  # /tmp here is ext4
        assert st["used_bytes"] == sum(h.length for h, _, _ in blocks)
        assert st["writes"] == 4 and st["reads"] >= 5
        assert st["live_bytes"] == st["used_bytes"] and st["degraded"] == ""
    finally:
        t.close()


def test_read_of_in_flight_write_returns_its_bytes(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t")
    gate = Gate(t.io.pwritev)
    t.io.pwritev = gate  # type: ignore[method-assign]
    try:
        h, e, data = put(t, key_of(1), 64 * KB)
        assert gate.entered.acquire(timeout=5)
        assert h.state == SlotState.WRITING
        assert read(t, h, e) == data
        assert t.stats()["reads_from_staging"] == 1
        gate.open()
        t.flush()
        assert h.state == SlotState.DURABLE
        assert read(t, h, e) == data
    finally:
        gate.open()
        t.close()


def test_backpressure_bounds_staging(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t", staging_bytes=128 * KB)
    gate = Gate(t.io.pwritev)
    t.io.pwritev = gate  # type: ignore[method-assign]
    try:
        first = [put(t, key_of(i), 64 * KB) for i in range(2)]  # fills the staging pool
        done = threading.Event()
        late: list[Any] = []

        def third() -> None:
            late.append(put(t, key_of(2), 64 * KB))
            done.set()

        th = threading.Thread(target=third)
        th.start()
        # The third write waits for a staging slot (counted when it starts to), and
        # goes on waiting: it does not grow memory.  However late its thread runs.
        deadline = time.monotonic() + 10
        while t.stats()["staging_waits"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.stats()["staging_waits"] >= 1
        assert not done.wait(0.3)
        assert t.stats()["staging_in_use_bytes"] == 128 * KB
        gate.open()
        assert done.wait(5)
        th.join()
        t.flush()
        for h, e, data in first + late:
            assert read(t, h, e) == data
        assert t.stats()["staging_waits"] >= 1
    finally:
        gate.open()
        t.close()


def test_read_many_in_parallel(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t", io_threads=4)
    try:
        blocks = [put(t, key_of(i), 128 * KB) for i in range(12)]
        t.flush()
        blocks.append(put(t, key_of(99), 128 * KB))  # maybe still in flight: also fine
        dsts = [bytearray(e.nbytes) for _, e, _ in blocks]
        res = t.read_many(
            [(h, e, memoryview(d)) for (h, e, _), d in zip(blocks, dsts, strict=True)]
        )
        assert res == [None] * len(blocks)
        assert all(bytes(d) == data for d, (_, _, data) in zip(dsts, blocks, strict=True))
        assert t.stats()["read_many_calls"] == 1
    finally:
        t.close()


def test_reopen_recovers_every_committed_block(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t")
    parent = entry(key_of(0), 64 * KB)
    blocks = {}
    for i in range(8):
        k = key_of(i)
        data = data_for(k, 64 * KB)
        e = entry(k, 64 * KB, xxhash.xxh3_64_intdigest(data), parent if i else None, i)
        h = t.reserve(len(data), e)
        t.write(h, e, memoryview(data))
        blocks[k] = (data, e)
    t.close()
    t = open_tier(tmp_path / "t")
    try:
        found = {rb.key: rb for rb in t.recover()}
        assert set(found) == set(blocks)
        for k, rb in found.items():
            data, e = blocks[k]
            assert (rb.ns, rb.depth, rb.nbytes, rb.checksum) == (NS, e.depth, len(data), e.checksum)
            assert rb.parent == (parent.key if e.depth else None)
            assert read(t, rb.handle, entry(k, rb.nbytes, rb.checksum)) == data
        assert t.stats()["recovered_blocks"] == 8
        assert t.used_bytes == 8 * 64 * KB
    finally:
        t.close()


def test_free_of_in_flight_write_is_not_recovered(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t")
    gate = Gate(t.io.pwritev)
    t.io.pwritev = gate  # type: ignore[method-assign]
    h, e, _ = put(t, key_of(1), 64 * KB)
    keep = put(t, key_of(2), 64 * KB)
    t.free(h)
    gate.open()
    t.flush()
    assert t.stats()["dead_bytes"] == 64 * KB
    t.close()
    t = open_tier(tmp_path / "t")
    try:
        assert [rb.key for rb in t.recover()] == [keep[1].key]
    finally:
        t.close()


def test_compaction_reclaims_space_and_keeps_bytes(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t", background_compaction=False)
    blocks = [put(t, key_of(i), 256 * KB) for i in range(16)]  # 4 segments of 1 MiB
    t.flush()
    for h, _, _ in blocks[:-4:2] + [blocks[1], blocks[3]]:
        t.free(h)
    live = [b for b in blocks if b[0].state == SlotState.DURABLE]
    st = t.stats()
    assert st["dead_bytes"] > 0
    reclaimed = t.compact(min_dead_ratio=0.01)
    assert reclaimed > 0
    st = t.stats()
    assert st["compactions"] >= 1 and st["compacted_bytes"] > 0
    sealed_dead = sum(s.dead for s in t.segs.segs.values() if s.sealed)
    assert sealed_dead == 0
    for h, e, data in live:
        assert read(t, h, e) == data
    files = sorted((tmp_path / "t" / "segments").glob("seg-*.dat"))
    assert len(files) == st["segments"]
    assert sum(f.stat().st_size for f in files) == st["disk_bytes"]
    t.close()
    t = open_tier(tmp_path / "t")
    try:
        found = {rb.key: rb for rb in t.recover()}
        assert set(found) == {e.key for _, e, _ in live}
        for _, e, data in live:
            assert read(t, found[e.key].handle, e) == data
    finally:
        t.close()


def test_background_compaction_deletes_dead_segments(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t", compact_min_dead_ratio=0.5)
    try:
        blocks = [put(t, key_of(i), 256 * KB) for i in range(12)]
        t.flush()
        for h, _, _ in blocks[:8]:
            t.free(h)
        deadline = time.monotonic() + 10
        while t.stats()["segments_deleted"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert t.stats()["segments_deleted"] >= 2
        for h, e, data in blocks[8:]:
            assert read(t, h, e) == data
    finally:
        t.close()


def test_read_during_compaction_is_safe(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t", background_compaction=False)
    try:
        blocks = [put(t, key_of(i), 256 * KB) for i in range(8)]
        t.flush()
        for h, _, _ in blocks[:3]:
            t.free(h)
        h, e, data = blocks[3]  # the last live block of segment 1
        old_seg = h.seg
        gate = Gate(t.io.pread, first_only=True)
        t.io.pread = gate  # type: ignore[method-assign]
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(read(t, h, e)))
        reader.start()
        assert gate.entered.acquire(timeout=5)  # the reader holds segment 1 open
        assert t.compact(min_dead_ratio=0.5) > 0  # moves the block and deletes the file
        assert h.seg is not old_seg and old_seg.retired and old_seg.f is not None
        gate.open()
        reader.join()
        assert got == [data]
        assert old_seg.f is None  # closed once the reader let go
        assert read(t, h, e) == data
    finally:
        t.close()


def test_capacity_and_misuse(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t", capacity=256 * KB)
    try:
        e = entry(key_of(1), 100_000)
        hs = [t.reserve(100_000, e) for _ in range(3)]
        assert hs[0] is not None and hs[1] is not None and hs[2] is None
        with pytest.raises(ValueError, match="exceeds"):
            t.reserve(1 << 20, e)
        with pytest.raises(ValueError, match="needs src"):
            t.write(hs[0], e, None)
        with pytest.raises(ValueError, match="into a slot"):
            t.write(hs[0], e, memoryview(b"short"))
        t.free(hs[0])
        with pytest.raises(ValueError, match="double free"):
            t.free(hs[0])
        assert t.used_bytes == 102_400  # 100_000 B counts as its 4 KiB-aligned extent
    finally:
        t.close()


# ---------------------------------------------------------------- config and start-up


def test_from_config_defaults_and_options(tmp_path: Path) -> None:
    cfg = TierConfig("disk", "nvme", 1 << 30, options={"segment_bytes": "2MiB", "io_threads": 3})
    t = NvmeTier.from_config(cfg, tmp_path)
    try:
        assert t.path == tmp_path / "nvme"
        assert t.opts.segment_bytes == 2 << 20 and t.opts.io_threads == 3
    finally:
        t.close()
    cfg = TierConfig(
        "disk", "nvme", 1 << 30, options={"path": str(tmp_path / "x"), "o_direct": False}
    )
    t = TIERS.get("nvme").from_config(cfg, tmp_path)
    try:
        assert t.path == tmp_path / "x" and t.stats()["o_direct"] is False
    finally:
        t.close()


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"segmnet_bytes": 1}, r"unknown nvme option 'segmnet_bytes'; known: .*segment_bytes"),
        ({"io_threads": 0}, r"io_threads: expected an integer"),
        ({"io_threads": True}, r"io_threads"),
        ({"o_direct": "yes"}, r"o_direct: expected"),
        ({"io_backend": "spdk"}, r"io_backend: expected"),
        ({"segment_bytes": "1KiB"}, r"segment_bytes: must be >= 1 MiB"),
        ({"segment_bytes": "lots"}, r"cannot parse size"),
        ({"compact_min_dead_ratio": 0}, r"compact_min_dead_ratio"),
        ({"create_dir": "no"}, r"create_dir: expected true or false"),
        ({"path": 3}, r"path: expected a string"),
    ],
)
def test_bad_options(tmp_path: Path, opts: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        NvmeTier.from_config(TierConfig("disk", "nvme", 1 << 30, options=opts), tmp_path)


def test_kvikio_requested_without_cuda_is_a_config_error(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="kvikio"):
        open_tier(tmp_path / "t", io_backend="kvikio")


def test_missing_or_unusable_directory_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "nvme"
    with pytest.raises(NvmeDirError, match=str(missing)):
        open_tier(missing, create_dir=False)
    afile = tmp_path / "afile"
    afile.write_bytes(b"")
    with pytest.raises(NvmeDirError, match=f"{afile} exists but is not a directory"):
        open_tier(afile)
    with pytest.raises(NvmeDirError, match=str(afile / "sub")):
        open_tier(afile / "sub")
    # From the config, the same error is a ConfigError naming the path.
    cfg = TierConfig("disk", "nvme", 1 << 30, options={"path": str(missing), "create_dir": False})
    with pytest.raises(ConfigError, match=str(missing)):
        NvmeTier.from_config(cfg, tmp_path)


_OPEN_WITHOUT_OVERRIDE = """
import sys
from pathlib import Path
from kvstore.tiers.nvme import NvmeDirError, NvmeOptions, NvmeTier
try:
    NvmeTier("nvme", 1 << 30, Path(sys.argv[1]), NvmeOptions()).close()
except NvmeDirError as exc:
    print("NvmeDirError:", exc)
    sys.exit(3)
"""


def test_unwritable_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o500)
        try:
            with pytest.raises(NvmeDirError, match=f"{d} is not writable"):
                open_tier(d)
        finally:
            d.chmod(0o700)
        return
    # Root writes through permission bits by its capability CAP_DAC_OVERRIDE: open the
    # tier in a child that runs without it (dropped from its bounding set before exec).
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    root = Path(__file__).resolve().parents[3]
    try:
        r = subprocess.run(
            [sys.executable, "-c", _OPEN_WITHOUT_OVERRIDE, str(d)],
            preexec_fn=_drop_dac_override,
            env={**os.environ, "PYTHONPATH": str(root)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.SubprocessError as exc:  # prctl refused (no CAP_SETPCAP here)
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE in a child: {exc}")
    finally:
        d.chmod(0o755)
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"{d} is not writable" in r.stdout
    assert not any(d.iterdir())  # nothing was created there


def _drop_dac_override() -> None:
    """In a forked child before exec: drop CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH
    (2) from the bounding set, so root's exec'd process lacks them."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_directory_in_use_by_another_tier(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t")
    try:
        with pytest.raises(NvmeDirError, match="in use by another process"):
            open_tier(tmp_path / "t")
    finally:
        t.close()
    open_tier(tmp_path / "t").close()  # free again once closed


def test_close_is_idempotent_and_flushes(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "t")
    put(t, key_of(1), 64 * KB)
    t.close()
    t.close()
    t = open_tier(tmp_path / "t")
    try:
        assert len(list(t.recover())) == 1
    finally:
        t.close()


@pytest.mark.gpu
def test_kvikio_backend_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("kvikio")
    t = open_tier(tmp_path / "t", io_backend="kvikio")
    try:
        assert t.stats()["io_backend"] == "kvikio"
        blocks = [put(t, key_of(i), 256 * KB) for i in range(4)]
        t.flush()
        for h, e, data in blocks:
            assert read(t, h, e) == data
    finally:
        t.close()
    t = open_tier(tmp_path / "t", io_backend="kvikio")
    try:
        assert len(list(t.recover())) == 4
    finally:
        t.close()


def test_read_many_combines_adjacent_blocks(tmp_path: Path) -> None:
    import mmap

    t = open_tier(tmp_path / "t", read_threads=2, segment_bytes=8 << 20)
    try:
        blocks = [put(t, key_of(i), 256 * KB) for i in range(12)]
        t.flush()
        bufs = [mmap.mmap(-1, 256 * KB) for _ in blocks]  # page-aligned, like the arena
        dsts = [memoryview(b) for b in bufs]
        dsts[5] = memoryview(bytearray(256 * KB + 1))[1:]  # unaligned: read on its own
        items = [(h, e, d) for (h, e, _), d in zip(blocks, dsts, strict=True)]
        before = t.stats()["read_requests"]
        assert t.read_many(items) == [None] * 12
        assert all(bytes(d) == data for d, (_, _, data) in zip(dsts, blocks, strict=True))
        assert t.stats()["read_requests"] - before <= 4  # 12 blocks in a few requests
        # A bad block inside a combined run fails alone.
        from .test_nvme_faults import _flip_byte

        _flip_byte(blocks[2][0])
        res = t.read_many(items)
        assert isinstance(res[2], ChecksumMismatch)
        assert [r for i, r in enumerate(res) if i != 2] == [None] * 11
        for d in dsts:
            d.release()
        for b in bufs:
            b.close()
    finally:
        t.close()
