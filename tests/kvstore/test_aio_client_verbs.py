"""AsyncClient has the sync Client's verbs: prefetch(keys) and the model-weight verbs.

Each against a real ``kvstore serve`` daemon, started as the other daemon tests start
one; results are checked against the sync Client's answers where both can ask.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstore import Client, KVStoreError, NotFound
from kvstore.aio_client import AsyncClient
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS, blocks_for
from tests.loader.conftest import small_model, write_model

# NS blocks are 8 KiB: 1 MiB of DRAM holds 128 of them, older ones go to NVMe.
CONFIG = """
[server]
lease_timeout_s = 2.0

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

[models]
dram_budget = "16MiB"
prefault = false
"""


def _seq(i: int) -> np.ndarray:
    return np.arange(i * 100_000, i * 100_000 + 16 * 8)


def test_async_prefetch_promotes_demoted_blocks(make_daemon: type[DaemonProc]) -> None:
    d = make_daemon(CONFIG).start()

    async def go() -> None:
        async with await AsyncClient.connect(d.socket, name="aio-prefetch") as c:
            for i in range(40):
                await c.store_tokens(NS, _seq(i), blocks_for(NS, _seq(i)))
            keys = NS.block_keys(_seq(4))
            assert set((await c.lookup(keys)).tiers) == {"nvme"}
            assert await c.prefetch(keys) == 8  # the sync client's answer (promote tests)
            deadline = time.monotonic() + 10
            while set((await c.lookup(keys)).tiers) != {"dram"}:
                assert time.monotonic() < deadline, (await c.lookup(keys)).tiers
                await asyncio.sleep(0.02)
            assert await c.prefetch(keys) == 0  # already in DRAM: nothing to move
            assert (await c.stats())["sessions"]["pins"] == 0  # prefetch pins nothing

    asyncio.run(go())


def test_async_model_verbs(make_daemon: type[DaemonProc], tmp_path: Path) -> None:
    from loader.errors import ModelNotFoundError
    from loader.store import ModelStore

    d = make_daemon(CONFIG)
    ref_a, ref_b = small_model(1), small_model(2)
    with ModelStore(d.tmp / "data") as st:
        st.add("a", write_model(tmp_path / "a.safetensors", ref_a))
        st.add("b", write_model(tmp_path / "b.safetensors", ref_b))
    d.start()
    sync = Client(d.socket, name="observer")

    def pins() -> dict[str, int]:
        return {m["name"]: m["pins"] for m in sync.models()}

    async def go() -> None:
        async with await AsyncClient.connect(d.socket, name="aio-models") as c:
            listed = await c.models()
            assert listed == sync.models()
            assert [(m["name"], m["state"]) for m in listed] == [("a", "stored"), ("b", "stored")]

            assert await c.prefetch_model("b") in ("loading", "ready")

            got = await c.load_model("a")
            assert set(got) == set(ref_a)
            for k, v in ref_a.items():
                assert torch.equal(got[k], v), k
            assert pins() == {"a": 1, "b": 0}  # pinned for the async client's session

            got = await c.swap("a", "b")
            for k, v in ref_b.items():
                assert torch.equal(got[k], v), k
            assert pins() == {"a": 0, "b": 1}

            # Errors are KVStoreErrors, as the sync client's; a failed swap changes nothing.
            with pytest.raises(ModelNotFoundError, match="'nope'") as ei:
                await c.swap("nope", "a")
            assert isinstance(ei.value, KVStoreError) and isinstance(ei.value, NotFound)
            with pytest.raises(KVStoreError, match="'nope'"):
                await c.load_model("nope")
            assert pins() == {"a": 0, "b": 1}

            unpinned = await c.load_model("a", pin=False)
            assert torch.equal(unpinned["embed.weight"], ref_a["embed.weight"])
            assert pins() == {"a": 0, "b": 1}

            assert await c.release_model("b", evict=True) == 1
            states = {m["name"]: m["state"] for m in await c.models()}
            assert states["b"] == "stored" and pins() == {"a": 0, "b": 0}

            await c.load_model("a")
        # The session's pins go when the async client closes.
        assert pins() == {"a": 0, "b": 0}

        closed = await AsyncClient.connect(d.socket)
        await closed.close()
        with pytest.raises(KVStoreError, match="closed"):
            await closed.load_model("a")

    try:
        asyncio.run(go())
    finally:
        sync.close()
