"""The daemon: builds tiers and the hierarchy from the config, serves them over gRPC."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvstore import policies  # noqa: F401  (registers policies)
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.config import Config, ConfigError, TierConfig, tier_kinds
from kvstore.gc_tuning import freeze_startup, tune_gc
from kvstore.hierarchy import Hierarchy, Level
from kvstore.keys import Namespace
from kvstore.policies import ADMISSIONS, POLICIES
from kvstore.promote import Promoter
from kvstore.sessions import SessionManager
from kvstore.tiers.base import TIERS, Tier
from kvstore.tiers.dram import DramTier

if TYPE_CHECKING:
    from kvstore.server import KVStoreServicer

log = logging.getLogger("kvstore.daemon")

SERVICE_NAME = "kvstore.v1.KVStore"
_POLICY_BLOCK_HINT = 2 << 20  # typical block size, only to size policy queues
_ABORT_MARGIN_S = 1.0  # after the grace period: time for calls to end with UNAVAILABLE


# With server.tcp: pings on every connection, and how long an answer may take.
KEEPALIVE_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000


class DaemonError(RuntimeError):
    """The daemon cannot start (socket in use, unusable data directory ...)."""


def build_tiers(cfg: Config) -> list[Tier]:
    """The tiers of ``cfg``, fastest first; closes those built so far if one fails.

    Raises:
        ConfigError: an unknown kind or invalid option, naming the tier.
        DaemonError: a tier cannot get its memory or files, naming the tier.
    """
    kinds = tier_kinds()
    data_dir = Path(cfg.data_dir).expanduser()
    tiers: list[Tier] = []
    try:
        for i, t in enumerate(cfg.tiers):
            if t.kind not in kinds:  # Config.validate checks this; a hand-built Config may not
                raise ConfigError(
                    f"tiers[{i}].kind: unknown tier kind {t.kind!r}; known: {', '.join(kinds)}"
                )
            prefault = t.kind == "dram" and t.options.get("prefault", True) is True
            if t.kind == "dram":
                vm = psutil.virtual_memory()
                if t.capacity > vm.total:
                    raise _memory_error(t, "more than this machine has")
                if prefault and t.capacity > vm.available:
                    # Touching it all would take the memory from other processes (swap,
                    # or the OOM killer), slowly and without a word.
                    raise _memory_error(
                        t, "more than is available now, and it is pre-faulted at start"
                    )
            t0 = time.monotonic()
            if prefault and t.capacity >= 1 << 30:
                log.info(
                    "tier %r: pre-faulting %s of shared memory (first touch is slow; "
                    "options.prefault = false skips it)",
                    t.name,
                    _gib(t.capacity),
                )
            try:
                tiers.append(TIERS.get(t.kind).from_config(t, data_dir))
                if prefault and t.capacity >= 1 << 30:
                    log.info("tier %r: pre-faulted in %.1fs", t.name, time.monotonic() - t0)
            except OSError as exc:
                if exc.errno == errno.ENOMEM:
                    raise _memory_error(t, exc.strerror or str(exc)) from None
                raise DaemonError(f"tier {t.name!r} ({t.kind}): {exc}") from None
    except BaseException:
        for built in tiers:
            built.close()
        raise
    return tiers


def _memory_error(t: TierConfig, why: str) -> DaemonError:
    """The error for a tier whose memory cannot be allocated, with what there is."""
    vm = psutil.virtual_memory()
    return DaemonError(
        f"tier {t.name!r} ({t.kind}): cannot allocate {_gib(t.capacity)} ({why}); "
        f"{_gib(vm.available)} of memory available, {_gib(vm.total)} in all: "
        "lower its capacity (--dram, tiers.capacity)"
    )


def _gib(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):,.1f} GiB"
    return f"{n / (1 << 20):,.0f} MiB" if n >= 1 << 20 else f"{n / 1024:,.0f} KiB"


def _models_stats() -> dict[str, Any]:
    from loader import service as models_service

    return models_service.stats()


class Daemon:
    """Owns the hierarchy, sessions and namespaces; all mutated on the event loop thread."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.tiers = build_tiers(cfg)
        levels = [
            Level(
                tier,
                POLICIES.get(t.policy)(max(1, tier.capacity_bytes // _POLICY_BLOCK_HINT)),
                ADMISSIONS.get(t.admission)(max(1, tier.capacity_bytes // _POLICY_BLOCK_HINT)),
            )
            for t, tier in zip(cfg.tiers, self.tiers, strict=True)
        ]
        self.write_level = next(i for i, t in enumerate(self.tiers) if t.kind == "dram")
        self.dram: DramTier = self.tiers[self.write_level]  # type: ignore[assignment]
        self.h = Hierarchy(levels, self.write_level)
        t0 = time.monotonic()
        self.recovered = self.h.recover()
        if self.recovered:
            log.info(
                "recovered %d blocks from persistent tiers in %.2fs",
                self.recovered,
                time.monotonic() - t0,
            )
        self.sessions = SessionManager(self.h, cfg.server.lease_timeout_s)
        self.promoter = Promoter(self.h)  # Acquire/Prefetch reads from disk, off the loop
        # Registered by open sessions; dropped with the last of them (SessionManager).
        self.namespaces: dict[bytes, Namespace] = self.sessions.namespaces
        self.started = time.time()
        self.server: grpc.aio.Server | None = None
        self._servicer: KVStoreServicer | None = None
        self._stopping = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self._expire_parked: Callable[[], int] | None = None
        self._metrics_server: Any = None
        self.extra_closers: list[Any] = []

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        hs = self.h.stats()
        c = self.h.counters
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "pid": os.getpid(),
            "socket": self.cfg.server.socket,
            "hit_rate": (c.lookup_hit_blocks / c.lookup_blocks) if c.lookup_blocks else 0.0,
            "sessions": {
                "open": len(self.sessions.sessions),
                "opened_total": self.sessions.opened_total,
                "reclaimed_total": self.sessions.reclaimed_total,
                "pins": sum(sum(s.pins.values()) for s in self.sessions.sessions.values()),
                "pending_allocations": sum(len(s.allocs) for s in self.sessions.sessions.values()),
            },
            "namespaces": len(self.namespaces),
            "promoter": {  # Acquire/Prefetch reads from disk on threads (kvstore.promote)
                "in_flight": self.promoter.in_flight,
                "offloaded_total": self.promoter.offloaded,
            },
            "recovered_blocks": self.recovered,
            "models": _models_stats(),
            "gc": {  # the collector's settings and work (see kvstore.gc_tuning)
                "threshold": list(gc.get_threshold()),
                "collections": [g["collections"] for g in gc.get_stats()],
                "frozen_objects": gc.get_freeze_count(),
            },
            **hs,
        }

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        from kvstore.metrics import start_metrics_server
        from kvstore.server import KVStoreServicer

        scfg = self.cfg.server
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", scfg.max_message_bytes),
            ("grpc.max_send_message_length", scfg.max_message_bytes),
        ]
        if scfg.tcp:
            # A client whose host vanished sends no FIN: its connection, and the
            # session its Watch stream holds open (with its pins), would stay for good.
            # Ping every connection; one silent past the timeout is closed.  Only with
            # TCP: a local client that dies closes its socket, and a local one that is
            # merely stopped (a debugger) keeps its session.
            opts += [
                ("grpc.keepalive_time_ms", KEEPALIVE_MS),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),  # what grpc 1.8x enforces
                # Keep pinging a silent stream (default: 2 pings without data, then none).
                ("grpc.http2.max_pings_without_data", 0),
            ]
        server = grpc.aio.server(options=opts)
        self._servicer = KVStoreServicer(self)
        pb_grpc.add_KVStoreServicer_to_server(self._servicer, server)
        from loader import service as models_service
        from loader.config import ModelsConfig

        models_service.register(
            server,
            Path(self.cfg.data_dir),  # ~ expanded there, as `kvstore models` does
            self.cfg.models or ModelsConfig(),
            session_open=lambda sid: self.sessions.get(sid) is not None,
        )
        self.extra_closers.append(models_service.close)
        self.sessions.on_close.append(models_service.release_session)
        self.sessions.on_lost.append(lambda s: models_service.session_lost(s.id, s.pid))
        self.sessions.on_reopen.append(models_service.adopt_session)
        self._expire_parked = models_service.expire_parked
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        sock = Path(scfg.socket).expanduser()
        _prepare_socket(sock)
        server.add_insecure_port(f"unix:{sock}")
        if scfg.tcp:
            if server.add_insecure_port(scfg.tcp) == 0:
                raise DaemonError(f"cannot listen on server.tcp={scfg.tcp}")
        await server.start()
        os.chmod(sock, 0o600)
        for name in ("", SERVICE_NAME):
            await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._health = hs
        self.server = server
        if scfg.metrics_port:
            where = f"{scfg.metrics_host}:{scfg.metrics_port}"
            try:
                self._metrics_server = start_metrics_server(
                    self, scfg.metrics_host, scfg.metrics_port
                )
            except OSError as exc:
                raise DaemonError(
                    f"cannot serve metrics on {where} (server.metrics_port / --metrics-port): "
                    f"{exc.strerror or exc}"
                ) from None
        self._reaper = asyncio.create_task(self._reap_loop())
        log.info(
            "kvstore serving on unix:%s%s; tiers: %s",
            sock,
            f" and {scfg.tcp}" if scfg.tcp else "",
            ", ".join(f"{t.name}({t.kind}, {_gib(t.capacity_bytes)})" for t in self.tiers),
        )

    async def _reap_loop(self) -> None:
        period = min(1.0, self.cfg.server.lease_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            self.sessions.reap_idle()
            if self._expire_parked is not None:
                self._expire_parked()  # model pins of clients that did not come back

    async def wait(self) -> None:
        await self._stopping.wait()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        """Graceful shutdown: stop accepting, drain calls, write back, close tiers."""
        log.info("shutting down")
        if self._reaper is not None:
            self._reaper.cancel()
        if self.server is not None:
            await self._health.enter_graceful_shutdown()
            # Watch streams last as long as their clients: end them first, or the stop
            # below waits the whole grace period and then cancels them mid-await.
            if self._servicer is not None:
                self._servicer.end_watches()
            await self._stop_server(self.server, self.cfg.server.shutdown_grace_s)
        try:
            if self.promoter.in_flight:
                log.info("waiting for %d promotions in flight", self.promoter.in_flight)
            await self.promoter.drain()  # they write into the arena: finish before it closes
            self.promoter.close()
            self.sessions.close_all()
            if self.cfg.server.persist_on_shutdown:
                n = self.h.persist_all()
                log.info("persisted %d DRAM-only blocks to the persistent tier", n)
        except BaseException:
            self._release()  # the tiers close (NVMe flushed) whatever failed before
            raise
        failed = self._release()
        if failed:
            log.error("stopped; failed to close: %s", ", ".join(failed))
            raise DaemonError(f"shutdown incomplete: failed to close {', '.join(failed)}")
        log.info("stopped")

    async def _stop_server(self, server: grpc.aio.Server, grace: float) -> None:
        """Stops accepting calls; those in flight have ``grace`` seconds to complete.

        Then ours still waiting end with UNAVAILABLE (the daemon is going away: clients
        reconnect) rather than being cancelled by the server (a bare CANCELLED); the
        server cancels what is left (the model service's calls) a moment later.
        """
        stopping = asyncio.ensure_future(server.stop(grace + _ABORT_MARGIN_S))
        await asyncio.wait((stopping,), timeout=grace)
        if not stopping.done() and self._servicer is not None:
            log.info("shutdown grace period over: ending the calls still in flight")
            self._servicer.abort_waits()
        await stopping

    def _release(self) -> list[str]:
        """Closes the models service, the tiers, the metrics server and our socket;
        each runs whatever the others do.  Returns what failed to close (logged)."""
        failed: list[str] = []
        for closer in self.extra_closers:
            try:
                closer()
            except Exception:  # noqa: BLE001 - the tiers must still close
                log.exception("closing %r failed", closer)
                failed.append(repr(closer))
        failed += close_tiers(self.tiers)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        sock = Path(self.cfg.server.socket).expanduser()
        if self.server is not None and sock.is_socket():  # only a socket we bound
            sock.unlink()
        return failed


def close_tiers(tiers: Sequence[Tier]) -> list[str]:
    """Flushes and closes every tier, persistent ones first; returns those that failed.

    A persistent tier (NVMe) goes first: its queued writes are what a clean shutdown
    promises to keep, and nothing that happens to another tier may skip them.  Every
    tier's close runs even if another's raised; each failure is logged.
    """
    failed: list[str] = []
    for t in sorted(tiers, key=lambda t: not t.persistent):  # stable: config order within
        try:
            try:
                t.flush()
            finally:
                t.close()
        except Exception:  # noqa: BLE001 - the other tiers must still close
            log.exception("tier %r (%s): flush/close failed", t.name, t.kind)
            failed.append(f"tier {t.name!r}")
    return failed


def _prepare_socket(sock: Path) -> None:
    """Makes ``sock`` bindable: creates its folder, removes a stale socket.

    Raises:
        DaemonError: a daemon answers there, or the path exists and is not a socket.
    """
    try:
        sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise DaemonError(f"cannot create socket directory {sock.parent}: {exc}") from None
    if not sock.is_socket():
        if sock.exists() or sock.is_symlink():
            # Never replace a file that is not ours: a typo in --socket must not delete it.
            raise DaemonError(
                f"socket path {sock} exists and is not a socket; refusing to replace it "
                "(choose another --socket / server.socket, or remove it yourself)"
            )
        return
    if not _serving(sock):
        sock.unlink()  # stale socket of a dead daemon: the only thing we ever remove
        return
    raise DaemonError(f"another kvstore daemon is already serving at {sock}")


def _serving(sock: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``sock``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(sock))
    except OSError:
        return False
    finally:
        s.close()
    return True


async def run_daemon(cfg: Config) -> None:
    """Runs until SIGTERM/SIGINT, then shuts down gracefully."""
    tune_gc()
    sock = Path(cfg.server.socket).expanduser()
    if sock.is_socket() and _serving(sock):
        # Said before the tiers are built (pre-fault, NVMe recovery): not after, as
        # whatever the running daemon holds (its NVMe folder's lock) would fail first.
        raise DaemonError(f"another kvstore daemon is already serving at {sock}")
    try:
        d = Daemon(cfg)
    except (ConfigError, OSError) as exc:
        raise DaemonError(str(exc)) from None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, d.request_stop)
    try:
        await d.start()
        freeze_startup()
        await d.wait()
    finally:
        await d.stop()
