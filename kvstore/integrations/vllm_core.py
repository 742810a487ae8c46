"""The engine-free half of the vLLM connector (no vllm import here).

``kvstore.integrations.vllm`` is thin glue over what lives here, so the logic
that decides what to load and save, the paged copy and the fault handling are
tested in the default suite with fakes, without vLLM installed:

* :func:`namespace_for` -- the kvstore :class:`~kvstore.keys.Namespace` of an
  engine's KV cache, from plain model facts.
* :class:`PrefixPlanner` -- scheduler-side bookkeeping: per request, which
  leading blocks kvstore holds, which engine blocks they must be loaded into,
  and which full prompt blocks became computable this step and should be saved.
* :class:`PagedBlocks` -- copies one engine block (all layers) to or from one
  contiguous kvstore block.
* In :mod:`kvstore.integrations.vllm_transfer`: :func:`load_blocks` /
  :func:`save_blocks` (the worker-side transfers through a
  :class:`~kvstore.client.Client`) and :class:`DaemonLink` (a client connected
  lazily, dropped on the first failure and retried after a back-off, so a missing
  or restarting daemon costs the engine nothing but cache hits).

A kvstore block of this connector is the engine block of every layer back to
back, in layer order: ``layer0[block_id] ‖ layer1[block_id] ‖ ...`` as raw bytes
(the canonical block order of ``kernels.layouts``).  Inside one layer's block
the bytes are whatever the engine's layout keeps there; the namespace's
``layout`` field names that layout, so blocks of different layouts never mix.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels import describe_kv_caches, gather_blocks, scatter_blocks
from kvstore.keys import Namespace

log = logging.getLogger(__name__)

PAGED_LAYOUT = "vllm_cpu"
"""The :mod:`kernels` layout name of vLLM's CPU KV cache."""

# vLLM's ``cache_dtype`` spellings and torch dtypes -> kvstore Namespace dtype names.
_CACHE_DTYPES: dict[str, str] = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3fn": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "float8_e5m2": "float8_e5m2",
    "int8": "int8",
    "uint8": "uint8",
}


def kv_dtype_name(dtype: torch.dtype | str) -> str:
    """The Namespace dtype name of a torch dtype or a vLLM ``cache_dtype`` string.

    Raises:
        ValueError: a dtype kvstore has no name for.
    """
    name = str(dtype).removeprefix("torch.")
    try:
        return _CACHE_DTYPES[name]
    except KeyError:
        raise ValueError(
            f"KV cache dtype {dtype!r} is not supported by kvstore; "
            f"known: {', '.join(sorted(_CACHE_DTYPES))}"
        ) from None


def namespace_for(
    *,
    model_id: str,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    kv_dtype: torch.dtype | str,
    layout: str,
    tp_rank: int = 0,
    tp_size: int = 1,
    tenant_salt: bytes = b"",
) -> Namespace:
    """The namespace of one engine rank's KV cache.

    Two engines share blocks exactly when every argument is equal: same model,
    same per-rank geometry, same block size (``block_tokens``), dtype, layout
    and tensor-parallel rank.

    Args:
        model_id: a name for the weights (vLLM's model path or id unless
            configured); engines loading the same weights must use the same id.
        num_layers: attention layers whose KV is cached.
        num_kv_heads: KV heads held by this rank.
        head_dim: elements per head.
        block_size: tokens per engine block; also kvstore's ``block_tokens``.
        kv_dtype: element type of the KV cache (torch dtype or vLLM name).
        layout: the engine's in-block byte layout, e.g. ``"vllm_cpu"``.
        tp_rank: this rank; tp_size: ranks in the tensor-parallel group.
        tenant_salt: keeps tenants' blocks apart.
    """
    return Namespace(
        model_id=model_id,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_tokens=block_size,
        kv_dtype=kv_dtype_name(kv_dtype),
        layout=layout,
        tp_rank=tp_rank,
        tp_size=tp_size,
        tenant_salt=tenant_salt,
    )


# ---------------------------------------------------------------- options
@dataclass(frozen=True, slots=True)
class ConnectorOptions:
    """The connector's ``kv_connector_extra_config`` keys, validated.

    Attributes:
        socket: the daemon's Unix socket (default: ``$KVSTORE_SOCKET`` or the
            daemon's default path).
        address: ``host:port`` of a TCP endpoint instead of the socket.
        model_id: names the weights in block keys (default: vLLM's model path/id);
            engines that load the same weights from different paths set the same id.
        tenant_salt: a string that keeps one tenant's blocks apart from others'.
        timeout_s: seconds for connecting and for each call to the daemon.
        retry_s: after a failure, seconds to serve without kvstore before retrying.
        stats_dir: if set, each connector writes its counters there as JSON.
    """

    socket: str | None = None
    address: str | None = None
    model_id: str | None = None
    tenant_salt: str = ""
    timeout_s: float = 2.0
    retry_s: float = 5.0
    stats_dir: str | None = None

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorOptions:
        """Parses ``kv_connector_extra_config``.

        Raises:
            ValueError: an unknown key (a typo would otherwise be ignored) or a bad value.
        """
        extra = dict(extra or {})
        known = set(cls.__slots__)  # type: ignore[attr-defined]
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(
                f"unknown kvstore connector option(s) {', '.join(unknown)} in "
                f"kv_connector_extra_config; known: {', '.join(sorted(known))}"
            )
        for name in ("timeout_s", "retry_s"):
            if name in extra:
                v = extra[name]
                if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                    raise ValueError(f"kv_connector_extra_config {name} must be > 0, got {v!r}")
                extra[name] = float(v)
        for name in ("socket", "address", "model_id", "tenant_salt", "stats_dir"):
            if name in extra and extra[name] is not None and not isinstance(extra[name], str):
                raise ValueError(
                    f"kv_connector_extra_config {name} must be a string, got {extra[name]!r}"
                )
        return cls(**extra)


# ---------------------------------------------------------------- plan (scheduler -> worker)
@dataclass(frozen=True, slots=True)
class BlockTransfer:
    """A run of one request's blocks to load into, or save from, the engine's cache.

    Attributes:
        req_id: the engine's request id.
        token_ids: the request's tokens from the start through block ``end - 1``
            (keys are chained, so every block's key needs all tokens before it).
        start: index (in the request) of the first block of the run.
        block_ids: engine block ids of blocks ``start .. end - 1``.
    """

    req_id: str
    token_ids: tuple[int, ...]
    start: int
    block_ids: tuple[int, ...]

    @property
    def end(self) -> int:
        return self.start + len(self.block_ids)


@dataclass(slots=True)
class ConnectorPlan:
    """One engine step's transfers: loads run before the forward, saves after it."""

    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)


@dataclass(slots=True)
class _Req:
    prompt: list[int]
    hit_blocks: int = 0  # leading blocks kvstore held at the last lookup
    block_ids: list[int] = field(default_factory=list)
    stored_blocks: int = 0  # leading prompt blocks known to be in kvstore (or being saved)
    load: BlockTransfer | None = None


class PrefixPlanner:
    """Scheduler-side bookkeeping of which blocks to load and which to save.

    Only prompt tokens are cached (a conversation's next turn resends them as its
    prompt).  A lookup never claims the block holding a request's last token: the
    engine must compute at least one token itself to produce logits.

    Args:
        block_tokens: tokens per engine block.
        load: look up and load cached prefixes.
        save: save full prompt blocks after they are computed.
    """

    def __init__(self, block_tokens: int, *, load: bool = True, save: bool = True) -> None:
        if block_tokens <= 0:
            raise ValueError(f"block_tokens must be positive, got {block_tokens}")
        self.block_tokens = block_tokens
        self.load_enabled = load
        self.save_enabled = save
        self._reqs: dict[str, _Req] = {}
        self._loads: list[BlockTransfer] = []

    def lookup_blocks(self, prompt_len: int, num_tokens: int) -> int:
        """How many leading blocks are worth looking up for a request."""
        if num_tokens <= 0:
            return 0
        return min(prompt_len, num_tokens - 1) // self.block_tokens

    def record_lookup(self, req_id: str, prompt: Sequence[int], hit_blocks: int) -> None:
        """Remembers how many leading blocks kvstore holds for ``req_id``."""
        r = self._reqs.get(req_id)
        if r is None:
            r = self._reqs[req_id] = _Req(list(prompt))
        r.hit_blocks = hit_blocks

    def external_tokens(self, req_id: str, num_computed_tokens: int) -> int:
        """Tokens kvstore can supply beyond the ``num_computed_tokens`` the engine has."""
        r = self._reqs.get(req_id)
        if r is None or not self.load_enabled:
            return 0
        return max(0, r.hit_blocks * self.block_tokens - num_computed_tokens)

    def on_alloc(self, req_id: str, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """The engine allocated ``block_ids`` (all of the request's blocks so far).

        With ``num_external_tokens > 0`` the blocks ending at the looked-up hit are
        scheduled for loading before the request's next forward.
        """
        r = self._reqs.get(req_id)
        if r is None or num_external_tokens <= 0:
            return
        bt = self.block_tokens
        if num_external_tokens % bt:
            raise ValueError(
                f"request {req_id}: {num_external_tokens} external tokens is not a whole "
                f"number of {bt}-token blocks"
            )
        end = r.hit_blocks
        start = end - num_external_tokens // bt
        if start < 0 or end > len(block_ids):
            raise ValueError(
                f"request {req_id}: load of blocks {start}..{end - 1} does not fit its "
                f"{len(block_ids)} allocated blocks"
            )
        r.block_ids = list(block_ids)
        r.load = BlockTransfer(
            req_id, tuple(r.prompt[: end * bt]), start, tuple(block_ids[start:end])
        )
        self._loads.append(r.load)
        # Loaded blocks are in kvstore already: never save them back.
        r.stored_blocks = max(r.stored_blocks, end)

    def on_scheduled(
        self,
        req_id: str,
        *,
        num_computed_tokens: int,
        num_scheduled_tokens: int,
        prompt: Sequence[int] | None = None,
        block_ids: Sequence[int] | None = None,
        new_block_ids: Sequence[int] | None = None,
    ) -> BlockTransfer | None:
        """A request runs this step; returns the prompt blocks to save after it, if any.

        Args:
            num_computed_tokens: tokens already computed before this step (local
                prefix hits and loaded tokens included).
            num_scheduled_tokens: tokens this step computes.
            prompt: the prompt, for a request first seen now.
            block_ids: all of the request's blocks (a new or resumed request).
            new_block_ids: blocks added to a running request this step.
        """
        r = self._reqs.get(req_id)
        if r is None:
            if prompt is None:
                return None  # not ours to track (e.g. a prompt of embeddings)
            r = self._reqs[req_id] = _Req(list(prompt))
        if block_ids is not None:
            r.block_ids = list(block_ids)
        elif new_block_ids:
            r.block_ids.extend(new_block_ids)
        if not self.save_enabled:
            return None
        bt = self.block_tokens
        done = min(num_computed_tokens + num_scheduled_tokens, len(r.prompt)) // bt
        done = min(done, len(r.block_ids))
        if done <= r.stored_blocks:
            return None
        start = r.stored_blocks
        r.stored_blocks = done
        return BlockTransfer(
            req_id, tuple(r.prompt[: done * bt]), start, tuple(r.block_ids[start:done])
        )

    def take_loads(self) -> list[BlockTransfer]:
        """The loads planned since the last call (each is handed out once)."""
        loads, self._loads = self._loads, []
        for t in loads:
            r = self._reqs.get(t.req_id)
            if r is not None:
                r.load = None
        return loads

    def finish(self, req_id: str) -> None:
        """Forgets a finished request."""
        self._reqs.pop(req_id, None)
        self._loads = [t for t in self._loads if t.req_id != req_id]

    def __len__(self) -> int:
        return len(self._reqs)


# ---------------------------------------------------------------- paged copies
def as_byte_tensor(buf: Any) -> torch.Tensor:
    """A flat ``uint8`` tensor over a buffer (memoryview, ndarray, bytes, tensor), no copy.

    Read-only buffers (pinned kvstore blocks) are wrapped too: torch has no
    read-only tensors and warns, so callers must only read from those.
    """
    if isinstance(buf, torch.Tensor):
        return buf.reshape(-1).view(torch.uint8)
    mv = memoryview(buf).cast("B")
    if not mv.readonly:
        return torch.frombuffer(mv, dtype=torch.uint8)
    with warnings.catch_warnings():
        # "The given buffer is not writable": we only ever read these bytes.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mv, dtype=torch.uint8)


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def order_layers(kv_caches: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Layers in model order (``layers.2`` before ``layers.10``), the order of a block's bytes."""
    return sorted(kv_caches.items(), key=lambda kv: _natural_key(kv[0]))


class PagedBlocks:
    """An engine's paged KV cache seen as whole blocks of every layer.

    Each layer is a tensor whose first dimension is the engine block id (vLLM's
    CPU layout ``[num_blocks, kv_heads, block_size, 2 * head_size]``).  One
    kvstore block is that block of every layer back to back: the canonical
    block of :mod:`kernels.layouts` for layout ``"vllm_cpu"``.  The copies are
    :func:`kernels.gather_blocks` / :func:`kernels.scatter_blocks` (their CPU
    twins here), one call per batch of blocks.

    Args:
        layers: one tensor per layer, in model order.

    Raises:
        ValueError: no layers, or layers that disagree in block count or block size
            (:class:`kernels.KernelInputError`, a ValueError, for other bad shapes).
    """

    def __init__(self, layers: Sequence[torch.Tensor]) -> None:
        if not layers:
            raise ValueError("no KV cache layers to register")
        first = layers[0]
        for i, t in enumerate(layers):
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(
                    f"layer {i} is {tuple(t.shape)} {t.dtype}; layer 0 is "
                    f"{tuple(first.shape)} {first.dtype}: one block size for all layers"
                )
            if t.device.type != "cpu":
                raise ValueError(
                    f"layer {i} is on {t.device}: this copy path is for CPU caches only"
                )
        self.layers = list(layers)
        self._kv = describe_kv_caches(self.layers, PAGED_LAYOUT)
        self.num_blocks = self._kv.num_blocks
        self.dtype = first.dtype
        self.layer_nbytes = self._kv.plane_nbytes
        self.block_nbytes = self._kv.block_nbytes

    def _bufs(self, block_ids: Sequence[int], bufs: Sequence[Any]) -> list[torch.Tensor]:
        if len(block_ids) != len(bufs):
            raise ValueError(f"{len(bufs)} buffers for {len(block_ids)} block ids")
        out = [as_byte_tensor(b) for b in bufs]
        for t in out:
            # Exact: a block of another size is another namespace's, never a prefix of ours.
            if t.numel() != self.block_nbytes:
                raise ValueError(f"buffer of {t.numel()} bytes for a block of {self.block_nbytes}")
        return out

    def gather_many(self, block_ids: Sequence[int], dsts: Sequence[Any]) -> None:
        """Copies engine blocks ``block_ids`` into the writable buffers ``dsts`` (one each)."""
        gather_blocks(self._kv, PAGED_LAYOUT, list(block_ids), self._bufs(block_ids, dsts))

    def scatter_many(self, block_ids: Sequence[int], srcs: Sequence[Any]) -> None:
        """Copies the kvstore blocks ``srcs`` into engine blocks ``block_ids`` (distinct ids)."""
        scatter_blocks(self._kv, PAGED_LAYOUT, list(block_ids), self._bufs(block_ids, srcs))

    def gather(self, block_id: int, dst: Any) -> None:
        """Copies engine block ``block_id`` of every layer into the writable buffer ``dst``."""
        self.gather_many([block_id], [dst])

    def scatter(self, block_id: int, src: Any) -> None:
        """Copies the kvstore block in ``src`` into engine block ``block_id`` of every layer."""
        self.scatter_many([block_id], [src])
