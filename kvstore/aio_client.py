"""asyncio twin of :class:`kvstore.client.Client` (``grpc.aio`` underneath).

Example:
    >>> async with await AsyncClient.connect() as c:
    ...     await c.store_tokens(ns, tokens, blocks)
    ...     async with await c.load_tokens(ns, tokens) as lease:
    ...         use(lease.arrays)

Like :class:`~kvstore.client.Client`, it survives a daemon restart: a call that finds
the daemon gone or its session unknown reconnects (new channel, new session, the new
arena mapped) and is retried once; releasing pins or leases of a session that ended
raises LeaseLost (what was read under them cannot be vouched for).  Coroutines share
one reconnect: the others wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from kvstore import _wire as w
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore._wire import Allocation, LookupResult, StoreResult
from kvstore.errors import DaemonUnavailable, KVStoreError, LeaseLost, from_rpc_error
from kvstore.keys import Namespace

T = TypeVar("T")
log = logging.getLogger(__name__)


class _CutOff(grpc.RpcError):
    """A call on a channel the client closed under it (another coroutine's reconnect).

    grpc.aio raises ``CancelledError`` for such a call; to the caller it is a call the
    server cancelled: the session is lost (CANCELLED, see :func:`_wire.is_session_lost`).
    """

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "the client closed the call's channel (a reconnect, or close()) under it"


class _Failed(Exception):
    """A call in session ``sid`` failed with ``exc`` (internal to :class:`AsyncClient`)."""

    def __init__(self, sid: int, exc: grpc.RpcError) -> None:
        self.sid = sid
        self.exc = exc


class AsyncBlockLease:
    """Pinned zero-copy views; ``async with`` releases them."""

    def __init__(
        self,
        client: AsyncClient,
        keys: list[bytes],
        views: list[memoryview],
        bt: int,
        session_id: int | None = None,
    ) -> None:
        self._client = client
        # The session that holds the pins.
        self._session_id = client.session_id if session_id is None else session_id
        self.keys = keys
        self.arrays = w.readonly_arrays(views)
        self.num_tokens = len(keys) * bt
        self._open = True

    async def close(self) -> None:
        """Releases the pins (raises :class:`LeaseLost` as :meth:`BlockLease.close`)."""
        if self._open:
            self._open = False
            self.arrays = []
            if self.keys:
                await self._client._release_lease(self._session_id, self.keys)

    async def __aenter__(self) -> AsyncBlockLease:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.close()
            return
        try:  # the exception in flight says more than a failed release would
            await self.close()
        except KVStoreError as err:
            log.warning("kvstore: lease release failed while handling an error: %s", err)


class AsyncClient:
    """Use :meth:`connect` to create one (connecting is asynchronous).

    Safe to share between coroutines of one event loop.  ``reconnect``: after the daemon
    restarts, reopen the session once and retry the call (as :class:`Client` does).
    """

    def __init__(self, target: str, name: str, timeout: float, reconnect: bool = True) -> None:
        self.target = target
        self.name = name
        self.timeout = timeout
        self.auto_reconnect = reconnect
        self._channel: grpc.aio.Channel | None = None
        self._arena: w.ArenaMap | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._namespaces: dict[bytes, Namespace] = {}
        self._stub: Any = None
        self.session_id = 0
        # Pins taken by acquire(), in the current session and in sessions that ended.
        self._pins: Counter[bytes] = Counter()
        self._ended_pins: Counter[bytes] = Counter()
        self._reconnecting: asyncio.Task[None] | None = None  # the one under way
        self._closed = False
        self._models_held = w.HeldModels()

    @classmethod
    async def connect(
        cls,
        socket: str | None = None,
        *,
        address: str | None = None,
        name: str = "",
        timeout: float = 10.0,
        reconnect: bool = True,
    ) -> AsyncClient:
        """Opens a session.  Raises :class:`DaemonUnavailable` if no daemon answers."""
        c = cls(w.target(socket, address), name, timeout, reconnect)
        if w.missing_unix_socket(c.target):
            # Nothing can answer there: say so now rather than after the connect timeout.
            # (A reconnect still waits: the socket is briefly missing while a daemon restarts.)
            raise DaemonUnavailable(w.unavailable_msg(c.target))
        await c._open()
        return c

    # ------------------------------------------------------------------ connection
    async def _open(self, previous: int = 0) -> None:
        """Connects and opens a session; the client's state changes only on success.
        A reconnect names its ``previous`` session (the daemon carries over the model
        pins it kept for us)."""
        ch = grpc.aio.insecure_channel(self.target, options=w.CHANNEL_OPTIONS)
        mm: w.ArenaMap | None = None
        try:
            try:
                await asyncio.wait_for(ch.channel_ready(), self.timeout)
            except TimeoutError:
                raise DaemonUnavailable(w.unavailable_msg(self.target)) from None
            stub = pb_grpc.KVStoreStub(ch)
            try:
                resp = await stub.OpenSession(
                    pb.OpenSessionRequest(
                        client_name=self.name, client_pid=os.getpid(), previous_session_id=previous
                    ),
                    timeout=self.timeout,
                )
                sid = resp.session_id
                mm = w.map_arena(resp.arena.path, resp.arena.size)
                for ns in self._namespaces.values():  # a restarted daemon knows none
                    await stub.RegisterNamespace(w.register_req(sid, ns), timeout=self.timeout)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
        except BaseException:
            if mm is not None:
                mm.close()
            await asyncio.shield(ch.close())
            raise
        self._channel, self._stub, self.session_id = ch, stub, sid
        self._arena = mm
        self._models_held.reopened(resp.adopted_models, previous, sid)
        self._watch_task = asyncio.create_task(self._drain_watch(stub, sid))

    @staticmethod
    async def _drain_watch(stub: Any, sid: int) -> None:
        # Holding this stream open is what tells the daemon we are alive.
        call = stub.Watch(pb.WatchRequest(session_id=sid))
        with contextlib.suppress(grpc.RpcError, asyncio.CancelledError):
            async for _ in call:
                pass

    async def _teardown(self) -> None:
        task, self._watch_task = self._watch_task, None
        ch, self._channel = self._channel, None
        try:
            if task is not None:
                task.cancel()
                await asyncio.wait({task})
        finally:  # even if close() cancels the reconnect doing this
            if ch is not None:
                await asyncio.shield(ch.close())
            if self._arena is not None:
                self._arena.close()  # views handed out keep the mapping alive
                self._arena = None

    def _mapped(self) -> w.ArenaMap:
        if self._arena is None:
            raise DaemonUnavailable("client is closed")
        return self._arena

    async def reconnect(self) -> None:
        """Drops the connection and opens a new session (e.g. after a daemon restart).

        The KV pins of the old session end with it (the daemon releases them); its
        model pins carry over to the new one when the same daemon still keeps
        them (:attr:`lost_models` names those it did not).  Views
        handed out before stay readable, on the old arena's mapping (which lives as
        long as they do), but are no longer the daemon's blocks: acquire them again.
        If a reconnect is under way already, waits for that one instead.

        Raises:
            DaemonUnavailable: no daemon answers within ``timeout`` (the client is then
                closed until a later ``reconnect()`` succeeds).
        """
        self._closed = False
        await self._join(self._reconnecting or self._start_reconnect())

    def _start_reconnect(self) -> asyncio.Task[None]:
        task = asyncio.create_task(self._reopen())
        self._reconnecting = task

        def done(t: asyncio.Task[None]) -> None:
            if self._reconnecting is t:
                self._reconnecting = None
            if not t.cancelled():
                t.exception()  # retrieved: the waiters, if any, raise it

        task.add_done_callback(done)
        return task

    async def _reopen(self) -> None:
        previous = self.session_id
        await self._teardown()
        self._ended_pins += self._pins
        self._pins = Counter()
        await self._open(previous)

    @staticmethod
    async def _join(task: asyncio.Task[None]) -> None:
        await asyncio.wait({task})  # a cancelled waiter leaves the reconnect running
        if task.cancelled():
            raise DaemonUnavailable("client is closed")
        if (exc := task.exception()) is not None:
            raise exc

    async def _settled(self) -> None:
        """Waits for a reconnect under way (its outcome is for whoever started it)."""
        if self._reconnecting is not None:
            await asyncio.wait({self._reconnecting})

    async def _recover(self, sid: int) -> None:
        """After a call in session ``sid`` found the session lost: reconnects, unless
        another coroutine is doing so (then waits for it) or has done so already."""
        if self._closed:
            raise DaemonUnavailable("client is closed")
        if self._reconnecting is not None:
            await self._join(self._reconnecting)
        elif self._channel is None:
            raise DaemonUnavailable("client is closed")  # a reconnect since failed
        elif sid == self.session_id:
            await self._join(self._start_reconnect())
        # else: another coroutine reconnected since this call was sent

    async def _send(self, method: str, build: Callable[[int], Any]) -> tuple[int, Any]:
        """One call in the current session; returns ``(session id, response)``."""
        ch, stub, sid = self._channel, self._stub, self.session_id
        try:
            return sid, await getattr(stub, method)(build(sid), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _Failed(sid, exc) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if ch is self._channel or (task is not None and task.cancelling()):
                raise  # the caller was cancelled
            raise _Failed(sid, _CutOff()) from None

    async def close(self) -> None:
        """Ends the session: the daemon releases its pins and aborts its allocations."""
        self._closed = True
        if (task := self._reconnecting) is not None:
            task.cancel()
            await asyncio.wait({task})
        if self._channel is None:
            return
        with contextlib.suppress(grpc.RpcError):
            await self._stub.CloseSession(
                pb.CloseSessionRequest(session_id=self.session_id), timeout=self.timeout
            )
        await self._teardown()

    # ------------------------------------------------------------------ model weights
    # As Client's (a call that finds its session lost reconnects once); -> (its session, answer)
    async def _models(self, call: Callable[[grpc.aio.Channel, int], Awaitable[T]]) -> tuple[int, T]:
        from loader.errors import ModelError, ModelUnavailableError

        for attempt in (0, 1):
            await self._settled()
            ch, sid = self._channel, self.session_id
            if ch is None:
                raise DaemonUnavailable("client is closed")
            try:
                return sid, await call(ch, sid)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if ch is self._channel or (task is not None and task.cancelling()):
                    raise  # the caller was cancelled
                # Another coroutine's reconnect closed the channel under this call.
                err: ModelError = ModelUnavailableError(_CutOff().details())
                err.session_lost = True
            except ModelError as exc:
                err = exc
            if not (attempt == 0 and self.auto_reconnect and err.session_lost):
                raise err
            log.warning("kvstore session lost (%s); reconnecting", err.code)
            try:
                await self._recover(sid)
            except DaemonUnavailable:
                raise err from None
        raise AssertionError("unreachable")

    async def load_model(self, name: str, device: str = "cpu", pin: bool = True) -> dict[str, Any]:
        """Tensors of model ``name`` (views on shared memory; pinned for this session)."""
        from loader import aio

        sid, out = await self._models(
            lambda ch, sid: aio.load_model(ch, name, device, session_id=sid, pin=pin)
        )
        self._models_held.loaded(name, pin, sid)  # a reconnect may have overtaken it
        return out

    @property
    def lost_models(self) -> frozenset[str]:
        """Models whose pin this client lost (as :attr:`Client.lost_models`)."""
        return frozenset(self._models_held.lost)

    async def swap(self, old: str, new: str, device: str = "cpu") -> dict[str, Any]:
        """Makes ``new`` resident and pinned, unpins ``old``; returns ``new``'s tensors.

        After a reconnect that did not keep the pin on ``old`` (the daemon restarted),
        ``new`` is simply loaded and pinned."""
        from loader import aio

        await self._settled()
        first = self.session_id

        async def call(ch: grpc.aio.Channel, sid: int) -> dict[str, Any]:
            if old in self._models_held.lost or (
                sid != first and old not in self._models_held.held
            ):
                # Its pin ended with an earlier session (a reconnect, by this call or
                # another): there is nothing to swap from, just load and pin ``new``.
                return await aio.load_model(ch, new, device, session_id=sid)
            return await aio.swap_models(ch, old, new, device, session_id=sid)

        sid, out = await self._models(call)
        self._models_held.swapped_from(old)
        self._models_held.loaded(new, session=sid)
        return out

    async def prefetch_model(self, name: str) -> str:
        from loader import aio

        return (await self._models(lambda ch, sid: aio.prefetch_model(ch, name)))[1]

    async def release_model(self, name: str, evict: bool = False) -> int:
        from loader import aio
        from loader.errors import ModelPinLost

        _, n = await self._models(
            lambda ch, sid: aio.release_model(ch, name, session_id=sid, evict=evict)
        )
        if self._models_held.released(name):
            raise ModelPinLost(name)
        return n

    async def models(self) -> list[dict[str, Any]]:
        from loader import aio

        return (await self._models(lambda ch, sid: aio.list_models(ch)))[1]

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _rpc(self, method: str, build: Callable[[int], Any]) -> Any:
        return (await self._rpc_in(method, build))[1]

    async def _rpc_in(self, method: str, build: Callable[[int], Any]) -> tuple[int, Any]:
        """The call, retried once in a new session if it finds its own lost; returns
        ``(the session that answered, response)``."""
        for attempt in (0, 1):
            await self._settled()
            if self._channel is None:
                raise DaemonUnavailable("client is closed")
            try:
                return await self._send(method, build)
            except _Failed as f:
                exc = f.exc
                if attempt == 0 and self.auto_reconnect and w.is_session_lost(exc):
                    log.warning("kvstore session lost (%s); reconnecting", exc.code())
                    try:
                        await self._recover(f.sid)
                    except DaemonUnavailable:
                        raise from_rpc_error(exc) from None
                    continue
                raise from_rpc_error(exc) from None
        raise AssertionError("unreachable")

    async def _release_lease(self, sid: int, keys: Sequence[bytes]) -> None:
        """Releases pins in session ``sid``, the one that took them.

        Raises:
            LeaseLost: that session no longer holds them (as :meth:`Client.release`);
                when the release itself finds the session lost, the client reconnects
                first, as any call would.  Other errors raise as for :meth:`release`.
        """
        await self._settled()
        if self._channel is None or sid != self.session_id:
            raise LeaseLost(len(keys))
        try:
            await self._send("Release", lambda s: pb.ReleaseRequest(session_id=s, keys=keys))
        except _Failed as f:
            exc = f.exc
            if not w.is_session_lost(exc):
                raise from_rpc_error(exc) from None
            if self.auto_reconnect:
                log.warning("kvstore session lost (%s); reconnecting", exc.code())
                with contextlib.suppress(DaemonUnavailable):
                    await self._recover(f.sid)  # a later call retries if this fails
            raise LeaseLost(len(keys), f"the session ended: {exc.code().name}") from None

    # ------------------------------------------------------------------ verbs
    async def register_namespace(self, ns: Namespace) -> bytes:
        """Registers ``ns`` with the daemon; returns its id (``ns.digest()``)."""
        resp = await self._rpc("RegisterNamespace", lambda sid: w.register_req(sid, ns))
        ns_id = bytes(resp.namespace_id)
        self._namespaces[ns_id] = ns  # registered again in every new session
        return ns_id

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
        if ns_id not in self._namespaces:
            await self.register_namespace(ns)
        for _ in (0, 1):
            sid, resp = await self._rpc_in(
                "Allocate",
                lambda sid: w.allocate_req(sid, ns_id, ns.block_nbytes, parent, keys, first_depth),
            )
            if sid == self.session_id:
                return w.allocations(keys, resp, self._mapped())
            # As in _acquire: the slots were the old session's (aborted with it).
        raise DaemonUnavailable("the session was replaced twice during one Allocate")

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
        """Pins blocks (promoting them to DRAM) and returns read-only views, ``None`` = miss.

        Give the pins back with :meth:`release`; they also end with the session.
        """
        _, views = await self._acquire(keys)
        self._pins.update(k for k, v in zip(keys, views, strict=True) if v is not None)
        # Read-only, as the sync client's: committed blocks are immutable, and a write
        # through a view would change bytes other readers were promised.
        return [None if v is None else v.toreadonly() for v in views]

    async def _acquire(self, keys: Sequence[bytes]) -> tuple[int, list[memoryview | None]]:
        """The session that holds the pins, and the views (``None`` = miss)."""
        for _ in (0, 1):
            sid, resp = await self._rpc_in(
                "Acquire", lambda sid: pb.AcquireRequest(session_id=sid, keys=keys)
            )
            if sid == self.session_id:
                return sid, w.acquired_views(resp, self._mapped())
            # Another coroutine's reconnect replaced the session while this answer was
            # on its way: those pins ended with the old session, whose arena the slot
            # offsets are in.  Views on them could change under the caller: ask again.
        raise DaemonUnavailable("the session was replaced twice during one Acquire")

    async def release(self, keys: Sequence[bytes]) -> None:
        """Gives back pins taken by :meth:`acquire` (one per key listed).

        Raises:
            LeaseLost: some of these pins were lost before this release, as
                :meth:`Client.release` (the others are released all the same).
            FailedPrecondition: a key this client's session does not hold (nothing
                is released then).
            DaemonUnavailable: no daemon answers.
        """
        await self._settled()  # a reconnect under way ends the current pins
        taken, send, lost = w.split_release(self._pins, self._ended_pins, keys)
        if send is not None:
            if self._channel is None:
                self._pins += taken
                raise DaemonUnavailable("client is closed")
            try:
                # In this session only: if it ended meanwhile, so did its pins.
                await self._release_lease(self.session_id, send)
            except LeaseLost as exc:
                raise LeaseLost(exc.lost + lost) from None  # gone: not given back
            except BaseException:
                self._pins += taken  # nothing was released
                raise
        if lost:
            raise LeaseLost(lost)

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
        sid, views = await self._acquire(keys[:n])
        m = next((i for i, v in enumerate(views) if v is None), len(views))
        # A block in the middle vanished (evicted between lookup and acquire): only the
        # prefix before it is usable, so give back the pins taken after it.
        tail = [k for k, v in zip(keys[m:n], views[m:], strict=True) if v is not None]
        if tail:
            await self._release_lease(sid, tail)
        held = [v for v in views[:m] if v is not None]
        return AsyncBlockLease(self, list(keys[:m]), held, ns.block_tokens, sid)
