"""kvstore as vLLM's external prefix cache: a ``KVConnectorBase_V1`` connector.

Configure it like any vLLM connector::

    from vllm.config import KVTransferConfig
    KVTransferConfig(
        kv_connector="KVStoreConnector",
        kv_connector_module_path="kvstore.integrations.vllm",
        kv_role="kv_both",                    # load and save; kv_consumer: load only
        kv_load_failure_policy="recompute",   # a failed load is recomputed, not an error
        kv_connector_extra_config={"socket": "/run/kvstore/kvstore.sock"},
    )

How it works (vLLM runs one connector per role, in different processes):

* Scheduler (engine core): for a new request, the keys of its full prompt blocks
  are computed from the token ids (:mod:`kvstore.keys`) and one ``Lookup`` asks
  the daemon how many leading blocks it holds; vLLM allocates blocks for them and
  the plan for the step says which engine blocks to fill and which newly
  computed prompt blocks to save.
* Worker: before the forward, the planned blocks are pinned in the daemon's
  shared-memory arena and copied into vLLM's paged KV cache (a synchronous load);
  after the forward (``wait_for_save``) the new full prompt blocks are copied
  into freshly allocated arena slots and committed with checksums.

Faults never reach the engine: with no daemon (or one that stops answering) the
scheduler reports zero hits and the engine computes as without kvstore; a block
that cannot be served at load time (evicted, failed its checksum, daemon gone)
is reported through ``get_block_ids_with_load_errors`` and vLLM recomputes it
(this needs ``kv_load_failure_policy="recompute"``; vLLM's default ``"fail"``
ends such a request with an error instead).

Supported: vLLM's CPU platform (layout ``vllm_cpu``), one KV cache group
(standard decoder attention), token-id prompts without LoRA or multimodal inputs
(those requests bypass kvstore: their KV depends on more than the tokens).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvstore._wire import default_socket
from kvstore.client import Client
from kvstore.errors import DaemonUnavailable, KVStoreError
from kvstore.integrations.vllm_core import (
    BlockTransfer,
    ConnectorOptions,
    ConnectorPlan,
    PagedBlocks,
    PrefixPlanner,
    namespace_for,
    order_layers,
)
from kvstore.integrations.vllm_transfer import (
    BlockClient,
    ConnectorCounters,
    DaemonLink,
    check_block_nbytes,
    load_blocks,
    save_blocks,
)
from kvstore.keys import BlockKey, Namespace

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

LAYOUT_CPU = "vllm_cpu"


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker: this step's loads (before the forward) and saves (after)."""

    plan: ConnectorPlan = field(default_factory=ConnectorPlan)


def engine_namespace(vllm_config: VllmConfig, opts: ConnectorOptions, tp_rank: int) -> Namespace:
    """The kvstore namespace of one rank of a vLLM engine's KV cache."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        # Other platforms page KV differently ([2, num_blocks, ...] per layer on CUDA):
        # copying engine blocks there needs kernels.gather_blocks with that layout.
        raise NotImplementedError(
            f"the kvstore vLLM connector supports vLLM's CPU platform only (this is "
            f"{current_platform.device_name!r})"
        )
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    return namespace_for(
        model_id=opts.model_id or str(mc.model),
        num_layers=mc.get_num_layers(pc),
        num_kv_heads=mc.get_num_kv_heads(pc),
        head_dim=mc.get_head_size(),
        block_size=int(vllm_config.cache_config.block_size),
        kv_dtype=mc.dtype if cache_dtype == "auto" else cache_dtype,
        layout=LAYOUT_CPU,
        tp_rank=tp_rank,
        tp_size=pc.tensor_parallel_size,
        tenant_salt=opts.tenant_salt.encode(),
    )


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM v1 KV connector that makes a kvstore daemon the engine's external prefix cache.

    Options come from ``kv_connector_extra_config`` (see
    :class:`~kvstore.integrations.vllm_core.ConnectorOptions`); ``kv_role`` picks
    the direction: ``kv_both`` loads and saves, ``kv_consumer`` only loads,
    ``kv_producer`` only saves.
    """

    _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)  # type: ignore[arg-type]
        tc = self._kv_transfer_config
        self._opts = ConnectorOptions.from_extra(tc.kv_connector_extra_config)
        if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) != 1:
            raise ValueError(
                "the kvstore connector supports models with one KV cache group "
                f"(standard attention); this one has {len(kv_cache_config.kv_cache_groups)}"
            )
        if tc.kv_load_failure_policy != "recompute":
            log.warning(
                "kvstore connector: kv_load_failure_policy=%r fails a request whose cached "
                "blocks vanish before loading; set 'recompute' to recompute them instead",
                tc.kv_load_failure_policy,
            )
        self._block_size = int(vllm_config.cache_config.block_size)
        self._load = bool(tc.is_kv_consumer)
        self._save = bool(tc.is_kv_producer)
        tp_rank = 0
        if role == KVConnectorRole.WORKER:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            tp_rank = get_tensor_model_parallel_rank()
        # The scheduler looks up rank 0's blocks; every worker rank loads and saves
        # its own (a rank that misses reports load errors and recomputes).
        self._ns = engine_namespace(vllm_config, self._opts, tp_rank)
        self._role_name = "scheduler" if role == KVConnectorRole.SCHEDULER else "worker"
        opts = self._opts

        def connect() -> BlockClient:
            return Client(
                opts.socket,
                address=opts.address,
                name=f"vllm-{self._role_name}",
                timeout=opts.timeout_s,
            )

        check = None if opts.address else (opts.socket or default_socket())
        self._link = DaemonLink(connect, check, retry_s=opts.retry_s)
        self.counters = ConnectorCounters()
        self._dirty = True  # the first flush writes the (zero) counters
        # scheduler side
        self._planner = PrefixPlanner(self._block_size, load=self._load, save=self._save)
        self._keys: dict[str, list[BlockKey]] = {}
        self._bypass: set[str] = set()  # requests whose KV depends on more than tokens
        # worker side
        self._paged: PagedBlocks | None = None
        self._load_errors: set[int] = set()
        log.info("kvstore connector (%s): namespace %s", self._role_name, self._ns)

    @property
    def requires_kv_delivery(self) -> bool:
        # A cache, not a hand-off: a save lost to preemption is just a later miss.
        return False

    # ------------------------------------------------------------------ helpers
    def _daemon_error(self, what: str, exc: KVStoreError) -> None:
        self.counters.daemon_errors += 1
        self._dirty = True
        if isinstance(exc, DaemonUnavailable):
            self._link.failed(exc)
        else:
            log.warning("kvstore %s failed: %s", what, exc)

    def _flush_counters(self) -> None:
        if self._dirty:
            self._dirty = False
            self.counters.dump(self._opts.stats_dir, self._role_name)

    @staticmethod
    def _cacheable(request: Request) -> bool:
        # KV of these depends on more than the token ids (or, for a cache salt, must
        # not be shared): token-derived keys would mix them up.
        return (
            request.prompt_token_ids is not None
            and getattr(request, "cache_salt", None) is None
            and getattr(request, "lora_request", None) is None
            and not getattr(request, "mm_features", None)
            and getattr(request, "prompt_embeds", None) is None
        )

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Leading prompt tokens beyond ``num_computed_tokens`` that kvstore holds."""
        req_id = request.request_id
        if not self._cacheable(request):
            self._bypass.add(req_id)
            return 0, False
        prompt = request.prompt_token_ids
        assert prompt is not None
        n = self._planner.lookup_blocks(len(prompt), request.num_tokens)
        hit = 0
        if self._load and n * self._block_size > num_computed_tokens:
            client = self._link.get()
            if client is not None:
                keys = self._keys.get(req_id)
                if keys is None or len(keys) < n:
                    keys = self._keys[req_id] = self._ns.block_keys(prompt[: n * self._block_size])
                t0 = time.perf_counter()
                try:
                    hit = min(client.lookup(keys[:n]).num_cached, n)
                except KVStoreError as exc:
                    self._daemon_error("lookup", exc)
                self.counters.lookup_s += time.perf_counter() - t0
                self.counters.lookups += 1
                self.counters.lookup_tokens += n * self._block_size
                self._dirty = True
        self._planner.record_lookup(req_id, prompt, hit)
        ext = self._planner.external_tokens(req_id, num_computed_tokens)
        return ext, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            return
        block_ids = blocks.get_block_ids()[0]
        self._planner.on_alloc(request.request_id, block_ids, num_external_tokens)
        self.counters.hit_tokens += num_external_tokens
        self._dirty = True

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        plan = ConnectorPlan(loads=self._planner.take_loads())
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            if new.prompt_token_ids is None or new.req_id in self._bypass:
                continue
            if new.req_id not in scheduled or new.lora_request is not None or new.mm_features:
                continue
            t = self._planner.on_scheduled(
                new.req_id,
                num_computed_tokens=new.num_computed_tokens,
                num_scheduled_tokens=scheduled[new.req_id],
                prompt=new.prompt_token_ids,
                block_ids=new.block_ids[0],
            )
            if t is not None:
                plan.saves.append(t)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id in self._bypass:
                continue
            ids = cached.new_block_ids[i]
            group = ids[0] if ids is not None else None
            resumed = req_id in cached.resumed_req_ids
            t = self._planner.on_scheduled(
                req_id,
                num_computed_tokens=cached.num_computed_tokens[i],
                num_scheduled_tokens=scheduled.get(req_id, 0),
                # A resumed (preempted) request gets all of its blocks anew.
                block_ids=group if resumed else None,
                new_block_ids=None if resumed else group,
            )
            if t is not None:
                plan.saves.append(t)
        self._flush_counters()
        return KVStoreConnectorMetadata(plan)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        # Saves finish inside the step (wait_for_save), so blocks may be freed now.
        self._planner.finish(request.request_id)
        self._keys.pop(request.request_id, None)
        self._bypass.discard(request.request_id)
        return False, None

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = order_layers(kv_caches)
        self._paged = PagedBlocks([t for _, t in layers])
        check_block_nbytes(self._ns, self._paged)
        log.info(
            "kvstore connector: %d layers, %d blocks of %d bytes",
            len(layers),
            self._paged.num_blocks,
            self._paged.block_nbytes,
        )

    def _plan(self) -> ConnectorPlan | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        return meta.plan

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Loads this step's planned blocks synchronously, before the forward."""
        plan = self._plan()
        if plan is None or not plan.loads:
            return
        if self._paged is None:
            raise RuntimeError("kvstore connector: start_load_kv before register_kv_caches")
        client = self._link.get()
        for t in plan.loads:
            self.counters.loads += 1
            self._dirty = True
            if client is None:
                self._fail(t)
                continue
            t0 = time.perf_counter()
            try:
                out = load_blocks(client, self._ns, self._paged, t)
            except KVStoreError as exc:
                self._daemon_error("load", exc)
                client = self._link.get()
                self._fail(t)
                continue
            finally:
                self.counters.load_s += time.perf_counter() - t0
            self.counters.loaded_blocks += out.loaded
            if out.failed_block_ids:
                self.counters.failed_blocks += len(out.failed_block_ids)
                self._load_errors.update(out.failed_block_ids)
                log.warning(
                    "kvstore: request %s: %d of %d blocks could not be loaded; recomputing",
                    t.req_id,
                    len(out.failed_block_ids),
                    len(t.block_ids),
                )

    def _fail(self, t: BlockTransfer) -> None:
        self.counters.failed_blocks += len(t.block_ids)
        self._load_errors.update(t.block_ids)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous: done in start_load_kv

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # whole blocks of every layer are saved once, in wait_for_save

    def wait_for_save(self) -> None:
        """Saves this step's newly computed full prompt blocks (the forward is done)."""
        plan = self._plan()
        if plan is not None and plan.saves:
            if self._paged is None:
                raise RuntimeError("kvstore connector: wait_for_save before register_kv_caches")
            for t in plan.saves:
                client = self._link.get()
                if client is None:
                    break
                t0 = time.perf_counter()
                try:
                    out = save_blocks(client, self._ns, self._paged, t)
                except KVStoreError as exc:
                    self._daemon_error("save", exc)
                    continue
                finally:
                    self.counters.save_s += time.perf_counter() - t0
                self.counters.saves += 1
                self.counters.saved_blocks += out.new
                self.counters.present_blocks += out.present
                self.counters.busy_blocks += out.busy
                self._dirty = True
        self._flush_counters()

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        self._flush_counters()
        self._link.close()
