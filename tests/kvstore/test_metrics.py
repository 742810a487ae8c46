"""Prometheus metrics on the opt-in port reflect the daemon's counters."""

from __future__ import annotations

import socket
import urllib.request

import numpy as np

from kvstore import Client
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS, blocks_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_endpoint(make_daemon: type[DaemonProc]) -> None:
    port = _free_port()
    d = make_daemon(
        f'[server]\nmetrics_port = {port}\n[[tiers]]\nname = "dram"\nkind = "dram"\n'
        'capacity = "32MiB"\n'
    ).start()
    toks = np.arange(64)
    with Client(d.socket) as c:
        c.store_tokens(NS, toks, blocks_for(NS, toks))
        assert c.lookup_tokens(NS, toks) == 64
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    text = body.decode()
    assert 'kvstore_hits_total{tier="dram"} 4.0' in text
    assert "kvstore_commits_total 4.0" in text
    assert 'kvstore_tier_capacity_bytes{tier="dram"}' in text
    assert "kvstore_checksum_failures_total 0.0" in text
