"""End to end: vLLM (CPU) engines in fresh processes share a prefix through a kvstore daemon.

Slow (several vLLM engine start-ups); needs vllm: ``make vllm-env && make test-vllm``.
Skipped, with that reason, where vllm is not installed (the default CI run).
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.kvstore.conftest import DaemonProc

pytestmark = [
    pytest.mark.slow,
    # each vLLM engine start-up takes 15-90 s on a busy 2-core machine; the first
    # test also runs the module's two shared engines
    pytest.mark.timeout(1200),
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed: `make vllm-env` then `make test-vllm`",
    ),
]

BLOCK = 128
PREFIX = 900  # tokens prompt A and prompt B share -> 7 full blocks of 128
DAEMON_CONFIG = """
[server]
lease_timeout_s = 5.0

[[tiers]]
name = "dram"
kind = "dram"
capacity = "128MiB"
options = { slab_bytes = "8MiB" }
"""


class Scenario:
    """Runs the engines once for every test of this module."""

    def __init__(self, root: Path) -> None:
        from bench.vllm_harness import make_tiny_llama, random_prompt

        self.root = root
        self.model = str(make_tiny_llama(root / "model"))
        self.prompt_a = random_prompt(1000, seed=1)
        self.prompt_b = self.prompt_a[:PREFIX] + random_prompt(200, seed=2)
        self.results: dict[str, dict[str, Any]] = {}

    def spec(self, kvstore: dict[str, Any] | None, prompt: list[int]) -> dict[str, Any]:
        return {
            "model": self.model,
            "kvstore": kvstore,
            "block_size": BLOCK,
            "steps": [{"prompt": prompt, "max_tokens": 12}],
        }

    def run(self, name: str, kvstore: dict[str, Any] | None, prompt: list[int]) -> dict[str, Any]:
        from bench.vllm_harness import run_engine

        if name not in self.results:
            self.results[name] = run_engine(self.spec(kvstore, prompt), self.root / "runs", name)
        return self.results[name]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return Scenario(tmp_path_factory.mktemp("vllm_e2e"))


@pytest.fixture(scope="module")
def runs(scenario: Scenario) -> dict[str, Any]:
    """All engines of the module, each in a fresh process.

    Engine 1 serves A (saving it), then a fresh engine 2 serves B (loading A's
    prefix).  Meanwhile, in parallel (they share nothing): an engine without
    kvstore serves B, and an engine whose connector finds no daemon serves B.
    """
    from kvstore import Client
    from kvstore.integrations.vllm_transfer import (
        read_counters,
    )

    (scenario.root / "daemon").mkdir()
    d = DaemonProc(scenario.root / "daemon", DAEMON_CONFIG)
    d.start()
    stats = scenario.root / "stats"
    no_daemon = {
        "socket": str(scenario.root / "no-daemon.sock"),
        "stats_dir": str(stats / "no_daemon"),
        "retry_s": 1.0,
    }
    with ThreadPoolExecutor(2) as pool:
        base = pool.submit(scenario.run, "baseline", None, scenario.prompt_b)
        missing = pool.submit(scenario.run, "no_daemon", no_daemon, scenario.prompt_b)
        try:
            e1 = scenario.run(
                "e1", {"socket": d.socket, "stats_dir": str(stats / "e1")}, scenario.prompt_a
            )
            with Client(d.socket) as c:
                after_e1 = c.stats()
            e2 = scenario.run(
                "e2", {"socket": d.socket, "stats_dir": str(stats / "e2")}, scenario.prompt_b
            )
            with Client(d.socket) as c:
                after_e2 = c.stats()
        finally:
            d.stop()
        results = {"baseline": base.result(), "no_daemon": missing.result()}
    return {
        **results,
        "e1": e1,
        "e2": e2,
        "e1_counters": read_counters(stats / "e1"),
        "e2_counters": read_counters(stats / "e2"),
        "no_daemon_counters": read_counters(stats / "no_daemon"),
        "after_e1": after_e1,
        "after_e2": after_e2,
    }


def _by_role(counters: dict[str, dict[str, int]], role: str) -> dict[str, int]:
    (found,) = [v for k, v in counters.items() if k.startswith(role)]
    return found


def test_first_engine_saves_its_prompt_blocks(runs: dict[str, Any]) -> None:
    w = _by_role(runs["e1_counters"], "worker")
    assert w["saved_blocks"] == 1000 // BLOCK
    assert w["loaded_blocks"] == 0
    assert runs["after_e1"]["blocks"] == 1000 // BLOCK
    assert runs["e1"]["steps"][0]["num_cached_tokens"] == 0


def test_fresh_engine_loads_the_shared_prefix(runs: dict[str, Any]) -> None:
    want = PREFIX // BLOCK
    s = _by_role(runs["e2_counters"], "scheduler")
    w = _by_role(runs["e2_counters"], "worker")
    assert s["hit_tokens"] == want * BLOCK
    assert w["loaded_blocks"] == want and w["failed_blocks"] == 0
    # vLLM itself counts the loaded tokens as cached: its own prefix cache was empty
    assert runs["e2"]["steps"][0]["num_cached_tokens"] == want * BLOCK
    # the daemon saw the hits, and B's one new full block was saved
    c1, c2 = runs["after_e1"]["counters"], runs["after_e2"]["counters"]
    assert c2["lookup_hit_blocks"] - c1["lookup_hit_blocks"] >= want
    assert w["saved_blocks"] == 1100 // BLOCK - want
    assert runs["after_e2"]["blocks"] == 1000 // BLOCK + 1100 // BLOCK - want


def test_outputs_identical_to_engine_without_kvstore(runs: dict[str, Any]) -> None:
    base = runs["baseline"]["steps"][0]
    assert base["num_cached_tokens"] == 0
    got = runs["e2"]["steps"][0]["tokens"]
    assert len(got) == 12
    assert got == base["tokens"]


def test_daemon_missing_engine_serves_without_it(runs: dict[str, Any]) -> None:
    res = runs["no_daemon"]["steps"][0]
    assert res["tokens"] == runs["baseline"]["steps"][0]["tokens"]
    assert res["num_cached_tokens"] == 0
    counters = runs["no_daemon_counters"]
    assert {k.split("-")[0] for k in counters} == {"scheduler", "worker"}
    for v in counters.values():
        assert v["loaded_blocks"] == 0 and v["saved_blocks"] == 0 and v["hit_tokens"] == 0
