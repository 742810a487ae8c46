"""The ``kvstore`` command: ``serve``, ``stats``, ``bench`` (and ``models`` from loader)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from kvstore.config import (
    Config,
    ConfigError,
    TierConfig,
    check_log_level,
    default_nvme_bytes,
    load_config,
    parse_size,
)
from kvstore.errors import KVStoreError

CONFIG_HELP = """\
Configuration (TOML, --config FILE); flags override the file.  Every field:

  data_dir = "~/.local/share/kvstore"   # persistent tiers and model store live here

  [server]
  socket = "$XDG_RUNTIME_DIR/kvstore/kvstore.sock"  # Unix socket (default /tmp/kvstore-UID/...)
  tcp = ""                 # "127.0.0.1:50051" to also listen on TCP (off by default)
  metrics_port = 0         # Prometheus /metrics port; 0 = off
  metrics_host = "127.0.0.1"
  log_level = "info"       # debug | info | warning | error
  lease_timeout_s = 10.0   # a session with no Watch stream, idle this long, is reclaimed
  max_keys_per_request = 65536
  max_message_bytes = 67108864
  shutdown_grace_s = 5.0   # SIGTERM: seconds to let calls in flight finish
  persist_on_shutdown = false  # SIGTERM: write DRAM-only blocks to the persistent tier

  # Without a [[tiers]] table: dram (1/8 of available memory) over nvme (1/4 of the
  # free disk, 1-64 GiB) in DATA_DIR/nvme.
  [[tiers]]                # ordered, fastest first; exactly one kind = "dram" (the arena)
  name = "dram"
  kind = "dram"            # dram | cxl | nvme | gpu (see `kvstore serve --list-kinds`)
  capacity = "2GiB"        # default: 1/8 of available memory, 256 MiB..4 GiB
  policy = "lru"           # eviction policy (see --list-policies)
  admission = "always"     # admission policy for blocks demoted into this tier
  options = { slab_bytes = "64MiB", prefault = true }   # kind-specific

  [[tiers]]
  name = "nvme"
  kind = "nvme"
  capacity = "64GiB"
  options = { path = "/mnt/nvme/kvstore" }

  cxl options: numa_node (required), slab_bytes, prefault.
  nvme options: path, compression ("off" | "byteplane-zstd"), ... (docs/nvme.md).

  [models]                 # model-weight store (`kvstore models add NAME PATH`)
  dram_budget = 0          # bytes of DRAM for resident models; 0 = 1/4 of available
  shm_dir = "/dev/shm"     # where the resident-model arena file lives (a tmpfs)
  prefault = true          # touch the model arena up front (first touch is slow)
  policy = "lru"           # eviction among unpinned resident models
  ring_buffers = 8         # read ring (bounds loader memory for non-DRAM targets)
  ring_buffer_bytes = 8388608
  max_inflight = 64        # direct reads in flight
  io_threads = 64
  direct_io = true
  verify_checksums = true
  pin_grace_s = 30.0       # a disconnected client's model pins wait this long for its reconnect
"""


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the daemon",
        description="Run the kvstore daemon (embedded defaults work on a laptop).",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--socket", help="Unix socket path (server.socket)")
    p.add_argument("--tcp", help="also listen on HOST:PORT (server.tcp)")
    p.add_argument("--data-dir", help="data directory (data_dir)")
    p.add_argument("--dram", help="DRAM arena capacity, e.g. 2GiB (tiers.dram.capacity)")
    p.add_argument("--nvme", help="NVMe tier capacity, e.g. 64GiB (adds the tier if missing)")
    p.add_argument("--no-nvme", action="store_true", help="run with no NVMe tier (DRAM only)")
    p.add_argument("--nvme-path", help="folder of the NVMe tier (default DATA_DIR/nvme)")
    p.add_argument("--policy", help="eviction policy of every tier")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (server.metrics_port)")
    p.add_argument("--log-level", help="debug | info | warning | error")
    p.add_argument(
        "--lib-log-level",
        help="log level of third-party libraries (grpc, asyncio); default: warning, "
        "or --log-level when that is higher",
    )
    p.add_argument(
        "--persist-on-shutdown",
        action="store_true",
        default=None,
        help="on SIGTERM, write DRAM-only blocks to the persistent tier",
    )
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    p.add_argument("--list-policies", action="store_true", help="list eviction/admission policies")
    p.add_argument(
        "--list-kinds", action="store_true", help="list tier kinds and eviction/admission policies"
    )
    p.set_defaults(func=_cmd_serve)


def _policy_lines() -> list[str]:
    from kvstore.policies import ADMISSIONS, DEFAULT_POLICY, POLICIES

    return [
        f"eviction policies: {', '.join(POLICIES.names())} (default {DEFAULT_POLICY})",
        f"admission policies: {', '.join(ADMISSIONS.names())}",
    ]


def _kind_lines() -> list[str]:
    """One line per tier kind (``tiers[].kind``) with its summary, then the policies."""
    from kvstore.config import tier_kinds
    from kvstore.tiers.base import TIERS

    lines = ["tier kinds:"]
    for kind in tier_kinds():
        doc = (TIERS.get(kind).__doc__ or "").strip().splitlines()
        summary = doc[0].split(".  ")[0].rstrip(".") + "." if doc else ""
        lines.append(f"  {kind:<6} {summary}".rstrip())
    return lines + _policy_lines()


def build_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    s = cfg.server
    if args.socket:
        s.socket = args.socket
    if args.tcp:
        s.tcp = args.tcp
    if args.metrics_port is not None:
        s.metrics_port = args.metrics_port
    if args.log_level:
        s.log_level = args.log_level
    if args.persist_on_shutdown:
        s.persist_on_shutdown = True
    if args.data_dir:
        cfg.data_dir = args.data_dir
    if args.dram:
        dram = next(t for t in cfg.tiers if t.kind == "dram")
        dram.capacity = parse_size(args.dram, "--dram")
    if args.no_nvme:
        if args.nvme or args.nvme_path:
            raise ConfigError("--no-nvme contradicts --nvme / --nvme-path: give one or the other")
        cfg.tiers = [t for t in cfg.tiers if t.kind != "nvme"]
    elif args.nvme or args.nvme_path:
        old = next((t for t in cfg.tiers if t.kind == "nvme"), None)
        opts = dict(old.options) if old else {}
        if args.nvme_path:
            opts["path"] = args.nvme_path
        if args.nvme:
            cap = parse_size(args.nvme, "--nvme")
        else:
            cap = old.capacity if old else default_nvme_bytes()
        keep = {"policy": old.policy, "admission": old.admission} if old else {}
        cfg.tiers = [t for t in cfg.tiers if t.kind != "nvme"]
        cfg.tiers.append(TierConfig("nvme", "nvme", cap, options=opts, **keep))
    if args.policy:
        for t in cfg.tiers:
            t.policy = args.policy
    return cfg.validate()


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvstore.daemon import DaemonError, run_daemon

    if args.list_kinds:
        print("\n".join(_kind_lines()))
        return 0
    if args.list_policies:
        print("\n".join(_policy_lines()))
        return 0
    cfg = build_config(args)
    if args.print_config:
        import dataclasses

        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    if args.lib_log_level:
        check_log_level(args.lib_log_level, "--lib-log-level")
    setup_logging(cfg.server.log_level, args.lib_log_level)
    try:
        asyncio.run(run_daemon(cfg))
    except DaemonError as exc:
        print(f"kvstore serve: {exc}", file=sys.stderr)
        return 2
    return 0


LIB_LOGGERS = ("grpc", "asyncio")
"""Third-party loggers kept quiet: at debug they log every poll of the event loop."""


def setup_logging(level: str, lib_level: str | None = None) -> None:
    """The daemon's log format at ``level``; :data:`LIB_LOGGERS` at ``lib_level``
    (default: warning, or ``level`` when that is higher)."""
    root = logging.getLevelName(level.upper())
    logging.basicConfig(
        level=root, format="%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"
    )
    lib = logging.getLevelName(lib_level.upper()) if lib_level else max(root, logging.WARNING)
    for name in LIB_LOGGERS:
        logging.getLogger(name).setLevel(lib)


def _stats_parser(sub: Any) -> None:
    p = sub.add_parser("stats", help="print the daemon's stats")
    p.add_argument("--socket", help="Unix socket path")
    p.add_argument("--json", action="store_true", help="print the raw JSON document")
    p.set_defaults(func=_cmd_stats)


def _cmd_stats(args: argparse.Namespace) -> int:
    from kvstore.client import Client

    with Client(args.socket, name="kvstore-stats", timeout=5.0) as c:
        st = c.stats()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(format_stats(st))
    return 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def format_stats(st: dict[str, Any]) -> str:
    c = st["counters"]
    lines = [
        f"kvstore pid {st['pid']} up {st['uptime_s']}s at {st['socket']}",
        f"blocks {st['blocks']}  hit rate {st['hit_rate']:.3f} "
        f"({c['lookup_hit_blocks']}/{c['lookup_blocks']} blocks)",
        f"sessions open {st['sessions']['open']}  pins {st['sessions']['pins']}  "
        f"pending {st['sessions']['pending_allocations']}  "
        f"reclaimed {st['sessions']['reclaimed_total']}",
        "tier        kind   used / capacity                blocks   hits  evictions  policy",
    ]
    for i, t in enumerate(st["tiers"]):
        used = f"{_mib(t['used_bytes'])} / {_mib(t['capacity_bytes'])}"
        lines.append(
            f"{t['name']:<11} {t['kind']:<6} {used:<30} {t['blocks']:>6} "
            f"{c['hits_by_tier'][i]:>6} {c['evictions_by_tier'][i]:>10}  {t['policy']}"
            + (f"  DEGRADED: {t['degraded']}" if t.get("degraded") else "")
        )
        if "io_backend" in t:
            lines.append(
                f"{'':<11} io backend {t['io_backend']}, O_DIRECT {t['o_direct']}, path {t['path']}"
            )
        if t.get("compression", "off") != "off" or t.get("compressed_blocks"):
            zb, zd = t["compressed_bytes"], t["compressed_disk_bytes"]
            lines.append(
                f"{'':<11} compression {t['compression']} (level {t['compression_level']}): "
                f"{t['compressed_blocks']} blocks, {_mib(zb)} stored in {_mib(zd)} "
                f"(ratio {zb / zd if zd else 0:.2f}), {t['compress_fallbacks']} stored raw"
            )
    lines.append(
        f"promotions {c['promotions']}  demotions {c['demotions']}  dropped {c['dropped']}  "
        f"checksum failures {c['checksum_failures']}  io errors {c['io_errors']}"
    )
    m = st.get("models") or {}
    if m:
        resident = ", ".join(m.get("resident", [])) or "none"
        lines.append(
            f"models DRAM {_mib(m['dram_used'])} / {_mib(m['dram_budget'])}  "
            f"resident: {resident}  loads {m['loads']}  hits {m['hits']}  "
            f"evictions {m['evictions']}"
            + (f"  parked sessions {m['parked_sessions']}" if m.get("parked_sessions") else "")
            + (
                f"  arena pages: {runs} contiguous runs per 4 MiB"
                if (runs := m.get("arena_runs_per_4mib", -1)) > 0
                else ""
            )
            + (f" (faulted in again {n}x)" if (n := m.get("prefault_retries", 0)) else "")
        )
    return "\n".join(lines)


_BENCHES = {
    "kv-throughput": "bench.kv_throughput",
    "trace-replay": "bench.trace_replay",
    "nvme": "bench.nvme_tier",
    "gpu": "bench.gpu_bench",
    "weight-swap": "bench.weight_swap",
    "load-gap": "bench.load_gap",
    "promote-latency": "bench.promote_latency",
}


def _bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="run a benchmark (args after the name go to it)")
    p.add_argument("name", choices=sorted(_BENCHES))
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    mod = importlib.import_module(_BENCHES[args.name])
    rc = mod.main(args.args)
    return rc if isinstance(rc, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvstore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _stats_parser(sub)
    _bench_parser(sub)
    from loader.cli import register as register_models

    register_models(sub)
    args = parser.parse_args(argv)
    try:
        rc = int(args.func(args))
        sys.stdout.flush()  # here, so a closed pipe is caught below, not at exit
        return rc
    except BrokenPipeError:
        # The reader went away (`kvstore stats | head -3`): stop quietly.  Point stdout
        # at devnull so the interpreter's final flush does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except ConfigError as exc:
        print(f"kvstore: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return 1
    except KVStoreError as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
