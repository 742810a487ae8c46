"""The daemon with a DRAM + NVMe hierarchy: demotion, promotion, restart, crash, persistence."""

from __future__ import annotations

import signal
import time
import urllib.request

import numpy as np

from kvstore import Client
from kvstore.keys import Namespace
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS, blocks_for, content, popen_client
from tests.kvstore.test_metrics import _free_port

# NS blocks are 8 KiB; 1 MiB of DRAM holds 128 of them, NVMe 16 MiB holds 2048.
TWO_TIER = """
[[tiers]]
name = "dram"
kind = "dram"
capacity = "1MiB"
options = { slab_bytes = "64KiB" }

[[tiers]]
name = "nvme"
kind = "nvme"
capacity = "16MiB"
options = { segment_bytes = "1MiB" }
"""


def _seqs(n: int, blocks: int = 8) -> list[np.ndarray]:
    return [np.arange(i * 100_000, i * 100_000 + 16 * blocks) for i in range(n)]


def _check_all_served(c: Client, seqs: list[np.ndarray]) -> int:
    """Every block that is served has exactly its bytes; returns blocks served."""
    served = 0
    for s in seqs:
        with c.load_tokens(NS, s) as lease:
            for k, a in zip(lease.keys, lease.arrays, strict=True):
                assert np.array_equal(a, content(k, NS.block_nbytes)), k.hex()
            served += len(lease.keys)
    return served


def test_demote_promote_and_restart(make_daemon: type[DaemonProc]) -> None:
    d = make_daemon(TWO_TIER).start()
    seqs = _seqs(40)  # 320 blocks: 2.5x the DRAM tier
    with Client(d.socket) as c:
        for s in seqs:
            c.store_tokens(NS, s, blocks_for(NS, s))
        st = c.stats()
        assert st["counters"]["demotions"] > 0
        assert st["tiers"][1]["kind"] == "nvme"
        assert st["tiers"][1]["io_backend"] == "posix"  # no CUDA here
        from kvstore.cli import format_stats

        assert "io backend posix" in format_stats(st)
        # The oldest sequence was demoted; Lookup says where, Acquire promotes it back.
        assert set(c.lookup(NS.block_keys(seqs[0])).tiers) == {"nvme"}
        assert _check_all_served(c, seqs) == 320
        assert c.stats()["counters"]["promotions"] > 0
    # A clean restart without --persist-on-shutdown: what reached NVMe is still there.
    assert d.stop() == 0
    d.start()
    with Client(d.socket) as c:
        assert c.stats()["recovered_blocks"] > 0
        assert _check_all_served(c, seqs) > 0


def test_persist_on_shutdown_comes_back_warm(make_daemon: type[DaemonProc]) -> None:
    d = make_daemon(TWO_TIER, args=("--persist-on-shutdown",)).start()
    seqs = _seqs(4)  # fits in DRAM: nothing demoted before shutdown
    with Client(d.socket) as c:
        for s in seqs:
            c.store_tokens(NS, s, blocks_for(NS, s))
        assert c.stats()["counters"]["demotions"] == 0
    assert d.stop(signal.SIGTERM) == 0
    assert "persisted 32" in d.log()
    d.start()
    with Client(d.socket) as c:
        assert all(c.lookup_tokens(NS, s) == len(s) for s in seqs)
        assert _check_all_served(c, seqs) == 32


def test_sigkill_during_heavy_demotion(make_daemon: type[DaemonProc]) -> None:
    d = make_daemon(TWO_TIER).start()
    writer = """
        import numpy as np
        from kvstore import Client, KVStoreError
        from tests.kvstore.helpers import NS, blocks_for
        c = Client({sock!r}, reconnect=False)
        i = {start}
        print("go", flush=True)
        try:
            while True:
                s = np.arange(i * 100_000, i * 100_000 + 16 * 8)
                c.store_tokens(NS, s, blocks_for(NS, s))
                i += 1
        except KVStoreError:
            pass
        """
    for round_ in range(3):
        p = popen_client(writer.format(sock=d.socket, start=round_ * 1000))
        assert p.stdout is not None and p.stdout.readline().strip() == "go"
        time.sleep(1.5 + 0.3 * round_)
        d.kill()  # SIGKILL in the middle of demotion
        p.communicate(timeout=30)
        d.start()
        written = [
            np.arange(i * 100_000, i * 100_000 + 16 * 8)
            for i in range(round_ * 1000, round_ * 1000 + 400)
        ]
        with Client(d.socket) as c:
            st = c.stats()
            assert st["recovered_blocks"] > 0
            # Whatever is served after the crash is byte-exact.
            _check_all_served(c, written)
            nv = st["tiers"][1]
            assert nv["used_bytes"] <= nv["capacity_bytes"]


# 64 KiB bf16 blocks: 1 MiB of DRAM holds 16 of them.
BF16 = Namespace("bf16-model", num_layers=2, num_kv_heads=2, head_dim=128, block_tokens=32)


def _bf16_block(key: bytes) -> np.ndarray:
    """bf16-like bytes of ``key`` (normal values: their exponent plane compresses)."""
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    f = rng.standard_normal(BF16.block_nbytes // 2, dtype=np.float32)
    return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)


def test_compression_through_the_daemon_config(make_daemon: type[DaemonProc]) -> None:
    port = _free_port()
    cfg = f"[server]\nmetrics_port = {port}\n" + TWO_TIER.replace(
        'options = { segment_bytes = "1MiB" }',
        'options = { segment_bytes = "1MiB", compression = "byteplane-zstd" }',
    )
    d = make_daemon(cfg).start()
    seqs = [np.arange(i * 1000, i * 1000 + 32 * 4) for i in range(8)]  # 32 blocks, 2x DRAM

    def check(c: Client) -> int:
        served = 0
        for s in seqs:
            with c.load_tokens(BF16, s) as lease:
                for k, a in zip(lease.keys, lease.arrays, strict=True):
                    assert np.array_equal(a, _bf16_block(k)), k.hex()
                served += len(lease.keys)
        return served

    with Client(d.socket) as c:
        for s in seqs:
            c.store_tokens(BF16, s, [_bf16_block(k) for k in BF16.block_keys(s)])
        assert c.stats()["counters"]["demotions"] > 0
        assert check(c) == 32
        nv = c.stats()["tiers"][1]
        assert nv["compression"] == "byteplane-zstd" and nv["compressed_blocks"] > 0
        assert nv["compressed_disk_bytes"] < nv["compressed_bytes"] and nv["compressed_reads"] > 0
        assert nv["checksum_failures"] == 0
        from kvstore.cli import format_stats

        assert "compression byteplane-zstd (level 1)" in format_stats(c.stats())
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert 'kvstore_tier_compressed_bytes{size="disk",tier="nvme"}' in body.decode()
    assert d.stop() == 0
    d.start()
    with Client(d.socket) as c:
        assert c.stats()["tiers"][1]["compressed_blocks"] > 0  # recovered from the index
        assert check(c) > 0
