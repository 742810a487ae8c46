"""Several client processes store and load overlapping prefixes at once; every byte checks."""

from __future__ import annotations

from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import popen_client

WORKER = """
import sys
import numpy as np
from kvstore import Client, ResourceExhausted
from tests.kvstore.helpers import NS, blocks_for, content

seed = int(sys.argv[1]) if len(sys.argv) > 1 else {seed}
rng = np.random.default_rng(seed)
checked = 0
with Client({socket!r}, name=f"worker-{{seed}}") as c:
    for it in range(40):
        # Shared system prompt (3 blocks) + one of 4 shared conversations + a private tail.
        conv = int(rng.integers(0, 4))
        toks = np.concatenate([
            np.arange(48),
            np.arange(1000 * (conv + 1), 1000 * (conv + 1) + 32),
            rng.integers(0, 50_000, int(rng.integers(0, 64))),
        ])
        try:
            c.store_tokens(NS, toks, blocks_for(NS, toks))
        except ResourceExhausted:
            pass
        with c.load_tokens(NS, toks) as lease:
            for k, a in zip(lease.keys, lease.arrays):
                if not np.array_equal(a, content(k, NS.block_nbytes)):
                    print("MISMATCH", k.hex(), flush=True)
                    sys.exit(3)
                checked += 1
print("ok", checked, flush=True)
"""


def test_concurrent_overlapping_prefixes(daemon: DaemonProc) -> None:
    procs = [popen_client(WORKER.format(seed=i, socket=daemon.socket)) for i in range(4)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, f"worker failed: {out}\n{err}"
        outs.append(out)
    checked = [int(o.split()[-1]) for o in outs]
    assert all(n > 0 for n in checked), outs
    assert daemon.alive()
