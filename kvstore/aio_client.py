"""asyncio twin of :class:`kvstore.client.Client` (``grpc.aio`` underneath).

Example:
    >>> async with await AsyncClient.connect() as c:
    ...     await c.store_tokens(ns, tokens, blocks)
    ...     async with await c.load_tokens(ns, tokens) as lease:
    ...         use(lease.arrays)
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np

from kvstore import _wire as w
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore._wire import Allocation, LookupResult, StoreResult
from kvstore.errors import DaemonUnavailable, from_rpc_error
from kvstore.keys import Namespace


class AsyncBlockLease:
    """Pinned zero-copy views; ``async with`` releases them."""

    def __init__(self, client: AsyncClient, keys: list[bytes], views: list[memoryview], bt: int):
        self._client = client
        self.keys = keys
        self.arrays = w.readonly_arrays(views)
        self.num_tokens = len(keys) * bt
        self._open = True

    async def close(self) -> None:
        if self._open:
            self._open = False
            self.arrays = []
            if self.keys:
                await self._client.release(self.keys)

    async def __aenter__(self) -> AsyncBlockLease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncClient:
    """Use :meth:`connect` to create one (connecting is asynchronous)."""

    def __init__(self, target: str, name: str, timeout: float) -> None:
        self.target = target
        self.name = name
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._mm: mmap.mmap | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._registered: set[bytes] = set()
        self._stub: Any = None
        self._arena = memoryview(b"")
        self.session_id = 0

    @classmethod
    async def connect(
        cls,
        socket: str | None = None,
        *,
        address: str | None = None,
        name: str = "",
        timeout: float = 10.0,
    ) -> AsyncClient:
        """Opens a session.  Raises :class:`DaemonUnavailable` if no daemon answers."""
        c = cls(w.target(socket, address), name, timeout)
        if w.missing_unix_socket(c.target):  # nothing can answer: say so now
            raise DaemonUnavailable(w.unavailable_msg(c.target))
        ch = grpc.aio.insecure_channel(c.target, options=w.CHANNEL_OPTIONS)
        try:
            await asyncio.wait_for(ch.channel_ready(), timeout)
        except TimeoutError:
            await ch.close()
            raise DaemonUnavailable(w.unavailable_msg(c.target)) from None
        c._channel = ch
        c._stub = pb_grpc.KVStoreStub(ch)
        try:
            resp = await c._stub.OpenSession(
                pb.OpenSessionRequest(client_name=name, client_pid=os.getpid()), timeout=timeout
            )
        except grpc.RpcError as exc:
            await ch.close()
            raise from_rpc_error(exc) from None
        c.session_id = resp.session_id
        c._mm = w.map_arena(resp.arena.path, resp.arena.size)
        c._arena = memoryview(c._mm)
        c._watch_task = asyncio.create_task(c._drain_watch())
        return c

    async def _drain_watch(self) -> None:
        call = self._stub.Watch(pb.WatchRequest(session_id=self.session_id))
        with contextlib.suppress(grpc.RpcError, asyncio.CancelledError):
            async for _ in call:
                pass

    async def close(self) -> None:
        if self._channel is None:
            return
        with contextlib.suppress(grpc.RpcError):
            await self._stub.CloseSession(
                pb.CloseSessionRequest(session_id=self.session_id), timeout=self.timeout
            )
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        await self._channel.close()
        self._channel = None
        if self._mm is not None:
            self._arena.release()
            with contextlib.suppress(BufferError):  # caller still holds views
                self._mm.close()
            self._mm = None

    # ------------------------------------------------------------------ model weights
    # The same verbs as Client's (loader.aio: the same exchange as loader.client).
    def _models_channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            raise DaemonUnavailable("client is closed")
        return self._channel

    async def load_model(self, name: str, device: str = "cpu", pin: bool = True) -> dict[str, Any]:
        """Tensors of model ``name`` (views on shared memory; pinned for this session)."""
        from loader import aio

        ch = self._models_channel()
        return await aio.load_model(ch, name, device, session_id=self.session_id, pin=pin)

    async def swap(self, old: str, new: str, device: str = "cpu") -> dict[str, Any]:
        """Makes ``new`` resident and pinned, unpins ``old``; returns ``new``'s tensors."""
        from loader import aio

        ch = self._models_channel()
        return await aio.swap_models(ch, old, new, device, session_id=self.session_id)

    async def prefetch_model(self, name: str) -> str:
        from loader import aio

        return await aio.prefetch_model(self._models_channel(), name)

    async def release_model(self, name: str, evict: bool = False) -> int:
        from loader import aio

        ch = self._models_channel()
        return await aio.release_model(ch, name, session_id=self.session_id, evict=evict)

    async def models(self) -> list[dict[str, Any]]:
        from loader import aio

        return await aio.list_models(self._models_channel())

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _rpc(self, method: str, build: Callable[[int], Any]) -> Any:
        if self._channel is None:
            raise DaemonUnavailable("client is closed")
        try:
            return await getattr(self._stub, method)(build(self.session_id), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # ------------------------------------------------------------------ verbs
    async def register_namespace(self, ns: Namespace) -> bytes:
        resp = await self._rpc("RegisterNamespace", lambda sid: w.register_req(sid, ns))
        self._registered.add(bytes(resp.namespace_id))
        return bytes(resp.namespace_id)

    async def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        resp = await self._rpc("Lookup", lambda sid: w.lookup_req(sid, keys))
        return w.lookup_result(resp)

    async def allocate(
        self,
        ns: Namespace,
        keys: Sequence[bytes],
        parent: bytes | None = None,
        first_depth: int = 0,
    ) -> list[Allocation]:
        ns_id = ns.digest()
        if ns_id not in self._registered:
            await self.register_namespace(ns)
        resp = await self._rpc(
            "Allocate",
            lambda sid: w.allocate_req(sid, ns_id, ns.block_nbytes, parent, keys, first_depth),
        )
        return w.allocations(keys, resp, self._arena)

    async def commit(
        self, keys: Sequence[bytes], checksums: Sequence[int] | None = None
    ) -> list[str]:
        resp = await self._rpc(
            "Commit",
            lambda sid: pb.CommitRequest(session_id=sid, keys=keys, checksums=checksums or []),
        )
        return w.status_names(resp.status)

    async def abort(self, keys: Sequence[bytes]) -> int:
        resp = await self._rpc("Abort", lambda sid: pb.AbortRequest(session_id=sid, keys=keys))
        return int(resp.aborted)

    async def acquire(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        resp = await self._rpc("Acquire", lambda sid: pb.AcquireRequest(session_id=sid, keys=keys))
        return w.acquired_views(resp, self._arena)

    async def release(self, keys: Sequence[bytes]) -> None:
        await self._rpc("Release", lambda sid: pb.ReleaseRequest(session_id=sid, keys=keys))

    async def prefetch(self, keys: Sequence[bytes]) -> int:
        """Promotes blocks to DRAM ahead of need; returns how many moved."""
        resp = await self._rpc(
            "Prefetch", lambda sid: pb.PrefetchRequest(session_id=sid, keys=keys)
        )
        return int(resp.scheduled)

    async def delete(self, keys: Sequence[bytes]) -> list[str]:
        resp = await self._rpc("Delete", lambda sid: pb.DeleteRequest(session_id=sid, keys=keys))
        return w.status_names(resp.status)

    async def stats(self) -> dict[str, Any]:
        return w.parse_stats(await self._rpc("Stats", lambda sid: pb.StatsRequest()))

    # ------------------------------------------------------------------ engine level
    async def lookup_tokens(self, ns: Namespace, token_ids: Sequence[int] | np.ndarray) -> int:
        keys = ns.block_keys(token_ids)
        return (await self.lookup(keys)).num_cached * ns.block_tokens if keys else 0

    async def store_tokens(
        self,
        ns: Namespace,
        token_ids: Sequence[int] | np.ndarray,
        blocks: Sequence[Any] | Callable[[int, np.ndarray], None],
        checksums: bool = True,
    ) -> StoreResult:
        keys = ns.block_keys(token_ids)
        fill = w.block_filler(blocks, len(keys), ns.block_nbytes)
        if not keys:
            return StoreResult(0, 0)
        allocs = await self.allocate(ns, keys)
        new = [(i, a) for i, a in enumerate(allocs) if a.status == "NEW"]
        try:
            for i, a in new:
                assert a.view is not None
                fill(i, np.frombuffer(a.view, dtype=np.uint8))
        except BaseException:
            await self.abort([a.key for _, a in new])
            raise
        if new:
            sums = [w.checksum(a.view) for _, a in new] if checksums else None  # type: ignore[arg-type]
            await self.commit([a.key for _, a in new], sums)
        return StoreResult(len(new), sum(1 for a in allocs if a.status == "PRESENT"))

    async def load_tokens(
        self, ns: Namespace, token_ids: Sequence[int] | np.ndarray
    ) -> AsyncBlockLease:
        keys = ns.block_keys(token_ids)
        n = (await self.lookup(keys)).num_cached if keys else 0
        if n == 0:
            return AsyncBlockLease(self, [], [], ns.block_tokens)
        views = await self.acquire(keys[:n])
        m = next((i for i, v in enumerate(views) if v is None), len(views))
        tail = [k for k, v in zip(keys[m:n], views[m:], strict=True) if v is not None]
        if tail:
            await self.release(tail)
        held = [v for v in views[:m] if v is not None]
        return AsyncBlockLease(self, list(keys[:m]), held, ns.block_tokens)
