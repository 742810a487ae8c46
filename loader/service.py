"""The ``Models`` gRPC service: load, list, swap, prefetch and release models.

The daemon calls :func:`register` once at start and :func:`close` at shutdown (and
:func:`release_session` when a session ends, so its pins go).  ``python -m
loader.service`` runs a daemon that serves only this service (tests, the benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.config import ConfigError, parse_size
from loader.config import ModelsConfig
from loader.errors import ModelError, ModelStoreError
from loader.paths import user_path
from loader.residency import READY, ResidencyManager, Resident
from loader.store import ModelStore

T = TypeVar("T")
log = logging.getLogger(__name__)


class ModelsServicer(pb_grpc.ModelsServicer):
    """Serves the model store of one data directory.

    Blocking work (reads, waiting for a load) runs on worker threads so the event
    loop keeps serving other calls (KV traffic included) while a model loads.
    """

    def __init__(
        self,
        data_dir: Path,
        options: ModelsConfig,
        session_open: Callable[[int], bool] | None = None,
    ) -> None:
        self.store = ModelStore(data_dir)
        # In the daemon: whether a session id is open.  A pin taken for a session that
        # is not (closed, expired, or from before a daemon restart) would never be
        # released, so such calls fail as the KV verbs do.  None (the Models-only
        # daemon): no sessions, any id is taken as given.  Session 0 is anonymous.
        self.session_open = session_open
        self.manager = ResidencyManager(self.store, options)
        self._tensor_cache: dict[str, list[pb.ModelTensor]] = {}
        # Our own threads: a call waiting for a multi-second load must not take one
        # of the event loop's default executor threads (the KV path uses those).
        self._pool = ThreadPoolExecutor(32, thread_name_prefix="models-rpc")

    async def _run(self, context: grpc.aio.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except ModelError as exc:
            await context.abort(exc.code, str(exc))
            raise AssertionError("unreachable") from exc  # abort raises

    async def _in_session(
        self, context: grpc.aio.ServicerContext, sid: int, fn: Callable[[], T]
    ) -> T:
        """Runs ``fn`` (which may pin for session ``sid``) if that session is open, and
        drops what it pinned if the session ended while it ran (its pins went then)."""
        known = self.session_open
        if known is None or sid == 0:
            return await self._run(context, fn)
        if not known(sid):
            await context.abort(grpc.StatusCode.NOT_FOUND, _unknown_session(sid))

        def settle(done: asyncio.Future[T]) -> None:
            # On the event loop, where sessions end, once ``fn`` has returned: a pin
            # it took after the session ended (its pins were dropped then) goes now.
            # Also when this call was cancelled meanwhile (a client that dies while
            # its call runs cancels it as its session ends): the worker thread runs
            # ``fn`` to the end regardless, and nobody else would drop that pin.
            if not done.cancelled():
                done.exception()  # retrieved (a cancelled call never awaits it)
            if not known(sid):
                self.manager.release_session(sid)

        work = asyncio.get_running_loop().run_in_executor(self._pool, fn)
        work.add_done_callback(settle)
        try:
            # Shielded: cancelling this call must not hide when ``fn`` really ends.
            out = await asyncio.shield(work)
        except ModelError as exc:
            await context.abort(exc.code, str(exc))
            raise AssertionError("unreachable") from exc  # abort raises
        if not known(sid):
            self.manager.release_session(sid)
            await context.abort(grpc.StatusCode.NOT_FOUND, _unknown_session(sid))
        return out

    def _response(self, r: Resident, was_resident: bool) -> pb.LoadModelResponse:
        m = r.manifest
        tensors = self._tensor_cache.get(m.uid)
        if tensors is None:
            tensors = [
                pb.ModelTensor(
                    name=t.name,
                    dtype=t.dtype,
                    shape=list(t.shape),
                    offset=t.offset,
                    nbytes=t.nbytes,
                    checksum=t.checksum,
                )
                for t in m.tensors
            ]
            if len(self._tensor_cache) >= 256:  # models come and go; keep it bounded
                self._tensor_cache.clear()
            self._tensor_cache[m.uid] = tensors
        return pb.LoadModelResponse(
            name=m.name,
            uid=m.uid,
            shm_path=str(self.manager.arena.path),
            shm_offset=r.offset,
            nbytes=m.nbytes,
            tensors=tensors,
            was_resident=was_resident and r.state == READY,
            load_seconds=r.load_seconds,
            direct_io=bool(r.read and r.read.direct),
            state=r.state,
            load_id=r.load_id,
        )

    def _acquire(self, request: pb.LoadModelRequest) -> pb.LoadModelResponse:
        before = self.manager.resident(request.name)
        r = self.manager.acquire(
            request.name,
            request.session_id,
            pin=not request.no_pin,
            wait=not request.no_wait,
            load_id=request.wait_load_id,
        )
        return self._response(r, before is r)

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        if request.no_pin:
            return await self._run(context, lambda: self._acquire(request))
        return await self._in_session(context, request.session_id, lambda: self._acquire(request))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        def run() -> pb.ListModelsResponse:
            stats = self.manager.stats()
            return pb.ListModelsResponse(
                models=[
                    pb.ModelInfo(
                        name=m["name"],
                        nbytes=m["nbytes"],
                        tensor_bytes=m["tensor_bytes"],
                        num_tensors=m["num_tensors"],
                        state=m["state"],
                        pins=m["pins"],
                        source=m["source"],
                    )
                    for m in self.manager.models()
                ],
                dram_budget=stats["dram_budget"],
                dram_used=stats["dram_used"],
            )

        return await self._run(context, run)

    async def SwapModels(
        self, request: pb.SwapModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SwapModelsResponse:
        def run() -> pb.SwapModelsResponse:
            before = self.manager.resident(request.new_name)
            r, released = self.manager.swap(request.session_id, request.old_name, request.new_name)
            return pb.SwapModelsResponse(
                model=self._response(r, before is r), released_pins=released
            )

        return await self._in_session(context, request.session_id, run)

    async def PrefetchModel(
        self, request: pb.PrefetchModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefetchModelResponse:
        r = await self._run(context, lambda: self.manager.prefetch(request.name))
        return pb.PrefetchModelResponse(state=r.state)

    async def ReleaseModel(
        self, request: pb.ReleaseModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseModelResponse:
        def run() -> pb.ReleaseModelResponse:
            n = self.manager.release(request.name, request.session_id)
            evicted = self.manager.evict(request.name) if request.evict else False
            return pb.ReleaseModelResponse(released_pins=n, evicted=evicted)

        return await self._in_session(context, request.session_id, run)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.manager.close()
        self.store.close()


def _unknown_session(sid: int) -> str:
    # Worded as the KV service's, so clients treat it alike (reconnect and retry).
    return (
        f"unknown session {sid}: it was closed, expired or never opened "
        "(the daemon may have restarted); open a new session"
    )


_servicer: ModelsServicer | None = None


class UnavailableModels(pb_grpc.ModelsServicer):
    """Stands in when the model store cannot be opened at start (a full disk, say):
    the KV service runs on, and every Models call says why weights are unavailable."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def _fail(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION, f"model weights are unavailable: {self.reason}"
        )

    LoadModel = ListModels = SwapModels = PrefetchModel = ReleaseModel = _fail


def register(
    server: grpc.aio.Server,
    data_dir: Path,
    options: ModelsConfig,
    session_open: Callable[[int], bool] | None = None,
) -> None:
    """Adds the Models service to ``server`` (call once, before ``server.start()``).

    ``session_open`` says whether a session id is open (the daemon's sessions): pins
    are only taken for open sessions.  Without it any session id is accepted.

    When the model store cannot be opened (``ModelStoreError``: no room for its index,
    an unreadable folder), the service answers every call with that reason instead,
    and the daemon keeps serving KV blocks."""
    global _servicer
    if _servicer is not None:
        raise RuntimeError("the Models service is already registered in this process")
    try:
        _servicer = ModelsServicer(user_path(data_dir), options.validate(), session_open)
    except ModelStoreError as exc:
        log.warning("model weights unavailable: %s", exc)
        pb_grpc.add_ModelsServicer_to_server(UnavailableModels(str(exc)), server)
        return
    pb_grpc.add_ModelsServicer_to_server(_servicer, server)


def servicer() -> ModelsServicer | None:
    """The registered servicer (for stats and tests), or None."""
    return _servicer


def release_session(session_id: int) -> int:
    """Drops the model pins of a session that ended; returns how many."""
    return _servicer.manager.release_session(session_id) if _servicer is not None else 0


def session_lost(session_id: int, pid: int) -> int:
    """A session ended without closing (broken Watch stream, expired lease): parks its
    model pins for ``models.pin_grace_s`` so its client can take them over when it
    reconnects, unless its process ``pid`` is known to be gone (then they go now).
    Returns how many pins were parked."""
    if _servicer is None:
        return 0
    m = _servicer.manager
    grace = m.config.pin_grace_s
    if grace <= 0 or not _process_may_live(pid):
        return 0  # the on_close hook (release_session) drops them
    # A killed client's socket closes while its process is still exiting: it may look
    # alive here and be gone a moment later; expire_parked looks again.
    return m.park_session(session_id, time.monotonic() + grace, pid)


def _process_may_live(pid: int) -> bool:
    """False only when no process ``pid`` exists here.  The pid is the client's own
    report, from its pid namespace (a client in another container may name an
    unrelated process here): a live one only delays the release by the grace period."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purpose
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True


def adopt_session(old: int, new: int) -> list[str]:
    """Moves the parked model pins of session ``old`` to ``new``; returns the models."""
    return _servicer.manager.adopt(old, new) if _servicer is not None else []


def expire_parked() -> int:
    """Drops parked model pins past their grace period, and those of clients whose
    process is gone by now (the daemon calls this often)."""
    if _servicer is None:
        return 0
    return _servicer.manager.expire_parked(alive=_process_may_live)


def stats() -> dict[str, Any]:
    """The residency statistics (for the daemon's Stats document)."""
    return _servicer.manager.stats() if _servicer is not None else {}


def close() -> None:
    """Releases the arena and the index (call after the server stopped)."""
    global _servicer
    if _servicer is not None:
        _servicer.close()
        _servicer = None


# ---------------------------------------------------------------------- standalone
async def _serve(args: argparse.Namespace) -> None:
    options = ModelsConfig(
        dram_budget=parse_size(args.dram_budget, "--dram-budget") if args.dram_budget else 0,
        prefault=not args.no_prefault,
        direct_io=not args.buffered,
        verify_checksums=not args.no_verify,
    )
    server = grpc.aio.server()
    register(server, user_path(args.data_dir), options)
    server.add_insecure_port(f"unix://{args.socket}")
    await server.start()
    if args.wait_prefault and _servicer is not None:
        await asyncio.to_thread(_servicer.manager.wait_ready)
    # The arena's contiguity once pre-faulted (-1: unknown), for the benchmarks.
    st = _servicer.manager.stats() if _servicer is not None else {}
    runs, again = st.get("arena_runs_per_4mib", -1), st.get("prefault_retries", 0)
    print(f"ready {args.socket} arena_runs_per_4mib={runs} prefault_retries={again}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    close()


def main(argv: list[str] | None = None) -> int:
    """``python -m loader.service --data-dir D --socket S``: a Models-only daemon."""
    p = argparse.ArgumentParser(prog="python -m loader.service", description=main.__doc__)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--dram-budget", default="", help="e.g. 4GiB (default: auto)")
    p.add_argument("--no-prefault", action="store_true")
    p.add_argument("--buffered", action="store_true", help="no O_DIRECT")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the per-tensor checksums on load (diagnosis only: corrupt data goes unnoticed)",
    )
    p.add_argument("--wait-prefault", action="store_true", help="print 'ready' after prefault")
    args = p.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except (ConfigError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
