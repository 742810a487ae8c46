"""The client's mapping of the daemon's arena: populated at connect when small, chunk
by chunk as slots are handed out when large (so connecting to a daemon with hundreds
of GiB of DRAM neither takes seconds nor builds page tables for all of it)."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from kvstore import AsyncClient, Client
from kvstore import _wire as w
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS, blocks_for

MiB = 1 << 20


def _rss_kib(mm: mmap.mmap) -> int:
    """Resident KiB of the mapping ``mm`` in this process (from /proc/self/smaps)."""
    buf = (ctypes.c_char * len(mm)).from_buffer(mm)
    addr = ctypes.addressof(buf)
    del buf
    rows = Path("/proc/self/smaps").read_text().splitlines()
    for i, row in enumerate(rows):
        start = row.split("-", 1)[0]
        if "-" in row.split(" ", 1)[0] and int(start, 16) == addr:
            for field in rows[i + 1 :]:
                if field.startswith("Rss:"):
                    return int(field.split()[1])
    raise AssertionError("mapping not found in /proc/self/smaps")


def _arena_file(tmp_path: Path, size: int) -> str:
    path = tmp_path / "arena"
    with path.open("wb") as f:
        f.truncate(size)
    return str(path)


def test_small_arena_is_populated_at_map(tmp_path: Path) -> None:
    a = w.map_arena(_arena_file(tmp_path, 8 * MiB), 8 * MiB)
    try:
        assert not a.lazy
        assert _rss_kib(a._mm) == 8 * 1024
    finally:
        a.close()


def test_large_arena_is_populated_chunk_by_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(w, "POPULATE_AT_CONNECT_MAX", 4 * MiB)
    a = w.map_arena(_arena_file(tmp_path, 16 * MiB), 16 * MiB)
    try:
        assert a.lazy
        assert _rss_kib(a._mm) == 0
        v = a.slot(3 * MiB, 100)  # inside chunk 1
        assert _rss_kib(a._mm) == 2 * 1024
        v[:] = b"x" * 100
        a.slot(5 * MiB, 2 * MiB)  # chunks 2 and 3
        assert _rss_kib(a._mm) == 6 * 1024
        a.slot(3 * MiB + 4096, 8192)  # chunk 1 again: nothing more
        assert _rss_kib(a._mm) == 6 * 1024
        assert a.slot(0, 0).nbytes == 0 and _rss_kib(a._mm) == 6 * 1024
        assert bytes(a.slot(3 * MiB, 100)) == b"x" * 100
        v.release()
    finally:
        a.close()
    with open(os.path.join(tmp_path, "arena"), "rb") as f:  # the bytes are the file's
        f.seek(3 * MiB)
        assert f.read(100) == b"x" * 100


def test_clients_work_on_a_lazily_mapped_arena(
    daemon: DaemonProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(w, "POPULATE_AT_CONNECT_MAX", 0)  # every arena is "large"
    toks = np.arange(16 * 12)
    blocks = blocks_for(NS, toks)
    with Client(daemon.socket) as c:
        assert c._mapped().lazy
        assert c.store_tokens(NS, toks, blocks).new == 12
        with c.load_tokens(NS, toks) as lease:
            for got, want in zip(lease.arrays, blocks, strict=True):
                assert np.array_equal(got, want)

    async def go() -> None:
        c = await AsyncClient.connect(daemon.socket)
        try:
            assert c._mapped().lazy
            async with await c.load_tokens(NS, toks) as lease:
                for got, want in zip(lease.arrays, blocks, strict=True):
                    assert np.array_equal(got, want)
        finally:
            await c.close()

    asyncio.run(go())
