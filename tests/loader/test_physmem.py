"""Scattered free pages kept out of the model arena (loader/physmem.py)."""

from __future__ import annotations

import mmap
from pathlib import Path

import psutil
import pytest

from loader.arena import ModelArena
from loader.physmem import (
    MADV_POPULATE_WRITE,
    contiguous_runs,
    run_count,
    small_free_bytes,
    soak_limit,
    soaked_small_blocks,
)

BUDDYINFO = """\
Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3
Node 0, zone    DMA32      2      3      0      2      3      2      1      4      4      2    752
Node 0, zone   Normal   8702   4816   5015   4643   3725   2404   1811   1330    731    681   3199
Node 1, zone   Normal     10      0      0      0      0      0      0      0      0      0      1
"""
PAGE = mmap.PAGESIZE


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "buddyinfo"
    p.write_text(text)
    return p


def test_small_free_bytes_sums_low_orders_of_every_zone(tmp_path: Path) -> None:
    info = _write(tmp_path, BUDDYINFO)
    want = sum(
        n * (PAGE << o)
        for counts in ([0, 0, 0, 0], [2, 3, 0, 2], [8702, 4816, 5015, 4643], [10, 0, 0, 0])
        for o, n in enumerate(counts)
    )
    assert small_free_bytes(3, info) == want
    assert small_free_bytes(0, info) == (2 + 8702 + 10) * PAGE


@pytest.mark.parametrize("text", ["", "garbage\n", "Node 0, zone Normal x y z\n", "Node 0, zone\n"])
def test_small_free_bytes_tolerates_odd_files(tmp_path: Path, text: str) -> None:
    assert small_free_bytes(3, _write(tmp_path, text)) == 0


def test_small_free_bytes_without_the_file(tmp_path: Path) -> None:
    assert small_free_bytes(3, tmp_path / "missing") == 0


def test_soak_holds_at_most_the_limit_and_gives_it_back(tmp_path: Path) -> None:
    info = _write(tmp_path, "Node 0, zone   Normal   4096   0   0   0\n")  # 16 MiB
    rss0 = psutil.Process().memory_info().rss
    with soaked_small_blocks(8 << 20, buddyinfo=info) as held:
        assert held == 8 << 20  # the limit, not the 16 MiB free
        grown = psutil.Process().memory_info().rss - rss0
        assert grown >= (8 << 20) * 0.9  # really faulted in, not just reserved
    assert psutil.Process().memory_info().rss - rss0 < 2 << 20
    with soaked_small_blocks(1 << 30, buddyinfo=info) as held:
        assert held == 4096 * PAGE
    with soaked_small_blocks(0, buddyinfo=info) as held:
        assert held == 0


def test_soak_is_released_when_the_block_raises(tmp_path: Path) -> None:
    info = _write(tmp_path, "Node 0, zone   Normal   4096   0   0   0\n")
    rss0 = psutil.Process().memory_info().rss
    with pytest.raises(RuntimeError), soaked_small_blocks(16 << 20, buddyinfo=info):
        raise RuntimeError("boom")
    assert psutil.Process().memory_info().rss - rss0 < 2 << 20


def test_arena_prefault_covers_every_page(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    arena = ModelArena(shm, 200 << 20, prefault=True)
    try:
        assert arena.wait_prefaulted(60)
        assert arena.prefaulted == arena.size
        # A small arena (< 256 MiB) holds aside at most twice its size.
        assert 0 <= arena.soaked <= 2 * arena.size
        # Every page is resident (populated from the top down, in 64 MiB steps): the
        # arena's own mapping, not the process (torch alone makes it 200 MiB).
        assert _mapped_rss(arena.path) == arena.size
    finally:
        arena.close()


def _mapped_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, ours = 0, False
    for row in Path("/proc/self/smaps").read_text().splitlines():
        head = row.split(maxsplit=5)
        if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
            ours = len(head) == 6 and head[5] == str(path)
        elif ours and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def test_soak_goes_on_without_when_the_kernel_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holding pages aside is an optimisation: a refused mapping or populate means
    nothing is held, never an error (and never a page-by-page touch)."""
    import loader.physmem as pm

    info = _write(tmp_path, "Node 0, zone   Normal   4096   0   0   0\n")

    def refuse(*a: object, **k: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(pm.mmap, "mmap", refuse)
    with soaked_small_blocks(8 << 20, buddyinfo=info) as held:
        assert held == 0


def test_one_cpu_pins_the_thread_and_restores_it() -> None:
    import os
    import threading

    from loader.physmem import one_cpu

    tid = threading.get_native_id()
    before = os.sched_getaffinity(tid)
    with one_cpu() as cpu:
        assert cpu in before
        assert os.sched_getaffinity(tid) == {cpu}
    assert os.sched_getaffinity(tid) == before
    with pytest.raises(RuntimeError), one_cpu():
        raise RuntimeError("boom")
    assert os.sched_getaffinity(tid) == before


def test_run_count_counts_runs_of_consecutive_frames() -> None:
    assert run_count([]) == 0
    assert run_count([7]) == 1
    assert run_count([5, 6, 7, 8]) == 1
    assert run_count([5, 6, 100, 101, 3]) == 3
    assert run_count([9, 8, 7]) == 3  # descending frames are not one run


def test_contiguous_runs_of_a_real_mapping(tmp_path: Path) -> None:
    buf = mmap.mmap(-1, 8 << 20)
    try:
        buf.madvise(MADV_POPULATE_WRITE)
        runs = contiguous_runs(buf)
        if runs is None:  # unprivileged: the kernel shows no frames, the answer is unknown
            pytest.skip("/proc/self/pagemap shows no page frames here (not root)")
        assert 1 <= runs <= (4 << 20) // PAGE
        # A pagemap that reads short, or zeros (what an unprivileged read gives): None.
        short = tmp_path / "short"
        short.write_bytes(b"")
        assert contiguous_runs(buf, pagemap=str(short)) is None
        # (a sparse file: zeros at the mapping's offset, nothing stored)
        zeros = tmp_path / "zeros"
        with open(zeros, "wb") as f:
            f.truncate(1 << 40)  # past any user address / 4 KiB * 8 (2**47 / 2**9)
        assert contiguous_runs(buf, pagemap=str(zeros)) is None
        assert contiguous_runs(buf, pagemap=str(tmp_path / "missing")) is None
    finally:
        buf.close()  # the probe left no export behind: close() does not raise


def test_arena_reports_its_contiguity(tmp_path: Path) -> None:
    arena = ModelArena(str(tmp_path), 8 << 20, prefault=True)
    try:
        assert arena.wait_prefaulted(30)
        if arena.runs_per_4mib is None:
            pytest.skip("/proc/self/pagemap shows no page frames here (not root)")
        assert 1 <= arena.runs_per_4mib <= (4 << 20) // PAGE
    finally:
        arena.close()


def test_soak_limit_is_every_small_block_up_to_a_quarter_of_available(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import loader.physmem as pm

    class VM:
        available = 16 << 30

    monkeypatch.setattr(pm.psutil, "virtual_memory", lambda: VM)
    # Not a multiple of the buffer: a 1 GiB arena may hold aside 4 GiB of small blocks.
    assert soak_limit(1 << 30) == 4 << 30
    assert soak_limit(64 << 30) == 4 << 30
    # A small buffer (a test's, a tiny config's) holds at most twice its size.
    assert soak_limit(8 << 20) == 16 << 20
    assert soak_limit(255 << 20) == 510 << 20
    assert soak_limit(256 << 20) == 4 << 30
    VM.available = 8 << 20
    assert soak_limit(8 << 20) == 2 << 20


def _scattered_then(monkeypatch: pytest.MonkeyPatch, later: int) -> list[int]:
    """contiguous_runs reports a scattered arena first, then ``later``; returns the calls."""
    import loader.arena as arena_mod

    calls: list[int] = []

    def runs(buf: mmap.mmap) -> int:
        calls.append(len(buf))
        return arena_mod.SCATTERED_RUNS * 4 if len(calls) == 1 else later

    monkeypatch.setattr(arena_mod, "contiguous_runs", runs)
    return calls


def test_scattered_unused_arena_is_faulted_in_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loader.arena as arena_mod

    calls: list[int] = []

    def runs(buf: mmap.mmap) -> int:
        calls.append(len(buf))
        if len(calls) == 1:  # mark every page: the give-back must drop them all
            for p in range(0, len(buf), PAGE):
                buf[p] = 0xA5
            return arena_mod.SCATTERED_RUNS * 4
        return 6

    monkeypatch.setattr(arena_mod, "contiguous_runs", runs)
    arena = ModelArena(str(tmp_path), 16 << 20, prefault=True)
    try:
        assert arena.wait_prefaulted(60)
        assert len(calls) == 2 and arena.refaults == 1
        assert arena.runs_per_4mib == 6
        assert arena.prefaulted == arena.size
        assert _mapped_rss(arena.path) == arena.size  # every page faulted in again
        v = arena.view(0, arena.size)
        try:
            assert not any(v[::PAGE])  # the marked pages were given back: fresh zeros
        finally:
            v.release()
    finally:
        arena.close()


def test_refault_is_tried_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loader.arena as arena_mod

    calls = _scattered_then(monkeypatch, later=arena_mod.SCATTERED_RUNS * 4)
    arena = ModelArena(str(tmp_path), 8 << 20, prefault=True)
    try:
        assert arena.wait_prefaulted(60)
        assert len(calls) == 2 and arena.refaults == 1
        assert arena.runs_per_4mib == arena_mod.SCATTERED_RUNS * 4  # reported as it is
    finally:
        arena.close()


def test_arena_in_use_is_never_given_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load that got an extent before the check keeps its bytes: no second pass."""
    import threading

    import loader.arena as arena_mod

    lock = threading.Lock()
    box: list[ModelArena] = []
    ready = threading.Event()
    calls: list[int] = []

    def runs(buf: mmap.mmap) -> int:
        ready.wait(10)
        a = box[0]
        with lock:  # a load, as the residency manager does it: under its lock
            off = a.allocator.alloc(1 << 20)
        assert off is not None
        v = a.view(off, 1 << 20)
        v[:] = b"\x5a" * (1 << 20)
        v.release()
        calls.append(off)
        return arena_mod.SCATTERED_RUNS * 4

    monkeypatch.setattr(arena_mod, "contiguous_runs", runs)
    arena = ModelArena(str(tmp_path), 8 << 20, prefault=True, alloc_lock=lock)
    box.append(arena)
    ready.set()
    try:
        assert arena.wait_prefaulted(60)
        assert len(calls) == 1 and arena.refaults == 0
        v = arena.view(calls[0], 1 << 20)
        try:
            assert bytes(v) == b"\x5a" * (1 << 20)
        finally:
            v.release()
    finally:
        arena.close()
