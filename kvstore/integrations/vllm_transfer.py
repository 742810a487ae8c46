"""Worker-side transfers of the vLLM connector, its daemon link and its counters.

Split from :mod:`kvstore.integrations.vllm_core` (no vllm import here either).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import xxhash

from kvstore.errors import KVStoreError
from kvstore.integrations.vllm_core import BlockTransfer, PagedBlocks
from kvstore.keys import DTYPE_BYTES, BlockKey, Namespace

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- transfers
class BlockClient(Protocol):
    """The client verbs the connector uses (a :class:`kvstore.Client`, or a fake)."""

    def lookup(self, keys: Sequence[bytes]) -> Any: ...
    def allocate(
        self,
        ns: Namespace,
        keys: Sequence[bytes],
        parent: bytes | None = ...,
        first_depth: int = ...,
    ) -> list[Any]: ...
    def commit(self, keys: Sequence[bytes], checksums: Sequence[int] | None = ...) -> list[str]: ...
    def abort(self, keys: Sequence[bytes]) -> int: ...
    def acquire(self, keys: Sequence[bytes]) -> list[memoryview | None]: ...
    def release(self, keys: Sequence[bytes]) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    """``loaded`` blocks were copied in; ``failed_block_ids`` must be recomputed."""

    loaded: int
    failed_block_ids: tuple[int, ...]


def transfer_keys(ns: Namespace, t: BlockTransfer) -> tuple[list[BlockKey], bytes | None]:
    """Keys of the run's blocks, and the key of the block before it (``None`` at the start)."""
    keys = ns.block_keys(t.token_ids)
    if len(keys) < t.end:
        raise ValueError(
            f"request {t.req_id}: {len(t.token_ids)} tokens make {len(keys)} blocks, "
            f"the transfer needs {t.end}"
        )
    return keys[t.start : t.end], (keys[t.start - 1] if t.start else None)


def load_blocks(
    client: BlockClient, ns: Namespace, paged: PagedBlocks, t: BlockTransfer
) -> LoadOutcome:
    """Pins the run's blocks in kvstore and copies them into the engine's cache.

    Copies blocks in order up to the first one kvstore cannot serve (evicted since
    the lookup, failed its checksum, or the wrong size); that block and every later
    one are reported as failed, so the engine recomputes from there.  Every pin
    taken is released; if that fails (the session ended during the copy, so the
    bytes may have changed under it), every block is reported as failed.

    Raises:
        KVStoreError: the daemon failed; nothing was loaded (all blocks failed).
    """
    keys, _ = transfer_keys(ns, t)
    views = client.acquire(keys)
    held = [k for k, v in zip(keys, views, strict=True) if v is not None]
    n_ok = next(
        (i for i, v in enumerate(views) if v is None or v.nbytes != paged.block_nbytes),
        len(views),
    )
    try:
        if n_ok:
            paged.scatter_many(t.block_ids[:n_ok], views[:n_ok])
    finally:
        del views
        if held:
            try:
                client.release(held)
            except KVStoreError as exc:
                # The pins were not provably held through the copy (LeaseLost: the
                # session ended, so the slots may have been reused under it): what was
                # copied cannot be vouched for, and the engine recomputes all of it.
                log.warning("kvstore: release after load failed, recomputing: %s", exc)
                n_ok = 0
    return LoadOutcome(n_ok, tuple(t.block_ids[n_ok:]))


@dataclass(frozen=True, slots=True)
class SaveOutcome:
    """Blocks ``new``ly written, already ``present`` (dedup), or ``busy`` (being written)."""

    new: int
    present: int
    busy: int


def save_blocks(
    client: BlockClient, ns: Namespace, paged: PagedBlocks, t: BlockTransfer
) -> SaveOutcome:
    """Writes the run's blocks from the engine's cache into kvstore.

    Allocate -> copy into the arena slots -> commit with xxh3-64 checksums; a copy
    that fails aborts the slots, so nothing half-written is ever visible.

    Raises:
        KVStoreError: the daemon failed or has no room; nothing was committed.
    """
    keys, parent = transfer_keys(ns, t)
    allocs = client.allocate(ns, keys, parent=parent, first_depth=t.start)
    new = [(i, a) for i, a in enumerate(allocs) if a.status == "NEW"]
    new_keys = [a.key for _, a in new]
    sums: list[int] = []
    try:
        if new:
            paged.gather_many([t.block_ids[i] for i, _ in new], [a.view for _, a in new])
            sums = [int(xxhash.xxh3_64_intdigest(a.view)) for _, a in new]
    except BaseException:
        client.abort(new_keys)
        raise
    if new_keys:
        client.commit(new_keys, sums)
    present = sum(1 for a in allocs if a.status == "PRESENT")
    return SaveOutcome(len(new), present, len(allocs) - len(new) - present)


# ---------------------------------------------------------------- daemon link
class DaemonLink:
    """A lazily connected client that gives up quietly and retries later.

    ``get()`` returns a live client or ``None``.  After a failure (no daemon, or a
    call that failed) the link stays down for ``retry_s`` seconds, so the engine
    pays a failed connect at most once per interval.  With a Unix socket that
    does not exist, no connect is even tried.

    Args:
        factory: makes a connected client; raises :class:`KVStoreError` when the
            daemon is not there.
        socket: the Unix socket path (checked for existence first), or ``None``.
        retry_s: seconds to wait after a failure before trying again.
        clock: monotonic clock (tests replace it).
    """

    def __init__(
        self,
        factory: Callable[[], BlockClient],
        socket: str | None,
        retry_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = factory
        self.socket = socket
        self.retry_s = retry_s
        self._clock = clock
        self._client: BlockClient | None = None
        self._down_until = 0.0
        self.failures = 0

    def get(self) -> BlockClient | None:
        if self._client is not None:
            return self._client
        if self._clock() < self._down_until:
            return None
        if self.socket is not None and not os.path.exists(self.socket):
            self._mark_down(f"no daemon socket at {self.socket}")
            return None
        try:
            self._client = self._factory()
        except KVStoreError as exc:
            self._mark_down(str(exc))
            return None
        log.info("kvstore: connected to the daemon")
        return self._client

    def failed(self, exc: BaseException) -> None:
        """A call through the client failed: drop it and stay down for a while."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except KVStoreError:
                pass  # the daemon is gone already
        self._mark_down(str(exc))

    def _mark_down(self, why: str) -> None:
        self.failures += 1
        self._down_until = self._clock() + self.retry_s
        log.warning("kvstore unavailable (%s); serving without it for %.0fs", why, self.retry_s)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except KVStoreError:
                pass


# ---------------------------------------------------------------- counters
@dataclass(slots=True)
class ConnectorCounters:
    """What one connector instance did; dumped to JSON when ``stats_dir`` is set."""

    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    loads: int = 0
    loaded_blocks: int = 0
    failed_blocks: int = 0
    saves: int = 0
    saved_blocks: int = 0
    present_blocks: int = 0
    busy_blocks: int = 0
    daemon_errors: int = 0
    lookup_s: float = 0.0  # seconds spent in lookups (scheduler)
    load_s: float = 0.0  # seconds spent loading blocks into the cache (worker)
    save_s: float = 0.0  # seconds spent saving blocks (worker)

    def dump(self, stats_dir: str | None, role: str) -> None:
        """Writes the counters to ``stats_dir/<role>-<pid>.json`` (atomically)."""
        if not stats_dir:
            return
        d = Path(stats_dir)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{role}-{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)


def read_counters(stats_dir: str | Path) -> dict[str, dict[str, float]]:
    """Every counters file in ``stats_dir``, by file stem (``scheduler-123``, ``worker-124``)."""
    out = {}
    for p in sorted(Path(stats_dir).glob("*.json")):
        out[p.stem] = json.loads(p.read_text())
    return out


def check_block_nbytes(ns: Namespace, paged: PagedBlocks) -> None:
    """Raises ValueError when the engine's blocks are not the namespace's size."""
    if paged.block_nbytes != ns.block_nbytes:
        raise ValueError(
            f"the engine's KV blocks are {paged.block_nbytes} bytes ({len(paged.layers)} layers x "
            f"{paged.layer_nbytes}) but the namespace {ns.model_id!r} expects {ns.block_nbytes} "
            f"({ns.num_layers} layers x 2 x {ns.block_tokens} tokens x {ns.num_kv_heads} heads x "
            f"{ns.head_dim} x {DTYPE_BYTES[ns.kv_dtype]} bytes): check num_layers / dtype"
        )
