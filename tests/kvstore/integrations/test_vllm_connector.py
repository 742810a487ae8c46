"""The connector against vLLM's own interfaces, in process, with a fake daemon.

vLLM's real ``Scheduler`` drives the scheduler-side connector; the worker-side
connector loads into real tensors; the load errors it reports go back through
``Scheduler.update_from_output``, whose recompute path must accept them.
Needs vllm (``make test-vllm``); slow only because importing vllm takes a while.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from kvstore.integrations.vllm_core import (
    BlockTransfer,
    PagedBlocks,
)
from kvstore.integrations.vllm_transfer import (
    DaemonLink,
    save_blocks,
)
from tests.kvstore.integrations.fakes import FakeClient

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    # importing vllm (and the torch modules it pulls in) warns about its own deprecations
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed: `make vllm-env` then `make test-vllm`",
    ),
]

BS = 128
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
NUM_BLOCKS = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from bench.vllm_harness import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny"))


def _vllm_config(model: str, policy: str = "recompute") -> Any:
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )

    vc = VllmConfig(
        model_config=ModelConfig(
            model=model, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=2048,
            enforce_eager=True,
        ),
        cache_config=CacheConfig(block_size=BS, enable_prefix_caching=True),
        scheduler_config=SchedulerConfig(
            max_num_seqs=4, max_num_batched_tokens=2048, max_model_len=2048,
            is_encoder_decoder=False,
        ),
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVStoreConnector",
            kv_connector_module_path="kvstore.integrations.vllm",
            kv_role="kv_both",
            kv_load_failure_policy=policy,
            kv_connector_extra_config={"socket": "/nonexistent/kvstore.sock"},
        ),
        device_config=DeviceConfig("cpu"),
    )  # fmt: skip
    vc.cache_config.num_gpu_blocks = NUM_BLOCKS
    return vc


def _kv_cache_config() -> Any:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)],
    )


class Engine:
    """vLLM's scheduler with our scheduler connector, plus our worker connector."""

    def __init__(self, model: str, fake: FakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output import StructuredOutputManager

        from kvstore.integrations.vllm import KVStoreConnector

        vc = _vllm_config(model)
        init_none_hash(sha256)
        self.hasher = get_request_block_hasher(BS, sha256)
        self.scheduler = Scheduler(
            vc, _kv_cache_config(), StructuredOutputManager(vc), block_size=BS, log_stats=False
        )
        self.sched_conn = self.scheduler.connector
        assert isinstance(self.sched_conn, KVStoreConnector)
        monkeypatch.setattr(
            "vllm.distributed.parallel_state.get_tensor_model_parallel_rank", lambda: 0
        )
        self.worker = KVStoreConnector(vc, KVConnectorRole.WORKER, _kv_cache_config())
        # both connectors talk to the fake daemon
        for conn in (self.sched_conn, self.worker):
            conn._link = DaemonLink(lambda: fake, None)
        # vLLM CPU layout per layer: [num_blocks, kv_heads, block_size, 2 * head_size]
        self.caches = {n: torch.zeros(NUM_BLOCKS, 2, BS, 64, dtype=torch.bfloat16) for n in LAYERS}
        self.worker.register_kv_caches(self.caches)
        self.ns = self.worker._ns

    def add(self, req_id: str, prompt: list[int]) -> Any:
        from vllm import SamplingParams
        from vllm.v1.request import Request

        r = Request(req_id, prompt, SamplingParams(max_tokens=4), None, block_hasher=self.hasher)
        self.scheduler.add_request(r)
        return r

    def step(self, invalid: set[int] | None = None) -> tuple[Any, set[int]]:
        """One engine step: schedule, run the worker connector, report back."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        out = self.scheduler.schedule()
        self.worker.bind_connector_metadata(out.kv_connector_metadata)
        self.worker.start_load_kv(None)  # type: ignore[arg-type]
        self.worker.wait_for_save()
        errors = self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        req_ids = list(out.num_scheduled_tokens)
        runner_out = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[5] for _ in req_ids],
            kv_connector_output=KVConnectorOutput(invalid_block_ids=errors),
        )
        self.scheduler.update_from_output(out, runner_out)
        return out, errors


def _source_blocks(fake: FakeClient, ns: Any, prompt: list[int], n: int) -> PagedBlocks:
    """Stores the first ``n`` blocks of ``prompt`` in the fake daemon, as engine 1 would."""
    g = torch.Generator().manual_seed(3)
    src = PagedBlocks([torch.randn(n, 2, BS, 64, generator=g).to(torch.bfloat16) for _ in LAYERS])
    t = BlockTransfer("other", tuple(prompt[: n * BS]), 0, tuple(range(n)))
    assert save_blocks(fake, ns, src, t).new == n
    return src


def test_prefix_is_loaded_into_the_blocks_vllm_allocated(
    model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.vllm_harness import random_prompt

    fake = FakeClient()
    eng = Engine(model_dir, fake, monkeypatch)
    prompt = random_prompt(3 * BS + 16, seed=4)
    src = _source_blocks(fake, eng.ns, prompt, 2)
    eng.add("r1", prompt)
    out, errors = eng.step()
    (new,) = out.scheduled_new_reqs
    ids = new.block_ids[0]
    assert new.num_computed_tokens == 2 * BS  # vLLM took the external hit
    assert out.num_scheduled_tokens["r1"] == BS + 16  # and computes only the rest
    assert errors == set()
    for i in range(2):
        for name, layer in zip(LAYERS, src.layers, strict=True):
            assert torch.equal(eng.caches[name][ids[i]], layer[i])
    # the third full block (computed in this step) was saved; the loaded ones were not
    assert len(fake.blocks) == 3
    assert eng.worker.counters.loaded_blocks == 2 and eng.worker.counters.saved_blocks == 1
    assert fake.pins == {}


def test_failed_load_is_recomputed_by_vllm(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.vllm_harness import random_prompt

    fake = FakeClient()
    eng = Engine(model_dir, fake, monkeypatch)
    prompt = random_prompt(3 * BS + 16, seed=5)
    _source_blocks(fake, eng.ns, prompt, 3)
    # the second block fails its checksum in the daemon after the lookup: a miss at load
    fake.corrupt.add(eng.ns.block_keys(prompt)[1])
    req = eng.add("r1", prompt)
    out, errors = eng.step()
    ids = out.scheduled_new_reqs[0].block_ids[0]
    assert out.scheduled_new_reqs[0].num_computed_tokens == 3 * BS
    assert errors == {ids[1], ids[2]}
    # vLLM truncated the request at the first failed block: it recomputes from there
    assert req.num_computed_tokens == BS
    out2, errors2 = eng.step()
    assert out2.num_scheduled_tokens["r1"] == 2 * BS + 16 and errors2 == set()


def test_daemon_gone_means_zero_hits_and_no_crash(
    model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.vllm_harness import random_prompt

    fake = FakeClient()
    eng = Engine(model_dir, fake, monkeypatch)
    prompt = random_prompt(3 * BS + 16, seed=6)
    _source_blocks(fake, eng.ns, prompt, 3)
    fake.down = True
    eng.add("r1", prompt)
    out, errors = eng.step()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 0
    assert out.num_scheduled_tokens["r1"] == 3 * BS + 16
    assert errors == set()
    assert eng.sched_conn.counters.daemon_errors >= 1
    assert eng.worker.counters.saved_blocks == 0


def test_daemon_dies_between_lookup_and_load(
    model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.vllm_harness import random_prompt

    fake = FakeClient()
    eng = Engine(model_dir, fake, monkeypatch)
    prompt = random_prompt(3 * BS + 16, seed=7)
    _source_blocks(fake, eng.ns, prompt, 3)
    req = eng.add("r1", prompt)
    out = eng.scheduler.schedule()  # lookup succeeds: 3 blocks planned for loading
    ids = out.scheduled_new_reqs[0].block_ids[0]
    fake.down = True  # ... then the daemon goes away before the worker loads
    eng.worker.bind_connector_metadata(out.kv_connector_metadata)
    eng.worker.start_load_kv(None)  # type: ignore[arg-type]
    eng.worker.wait_for_save()
    assert eng.worker.get_block_ids_with_load_errors() == set(ids[:3])
    assert eng.worker.counters.daemon_errors >= 1
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    eng.scheduler.update_from_output(
        out,
        ModelRunnerOutput(
            req_ids=["r1"],
            req_id_to_index={"r1": 0},
            sampled_token_ids=[[5]],
            kv_connector_output=KVConnectorOutput(invalid_block_ids=set(ids[:3])),
        ),
    )
    assert req.num_computed_tokens == 0  # everything is recomputed


def test_cache_salted_requests_bypass_kvstore(
    model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm import SamplingParams
    from vllm.v1.request import Request

    from bench.vllm_harness import random_prompt

    fake = FakeClient()
    eng = Engine(model_dir, fake, monkeypatch)
    prompt = random_prompt(3 * BS + 16, seed=8)
    _source_blocks(fake, eng.ns, prompt, 3)
    r = Request(
        "salted", prompt, SamplingParams(max_tokens=4), None, cache_salt="tenant-a",
        block_hasher=eng.hasher,
    )  # fmt: skip
    eng.scheduler.add_request(r)
    out, _ = eng.step()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 0
    assert len(fake.blocks) == 3  # nothing saved under the unsalted keys either
