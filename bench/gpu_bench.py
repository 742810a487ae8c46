"""Data-movement benchmarks of kernels/ and the GPU tier, each against its own limit.

Run from the repository root::

    python -m bench.gpu_bench --cpu [--quick] [--out FILE.json]   # CPU twins, any machine
    python -m bench.gpu_bench [--quick] [--out FILE.json]         # CUDA machine

CPU mode: the torch twins of the paged gather/scatter (into one buffer and into
per-block buffers, as into arena slots) and the numpy byte-plane split/merge,
against a memcpy of the same bytes in the same run.

GPU mode (``bench/gpu_check.sh`` runs it):

* paged gather/scatter kernel (one launch, all layers) against a device-to-device
  copy of the same bytes (target >= 80 %), plus the torch twin on the GPU;
* DRAM arena -> GPU tier (``GpuTier.write`` of every block from a pinned
  shared-memory arena, and back) against one plain pinned ``cudaMemcpy`` of the
  same bytes (target >= 90 %);
* NVMe -> GPU with :func:`read_file_into_device` (kvikio when installed, and the
  bounce-buffer path) against the drive's direct read (``O_DIRECT`` into host
  memory, same threads and request size);
* byte-plane split/merge kernel against a device-to-device copy;
* model weights (issue #5): a stored model's file -> GPU memory
  (:func:`loader.gpu.load_file_to_cuda`, through kvikio when installed and through
  ``O_DIRECT`` reads into a pinned ring, both verified) against the drive's direct read,
  and a DRAM-resident model -> GPU (:func:`loader.gpu.copy_to_cuda`, what
  ``load_model(device="cuda")`` does after the daemon's load) against one pinned
  host-to-device copy of the same bytes (the link).

Every figure is a median over repetitions after a warm-up; a ratio is always
``limit time / measured time`` for the same bytes.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels import byteplane, describe_kv_caches, gather_blocks, scatter_blocks

GB = 1e9


def _median_s(fn: Callable[[], Any], reps: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _paired(
    fn: Callable[[], Any],
    base: Callable[[], Any],
    reps: int,
    sync: Callable[[], None] = lambda: None,
) -> tuple[float, float]:
    """Median seconds of ``fn`` and of its limit ``base``, runs interleaved so that a
    noisy neighbour slows both alike."""
    a: list[float] = []
    b: list[float] = []
    fn()
    base()
    sync()
    for _ in range(reps):
        for f, acc in ((fn, a), (base, b)):
            t0 = time.perf_counter()
            f()
            sync()
            acc.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def _row(
    name: str, nbytes: int, t: float, t_limit: float, limit: str, **extra: Any
) -> dict[str, Any]:
    r = {
        "name": name,
        "bytes": nbytes,
        "gbps": round(nbytes / t / GB, 3),
        "limit": limit,
        "limit_gbps": round(nbytes / t_limit / GB, 3),
        "ratio": round(t_limit / t, 3),
        **extra,
    }
    print(
        f"{name:<44} {r['gbps']:8.2f} GB/s   {limit} {r['limit_gbps']:8.2f} GB/s   "
        f"ratio {r['ratio']:.2f}",
        flush=True,
    )
    return r


def _caches(layout: str, layers: int, blocks: int, dtype: torch.dtype, device: str) -> Any:
    bt, heads, dim = 16, 8, 128
    if layout == "vllm_gpu":
        return [
            torch.empty(2, blocks, bt, heads, dim, dtype=dtype, device=device)
            for _ in range(layers)
        ]
    if layout == "flash":
        return [
            (
                torch.empty(blocks, bt, heads, dim, dtype=dtype, device=device),
                torch.empty(blocks, bt, heads, dim, dtype=dtype, device=device),
            )
            for _ in range(layers)
        ]
    buf = torch.empty(layers, blocks, heads, bt, 2 * dim, dtype=dtype, device=device)
    return list(buf.unbind(0))  # vLLM CPU: all layers in one buffer


def _fill(caches: Any) -> None:
    for item in caches:
        for t in item if isinstance(item, tuple) else (item,):
            t.view(torch.uint8).random_(0, 256)


# ---------------------------------------------------------------- CPU mode
def _cpu_layout(layout: str, layers: int, blocks: int, n: int, reps: int) -> list[dict[str, Any]]:
    caches = _caches(layout, layers, blocks, torch.bfloat16, "cpu")
    _fill(caches)
    kv = describe_kv_caches(caches, layout)
    ids = torch.randperm(blocks)[:n]
    nbytes = n * kv.block_nbytes
    out = torch.empty(n, kv.block_nbytes, dtype=torch.uint8)
    src = torch.empty_like(out).random_(0, 256)
    per = [torch.empty(kv.block_nbytes, dtype=torch.uint8) for _ in range(n)]
    shape = f"{layers}L x 16t x 8h x 128d bf16, {kv.block_nbytes >> 10} KiB/block, {n} blocks"
    out_np, src_np = out.numpy(), src.numpy()
    rows = []
    for name, fn in (
        (f"cpu gather {layout} -> buffer", lambda: gather_blocks(kv, layout, ids, out)),
        (f"cpu gather {layout} -> per-block", lambda: gather_blocks(kv, layout, ids, per)),
        (f"cpu scatter {layout} <- buffer", lambda: scatter_blocks(kv, layout, ids, out)),
        (f"cpu scatter {layout} <- per-block", lambda: scatter_blocks(kv, layout, ids, per)),
    ):
        t, t_mem = _paired(fn, lambda: np.copyto(out_np, src_np), reps)
        rows.append(_row(name, nbytes, t, t_mem, "memcpy", shape=shape))
    return rows


def run_cpu(quick: bool) -> list[dict[str, Any]]:
    layers, blocks, n = (8, 96, 48) if quick else (16, 192, 96)
    reps = 3 if quick else 7
    rows = []
    for layout in ("vllm_gpu", "flash", "vllm_cpu"):
        rows += _cpu_layout(layout, layers, blocks, n, reps)
    size = (64 if quick else 256) << 20
    vals = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    planes = np.empty_like(vals)
    back = np.empty_like(vals)
    for name, fn in (
        ("cpu byteplane split", lambda: byteplane.split(vals, planes)),
        ("cpu byteplane merge", lambda: byteplane.merge(planes, back)),
    ):
        t, t_mem = _paired(fn, lambda: np.copyto(back, vals), reps)
        rows.append(_row(name, size, t, t_mem, "memcpy"))
    return rows


# ---------------------------------------------------------------- GPU mode
def _cuda_timer(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds per call with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _gpu_layout(
    layout: str, dtype: torch.dtype, layers: int, blocks: int, n: int, reps: int
) -> list[dict[str, Any]]:
    caches = _caches(layout, layers, blocks, dtype, "cuda")
    _fill(caches)
    kv = describe_kv_caches(caches, layout)
    ids = torch.randperm(blocks, device="cuda")[:n]
    nbytes = n * kv.block_nbytes
    out = torch.empty(n, kv.block_nbytes, dtype=torch.uint8, device="cuda")
    src = torch.empty_like(out).random_(0, 256)
    t_d2d = _cuda_timer(lambda: out.copy_(src), reps)
    tag = f"{layout} {str(dtype).removeprefix('torch.')}"
    shape = f"{layers}L x 16t x 8h x 128d, {kv.block_nbytes >> 10} KiB/block, {n} blocks"
    rows = []
    for name, fn in (
        ("gather kernel", lambda: gather_blocks(kv, layout, ids, out, impl="cuda")),
        ("scatter kernel", lambda: scatter_blocks(kv, layout, ids, out, impl="cuda")),
        ("gather torch twin", lambda: gather_blocks(kv, layout, ids, out, impl="torch")),
    ):
        t = _cuda_timer(fn, reps)
        target = 0.8 if "kernel" in name else None
        rows.append(
            _row(f"gpu {name} {tag}", nbytes, t, t_d2d, "d2d copy", shape=shape, target=target)
        )
    # As an engine calls it: validation (one sync for the id range) + launch + sync.
    t = _median_s(lambda: gather_blocks(kv, layout, ids, out), reps, torch.cuda.synchronize)
    rows.append(_row(f"gpu gather kernel {tag} (wall, with checks)", nbytes, t, t_d2d, "d2d copy"))
    return rows


def bench_paged_gpu(quick: bool) -> list[dict[str, Any]]:
    layers, blocks, n = (32, 1024, 256) if quick else (32, 2048, 512)
    reps = 10 if quick else 20
    rows = []
    for layout, dtype in (
        ("vllm_gpu", torch.bfloat16),
        ("flash", torch.bfloat16),
        ("vllm_cpu", torch.bfloat16),
        ("vllm_gpu", torch.float8_e4m3fn),
    ):
        rows += _gpu_layout(layout, dtype, layers, blocks, n, reps)
        torch.cuda.empty_cache()
    return rows


def _tier_copies(arena: Any, total: int, block: int, reps: int) -> dict[str, float]:
    """Seconds to write every block of the arena into a GPU tier and to read it back,
    one ``cudaMemcpy`` per block (``write``/``read_into``) and batched on one stream
    (``write_many``/``read_many``)."""
    import cupy

    from kvstore.entry import BlockEntry
    from kvstore.tiers.gpu import GpuTier

    n = total // block
    tier = GpuTier("gpu", total, backend="cuda", slab_bytes=max(block, 64 << 20))
    e = BlockEntry(key=b"k" * 32, ns=b"n" * 32, nbytes=block, parent=None, depth=0,
                   locs=[None], kid_tops=[0])  # fmt: skip
    handles = [tier.reserve(block, e) for _ in range(n)]
    views = [arena.view[i * block : (i + 1) * block] for i in range(n)]
    items = [(h, e, v) for h, v in zip(handles, views, strict=True)]
    sync = cupy.cuda.runtime.deviceSynchronize

    def up() -> None:
        for h, _, v in items:
            tier.write(h, e, v)

    def down() -> None:
        for h, _, v in items:
            tier.read_into(h, e, v)

    try:
        return {
            "write": _median_s(up, reps, sync),
            "read_into": _median_s(down, reps, sync),
            "write_many": _median_s(lambda: tier.write_many(items), reps, sync),
            "read_many": _median_s(lambda: tier.read_many(items), reps, sync),
        }
    finally:
        for v in views:
            v.release()
        tier.close()


def bench_arena_gpu(quick: bool) -> list[dict[str, Any]]:
    import cupy
    import cupyx

    from kvstore.tiers.dram import SharedArena
    from kvstore.tiers.gpu import pin_host_memory, unpin_host_memory

    total = (1 if quick else 2) << 30
    reps = 3 if quick else 5
    sync = cupy.cuda.runtime.deviceSynchronize
    # The limit: one plain cudaMemcpy of the same bytes from / to a pinned buffer.
    host = cupyx.empty_pinned(total, dtype=np.uint8)
    host[:] = 7
    dev = cupy.empty(total, dtype=cupy.uint8)
    t_h2d = _median_s(lambda: dev.set(host), reps, sync)
    t_d2h = _median_s(lambda: dev.get(out=host), reps, sync)
    dev = host = None
    rows = []
    arena = SharedArena(total, prefault=True)
    try:
        pinned = pin_host_memory(arena.view)
        for block in (2 << 20, 8 << 20):
            t = _tier_copies(arena, total, block, reps)
            tag = f"{block >> 20} MiB blocks x {total // block}"
            for op, lim, t_lim in (
                ("write", "H2D", t_h2d),
                ("write_many", "H2D", t_h2d),
                ("read_into", "D2H", t_d2h),
                ("read_many", "D2H", t_d2h),
            ):
                direction = "arena -> gpu tier" if lim == "H2D" else "gpu tier -> arena"
                rows.append(_row(f"{direction} {op} ({tag})", total, t[op], t_lim,
                                 f"pinned cudaMemcpy {lim}", target=0.9))  # fmt: skip
        unpin_host_memory(pinned)
        # The same from the arena unpinned (pageable): what pinning buys.
        t = _tier_copies(arena, total, 8 << 20, reps)
        rows.append(_row("pageable arena -> gpu tier write_many (8 MiB)", total, t["write_many"],
                         t_h2d, "pinned cudaMemcpy H2D"))  # fmt: skip
        rows.append(_row("gpu tier -> pageable arena read_many (8 MiB)", total, t["read_many"],
                         t_d2h, "pinned cudaMemcpy D2H"))  # fmt: skip
    finally:
        arena.close()
    return rows


def _kvikio_threads(n: int) -> None:
    """Sets kvikio's thread pool size, whichever of its APIs this version has."""
    import kvikio.defaults

    for call in (
        lambda: kvikio.defaults.set({"num_threads": n}),  # 25.x: a dict of settings
        lambda: kvikio.defaults.set("num_threads", n),
        lambda: kvikio.defaults.num_threads_reset(n),  # before 25.x
    ):
        try:
            call()
            return
        except (AttributeError, TypeError):
            continue
    print("could not set kvikio's thread count; its default (1) applies", flush=True)


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _direct_read(path: str, size: int, req: int, threads: int, direct: bool = True) -> float:
    """Seconds to read ``size`` bytes with O_DIRECT, ``threads`` requests of ``req`` in flight."""
    bufs = [mmap.mmap(-1, req) for _ in range(threads)]  # page-aligned, as O_DIRECT needs
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:

        def work(k: int) -> int:
            b = bufs[k % threads]
            total = 0
            for off in range(k * req, size, threads * req):
                total += os.preadv(fd, [b], off)
            return total

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            got = sum(ex.map(work, range(threads)))
        dt = time.perf_counter() - t0
        assert got == size, (got, size)
        return dt
    finally:
        os.close(fd)
        for b in bufs:
            b.close()


def bench_nvme_gpu(quick: bool, data_dir: str | None) -> list[dict[str, Any]]:
    import cupy

    from kvstore.tiers import gpu as g

    rows = []
    size = (1 if quick else 4) << 30
    threads = 8
    with tempfile.TemporaryDirectory(dir=data_dir) as d:
        path = str(Path(d) / "segment.bin")
        chunk = os.urandom(64 << 20)
        with open(path, "wb") as f:
            for _ in range(size // len(chunk)):
                f.write(chunk)
        _drop_cache(path)
        limit = "O_DIRECT read"
        try:
            t_direct = _direct_read(path, size, 4 << 20, threads)
        except OSError as exc:  # e.g. EINVAL: the filesystem has no O_DIRECT
            print(f"O_DIRECT read failed ({exc}); limit = cold buffered read", flush=True)
            limit = "cold buffered read"
            _drop_cache(path)
            t_direct = _direct_read(path, size, 4 << 20, threads, direct=False)
        dev = cupy.empty(size, dtype=cupy.uint8)
        info = {"file": path, "threads": threads, "kvikio": g.kvikio_available()}
        if g.kvikio_available():
            import kvikio
            import kvikio.defaults

            try:
                info["kvikio_compat_mode"] = str(kvikio.defaults.is_compat_mode_preferred())
            except AttributeError:  # older kvikio
                info["kvikio_compat_mode"] = str(kvikio.defaults.compat_mode())
            _kvikio_threads(threads)
            _drop_cache(path)
            t0 = time.perf_counter()
            g.read_file_into_device(path, 0, size, dev.data.ptr, use_kvikio=True)
            t = time.perf_counter() - t0
            rows.append(_row("nvme -> gpu kvikio (cold)", size, t, t_direct, limit, **info))
            g.close_device_files()
        else:
            rows.append({"name": "nvme -> gpu kvikio", "skipped": "kvikio not installed", **info})
        _drop_cache(path)
        t0 = time.perf_counter()
        g.read_file_into_device(path, 0, size, dev.data.ptr, use_kvikio=False)
        t = time.perf_counter() - t0
        rows.append(_row("nvme -> gpu bounce buffers (cold)", size, t, t_direct, limit, **info))
        del dev
    return rows


def bench_byteplane_gpu(quick: bool) -> list[dict[str, Any]]:
    import cupy

    size = (256 if quick else 1024) << 20
    a = cupy.random.randint(0, 256, size, dtype=cupy.uint8)
    b = cupy.empty_like(a)
    c = cupy.empty_like(a)
    sync = cupy.cuda.runtime.deviceSynchronize
    t_d2d = _median_s(lambda: c.__setitem__(slice(None), a), 10, sync)
    return [
        _row(
            "gpu byteplane split",
            size,
            _median_s(lambda: byteplane.split(a, b), 10, sync),
            t_d2d,
            "d2d copy",
        ),
        _row(
            "gpu byteplane merge",
            size,
            _median_s(lambda: byteplane.merge(b, c), 10, sync),
            t_d2d,
            "d2d copy",
        ),
    ]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bytes, not values: random bf16 bit patterns include NaNs, never equal to themselves.
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _pinned_h2d_s(nbytes: int, dev: torch.device) -> float:
    """Median seconds of one pinned host-to-device copy of ``nbytes`` (the link)."""
    flat = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    return _median_s(lambda: dst.copy_(flat, non_blocking=True), 5, torch.cuda.synchronize)


def bench_models_gpu(quick: bool, data_dir: str | None) -> list[dict[str, Any]]:
    from safetensors.torch import save_file

    from bench.weight_swap import transformer_tensors
    from loader.gpu import copy_to_cuda, load_file_to_cuda
    from loader.store import ModelStore

    dev = torch.device("cuda")
    ref = transformer_tensors((256 if quick else 2048) << 20, 2048, seed=0)
    nbytes = sum(t.numel() * t.element_size() for t in ref.values())
    rows = []
    with tempfile.TemporaryDirectory(dir=data_dir) as d:
        src = Path(d) / "model.safetensors"
        save_file(ref, str(src))
        with ModelStore(Path(d) / "store") as store:
            m = store.add("m", src)
            path = str(store.data_path(m))
            src.unlink()
            _drop_cache(path)
            t_direct = _direct_read(path, m.nbytes, 8 << 20, 8)
            from kvstore.tiers.gpu_util import kvikio_available

            paths = [("pinned ring", False)] + ([("kvikio", True)] if kvikio_available() else [])
            if kvikio_available():
                # kvikio's own pool has 1 thread by default: as many as the ring path has.
                _kvikio_threads(8)
            for label, kv in paths:
                times = []
                for _ in range(2 if quick else 3):
                    _drop_cache(path)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    got = load_file_to_cuda(path, m, dev, use_kvikio=kv)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    bad = [k for k, v in ref.items() if not _same_bytes(got[k].cpu(), v)]
                    assert not bad, f"wrong bytes in {bad[:3]}"
                    del got
                rows.append(
                    _row(
                        f"model file -> gpu ({label}, verified)",
                        m.nbytes,  # the data file, padding included: what both reads read
                        statistics.median(times),
                        t_direct,
                        "O_DIRECT read",
                        tensors=len(ref),
                        samples_s=[round(t, 4) for t in times],
                    )
                )
            if len(paths) == 1:
                rows.append({"name": "model file -> gpu (kvikio)", "skipped": "no kvikio"})
    # DRAM-resident model (pageable host memory, like the daemon's arena) -> GPU.
    t_link = _pinned_h2d_s(nbytes, dev)
    t_copy = _median_s(lambda: copy_to_cuda(ref, dev), 3, torch.cuda.synchronize)
    out = copy_to_cuda(ref, dev)
    assert all(_same_bytes(out[k].cpu(), v) for k, v in ref.items())
    rows.append(
        _row("resident model -> gpu (copy_to_cuda)", nbytes, t_copy, t_link, "pinned H2D copy")
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.gpu_bench", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--cpu", action="store_true", help="CPU twins only (no GPU needed)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--data-dir", help="folder on the NVMe drive for the NVMe -> GPU file")
    ap.add_argument(
        "--only",
        help="GPU sections to run, comma-separated: paged,arena,nvme,byteplane,models",
    )
    args = ap.parse_args(argv)
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "mode": "cpu" if args.cpu else "gpu",
        "torch_threads": torch.get_num_threads(),
    }
    results: dict[str, Any] = {"meta": meta, "rows": [], "errors": {}}
    if args.cpu:
        results["rows"] = run_cpu(args.quick)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --cpu", file=sys.stderr)
            return 2
        meta["gpu"] = torch.cuda.get_device_name()
        sections: dict[str, Callable[[], list[dict[str, Any]]]] = {
            "paged": lambda: bench_paged_gpu(args.quick),
            "arena": lambda: bench_arena_gpu(args.quick),
            "nvme": lambda: bench_nvme_gpu(args.quick, args.data_dir),
            "byteplane": lambda: bench_byteplane_gpu(args.quick),
            "models": lambda: bench_models_gpu(args.quick, args.data_dir),
        }
        wanted = args.only.split(",") if args.only else list(sections)
        for name in wanted:
            print(f"== {name}", flush=True)
            try:
                results["rows"].extend(sections[name]())
            except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
                results["errors"][name] = f"{type(exc).__name__}: {exc}"
                print(f"section {name} failed: {exc!r}", file=sys.stderr, flush=True)
            if args.out:  # write after each section: a timeout keeps what was measured
                Path(args.out).write_text(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
