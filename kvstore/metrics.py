"""Prometheus metrics, read from the hierarchy's counters at scrape time.

Opt-in (``server.metrics_port``); bound to loopback unless configured otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from kvstore.daemon import Daemon

_COUNTERS = {
    "lookups": "Lookup calls",
    "lookup_blocks": "Blocks asked for by Lookup",
    "lookup_hit_blocks": "Blocks found cached by Lookup (prefix hits)",
    "allocations": "Blocks allocated for writing",
    "dedup_present": "Blocks a client tried to store that were already present",
    "commits": "Blocks committed",
    "aborts": "Pending blocks aborted (sessions that ended before committing)",
    "promotions": "Blocks promoted to a faster tier",
    "demotions": "Blocks demoted to a slower tier",
    "dropped": "Blocks evicted from the whole hierarchy",
    "deleted": "Blocks deleted by clients",
    "checksum_failures": "Blocks whose bytes failed their checksum (served as misses)",
    "io_errors": "Tier I/O errors",
    "no_space": "Allocations or promotions refused for lack of evictable room",
}


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def collect(self) -> Iterator[Any]:
        c = self.d.h.counters
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"kvstore_{name}", doc, value=getattr(c, name))
        hits = CounterMetricFamily("kvstore_hits", "Prefix-hit blocks by tier", labels=["tier"])
        ev = CounterMetricFamily("kvstore_evictions", "Blocks evicted by tier", labels=["tier"])
        used = GaugeMetricFamily("kvstore_tier_used_bytes", "Bytes in use", labels=["tier"])
        cap = GaugeMetricFamily("kvstore_tier_capacity_bytes", "Capacity", labels=["tier"])
        blocks = GaugeMetricFamily("kvstore_tier_blocks", "Resident blocks", labels=["tier"])
        degraded = GaugeMetricFamily("kvstore_tier_degraded", "1 if degraded", labels=["tier"])
        for t, lv in enumerate(self.d.h.levels):
            name = lv.tier.name
            hits.add_metric([name], c.hits_by_tier[t])
            ev.add_metric([name], c.evictions_by_tier[t])
            used.add_metric([name], lv.tier.used_bytes)
            cap.add_metric([name], lv.tier.capacity_bytes)
            blocks.add_metric([name], len(lv.policy))
            degraded.add_metric([name], 1.0 if lv.tier.degraded else 0.0)
        yield from (hits, ev, used, cap, blocks, degraded)
        yield from self._compression()
        yield GaugeMetricFamily(
            "kvstore_sessions", "Open sessions", value=len(self.d.sessions.sessions)
        )

    def _compression(self) -> Iterator[Any]:
        """The NVMe codec's effect: live compressed blocks, their logical and disk bytes."""
        zb = GaugeMetricFamily(
            "kvstore_tier_compressed_blocks", "Live blocks stored compressed", labels=["tier"]
        )
        zs = GaugeMetricFamily(
            "kvstore_tier_compressed_bytes",
            "Live compressed blocks: their logical size and the disk they take",
            labels=["tier", "size"],
        )
        for lv in self.d.h.levels:
            if lv.tier.kind != "nvme":
                continue
            st = lv.tier.stats()
            zb.add_metric([lv.tier.name], st["compressed_blocks"])
            zs.add_metric([lv.tier.name, "logical"], st["compressed_bytes"])
            zs.add_metric([lv.tier.name, "disk"], st["compressed_disk_bytes"])
        yield from (zb, zs)


def start_metrics_server(daemon: Daemon, host: str, port: int) -> Any:
    """Serves ``/metrics`` on ``host:port`` in a background thread; returns the server."""
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
