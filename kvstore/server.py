"""gRPC servicer: validates requests, maps them onto the hierarchy, answers statuses.

Every error is a gRPC status with a message a person can act on; a bad request
never changes state (validation happens before any mutation) and never stops
the daemon.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc
import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.acquire import acquire_finish
from kvstore.entry import PENDING, READY
from kvstore.hierarchy import Status
from kvstore.keys import KEY_BYTES, KeyInputError, Namespace, key_length_error, unpack_keys
from kvstore.sessions import Session

if TYPE_CHECKING:
    from kvstore.daemon import Daemon

log = logging.getLogger("kvstore.server")

Ctx: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class _Abort(Exception):
    """Raised by validators; turned into ``context.abort`` by :func:`_guard`."""

    def __init__(self, code: grpc.StatusCode, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _fail(code: grpc.StatusCode, msg: str) -> NoReturn:
    raise _Abort(code, msg)


def _codes(statuses: Sequence[Status]) -> list[Any]:
    """Per-key statuses as wire enum values (``Status`` mirrors ``KeyStatus``)."""
    return [int(x) for x in statuses]


def _short(key: bytes) -> str:
    return key.hex()[:16]


class KVStoreServicer(pb_grpc.KVStoreServicer):
    """The ``kvstore.v1.KVStore`` service over one :class:`~kvstore.daemon.Daemon`."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.h = daemon.h
        self.w = daemon.write_level
        self._closed: dict[int, asyncio.Event] = {}  # set: that session's Watch streams end
        self._shutting_down = False
        self._grace_over = asyncio.Event()  # set: calls still waiting end with UNAVAILABLE
        # However a session ends (CloseSession, its Watch ending, lease expiry, daemon
        # stop), the manager calls this: no per-session state outlives the session.
        daemon.sessions.on_close.append(self._session_ended)

    def _session_ended(self, sid: int) -> None:
        """Drops the state of session ``sid`` and ends its Watch streams."""
        ev = self._closed.pop(sid, None)
        if ev is not None:
            ev.set()

    # ------------------------------------------------------------------ validation
    def _session(self, sid: int) -> Session:
        s = self.d.sessions.get(sid)
        if s is None:
            _fail(
                grpc.StatusCode.NOT_FOUND,
                f"unknown session {sid}: it was closed, expired or never opened "
                "(the daemon may have restarted); open a new session",
            )
        return s

    def _keys(
        self, keys: Sequence[bytes], field: str = "keys", unique: bool = True, sized: bool = False
    ) -> list[bytes]:
        """Validated keys.  ``sized``: every key is known to be KEY_BYTES long already."""
        limit = self.d.cfg.server.max_keys_per_request
        if len(keys) > limit:
            _fail(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(keys)} {field} in one request; the limit is {limit} "
                "(server.max_keys_per_request): split the batch",
            )
        out = list(keys)
        if not sized and (why := key_length_error(out, field)):
            _fail(grpc.StatusCode.INVALID_ARGUMENT, why)
        if unique and len(set(out)) != len(out):
            _fail(grpc.StatusCode.INVALID_ARGUMENT, f"duplicate keys in {field}")
        return out

    def _namespace(self, ns_id: bytes) -> Namespace:
        ns = self.d.namespaces.get(ns_id)
        if ns is None:
            _fail(
                grpc.StatusCode.NOT_FOUND,
                f"unknown namespace {ns_id.hex()[:16] or '(empty)'}: call RegisterNamespace "
                "with the model's layout first",
            )
        return ns

    def _slot(self, e: Any) -> pb.Slot:
        off, n = e.locs[self.w]
        return pb.Slot(offset=off, length=n)

    # ------------------------------------------------------------------ sessions
    async def OpenSession(self, request: pb.OpenSessionRequest, context: Ctx) -> Any:
        s = self.d.sessions.open(request.client_name, request.client_pid)
        self._closed[s.id] = asyncio.Event()
        adopted = []
        if request.previous_session_id:
            adopted = self.d.sessions.reopen(request.previous_session_id, s)
        arena = self.d.dram.arena
        return pb.OpenSessionResponse(
            session_id=s.id,
            arena=pb.ArenaInfo(path=arena.path, size=arena.size),
            lease_timeout_ms=int(self.d.cfg.server.lease_timeout_s * 1000),
            adopted_models=adopted,
        )

    async def Watch(self, request: pb.WatchRequest, context: Ctx) -> AsyncIterator[Any]:
        try:
            s = self._session(request.session_id)
        except _Abort as a:
            await context.abort(a.code, a.msg)
        ev = self._closed.setdefault(s.id, asyncio.Event())
        if self._shutting_down:
            ev.set()
        s.watchers += 1
        try:
            yield pb.WatchEvent(message=f"session {s.id} open")
            await ev.wait()
        finally:
            # Runs when the client closes the stream or its process dies.  At shutdown
            # the session stays: its calls in flight may finish; the daemon closes it after.
            s.watchers -= 1
            if s.watchers == 0 and not self._shutting_down and s.id in self.d.sessions.sessions:
                self.d.sessions.close(s.id, reason="client disconnected")  # drops _closed[s.id]

    def end_watches(self) -> None:
        """Ends every Watch stream, now and as they open (daemon shutdown).

        A Watch otherwise lasts as long as its client: the server's graceful stop
        would wait its whole grace period for them, then cancel them.
        """
        self._shutting_down = True
        for ev in self._closed.values():
            ev.set()

    def abort_waits(self) -> None:
        """Ends the calls still waiting (Acquires reading from disk) with UNAVAILABLE.

        The daemon calls this when its shutdown grace period is over: the server
        would otherwise cancel them, and a client cannot tell a CANCELLED call from
        one it cancelled itself; UNAVAILABLE says the daemon went away (clients
        reconnect).  Their promotions finish anyway and unpin (shutdown waits for them).
        """
        self._grace_over.set()

    async def CloseSession(self, request: pb.CloseSessionRequest, context: Ctx) -> Any:
        # Ends its Watch streams too (_session_ended).
        released, aborted = self.d.sessions.close(request.session_id)
        return pb.CloseSessionResponse(released_pins=released, aborted_allocations=aborted)

    # ------------------------------------------------------------------ namespaces
    async def RegisterNamespace(self, request: pb.RegisterNamespaceRequest, context: Ctx) -> Any:
        return await _guard(context, self._register, request)

    def _register(self, request: pb.RegisterNamespaceRequest) -> Any:
        s = self._session(request.session_id)
        sp = request.spec
        try:
            ns = Namespace(
                model_id=sp.model_id,
                num_layers=sp.num_layers,
                num_kv_heads=sp.num_kv_heads,
                head_dim=sp.head_dim,
                block_tokens=sp.block_tokens,
                kv_dtype=sp.kv_dtype or "bfloat16",
                layout=sp.layout or "generic",
                tp_rank=sp.tp_rank,
                tp_size=sp.tp_size or 1,
                tenant_salt=sp.tenant_salt,
                hash_algo=sp.hash_algo or "sha256",
            )
            self.d.dram.check_block_size(ns.block_nbytes)
        except (KeyInputError, ValueError) as exc:
            _fail(grpc.StatusCode.INVALID_ARGUMENT, f"invalid namespace: {exc}")
        ns_id = self.d.sessions.register_namespace(s, ns)  # dropped when its sessions end
        return pb.RegisterNamespaceResponse(namespace_id=ns_id, block_nbytes=ns.block_nbytes)

    # ------------------------------------------------------------------ lookups
    async def Lookup(self, request: pb.LookupRequest, context: Ctx) -> Any:
        return await _guard(context, self._lookup, request)

    def _lookup(self, request: pb.LookupRequest) -> Any:
        self._session(request.session_id)
        computed: list[bytes] = []
        packed = request.packed_keys
        if sum(map(bool, (request.token_ids, request.keys, packed))) > 1:
            _fail(grpc.StatusCode.INVALID_ARGUMENT, "give one of keys, packed_keys or token_ids")
        if request.token_ids:
            ns = self._namespace(request.namespace_id)
            computed = list(ns.block_keys(np.asarray(request.token_ids, dtype=np.uint32)))
            keys = self._keys(computed, unique=False)
        elif packed:
            if len(packed) % KEY_BYTES:
                _fail(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"packed_keys is {len(packed)} bytes, not a multiple of the "
                    f"{KEY_BYTES}-byte key size",
                )
            keys = self._keys(unpack_keys(packed), "packed_keys", unique=False, sized=True)
        else:
            keys = self._keys(request.keys, unique=False)
        hits, tops = self.h.lookup_tiers(keys)
        names = [lv.tier.name for lv in self.h.levels]
        if packed:  # the tiers as one byte each: no per-block protobuf element
            return pb.LookupResponse(num_cached=len(hits), tier_bytes=tops, tier_names=names)
        return pb.LookupResponse(
            num_cached=len(hits),
            tier_index=list(tops),
            keys=computed,
            tier_names=names,
        )

    # ------------------------------------------------------------------ writes
    async def Allocate(self, request: pb.AllocateRequest, context: Ctx) -> Any:
        return await _guard(context, self._allocate, request)

    def _allocate(self, request: pb.AllocateRequest) -> Any:
        s = self._session(request.session_id)
        ns = self._namespace(request.namespace_id)
        if request.block_nbytes != ns.block_nbytes:
            _fail(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"wrong block size: namespace {ns.model_id!r} has blocks of {ns.block_nbytes} "
                f"bytes (layers x 2 x tokens x kv_heads x head_dim x dtype), the request "
                f"says {request.block_nbytes}",
            )
        keys = self._keys(request.keys)
        parent: bytes | None = request.parent_key or None
        if parent is not None:
            if len(parent) != KEY_BYTES:
                _fail(grpc.StatusCode.INVALID_ARGUMENT, f"parent_key must be {KEY_BYTES} bytes")
            if parent == request.namespace_id:
                parent = None
        statuses, entries = self.h.allocate(
            s.id, request.namespace_id, ns.block_nbytes, parent, keys, request.first_depth
        )
        if Status.NO_SPACE in statuses:
            tier = self.h.levels[self.w].tier
            pinned = sum(1 for e in self.h.index.values() if e.pins or e.state == PENDING)
            _fail(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"no room for {statuses.count(Status.NO_SPACE)} new block(s) of "
                f"{ns.block_nbytes} B in tier {tier.name!r} (capacity {tier.capacity_bytes} B, "
                f"used {tier.used_bytes} B, {pinned} blocks pinned or pending) and nothing "
                "evictable: release leases, store fewer blocks, or raise the tier's capacity",
            )
        slots = []
        for k, st, e in zip(keys, statuses, entries, strict=True):
            if st == Status.NEW:
                s.allocs.add(k)
                slots.append(self._slot(e))
            else:
                slots.append(pb.Slot())
        return pb.AllocateResponse(status=_codes(statuses), slots=slots)

    async def Commit(self, request: pb.CommitRequest, context: Ctx) -> Any:
        return await _guard(context, self._commit, request)

    def _commit(self, request: pb.CommitRequest) -> Any:
        s = self._session(request.session_id)
        keys = self._keys(request.keys)
        sums = list(request.checksums)
        if sums and len(sums) != len(keys):
            _fail(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(sums)} checksums for {len(keys)} keys: give one per key or none",
            )
        problems = []
        for k in keys:
            e = self.h.get(k)
            if e is None:
                problems.append(f"{_short(k)} was never allocated (or was aborted)")
            elif e.state == READY:
                problems.append(f"{_short(k)} is already committed")
            elif e.owner != s.id:
                problems.append(f"{_short(k)} is being written by another session")
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"commit rejected, nothing committed: {'; '.join(problems[:3])}{more}",
            )
        st = self.h.commit(s.id, keys, sums)
        s.allocs.difference_update(keys)
        return pb.CommitResponse(status=_codes(st))

    async def Abort(self, request: pb.AbortRequest, context: Ctx) -> Any:
        return await _guard(context, self._abort, request)

    def _abort(self, request: pb.AbortRequest) -> Any:
        s = self._session(request.session_id)
        keys = [k for k in self._keys(request.keys) if k in s.allocs]
        n = self.h.abort(s.id, keys)
        s.allocs.difference_update(keys)
        return pb.AbortResponse(aborted=n)

    # ------------------------------------------------------------------ reads
    async def Acquire(self, request: pb.AcquireRequest, context: Ctx) -> Any:
        try:
            r = self._acquire(request)
            if type(r) is tuple:  # a promotion from disk is in flight: wait off the loop
                r = await self._acquire_wait(*r)
            return r
        except _Abort as a:
            await context.abort(a.code, a.msg)

    def _acquire(self, request: pb.AcquireRequest) -> Any:
        s = self._session(request.session_id)
        keys = self._keys(request.keys)
        plan, task = self.d.promoter.start(keys)
        if task is not None:
            return s, keys, task
        statuses, entries = acquire_finish(self.h, plan)
        return self._acquired(s, keys, statuses, entries)

    async def _acquire_wait(self, s: Session, keys: list[bytes], task: Any) -> Any:
        grace_over = asyncio.ensure_future(self._grace_over.wait())
        try:  # asyncio.wait never cancels the task: it always completes (kvstore.promote)
            await asyncio.wait((task, grace_over), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client went away: nobody will own the pins
            self.d.promoter.release_when_done(task)
            raise
        finally:
            grace_over.cancel()
        if not task.done():  # the daemon is stopping and its grace period is over
            self.d.promoter.release_when_done(task)
            _fail(
                grpc.StatusCode.UNAVAILABLE,
                "the daemon is shutting down: blocks still being read from disk were not "
                "served; retry once it is back",
            )
        statuses, entries = task.result()
        if self.d.sessions.sessions.get(s.id) is not s:
            self.h.release([e for e in entries if e is not None])
            _fail(
                grpc.StatusCode.NOT_FOUND,
                f"session {s.id} ended while its blocks were read from disk; open a new session",
            )
        return self._acquired(s, keys, statuses, entries)

    def _acquired(
        self, s: Session, keys: list[bytes], statuses: list[Status], entries: list[Any]
    ) -> Any:
        """The answer of an acquire; its pins now belong to the session."""
        slots = []
        for k, e in zip(keys, entries, strict=True):
            if e is None:
                slots.append(pb.Slot())
            else:
                s.pins[k] += 1
                slots.append(self._slot(e))
        return pb.AcquireResponse(status=_codes(statuses), slots=slots)

    async def Release(self, request: pb.ReleaseRequest, context: Ctx) -> Any:
        return await _guard(context, self._release, request)

    def _release(self, request: pb.ReleaseRequest) -> Any:
        s = self._session(request.session_id)
        keys = self._keys(request.keys, unique=False)
        need: dict[bytes, int] = {}
        for k in keys:
            need[k] = need.get(k, 0) + 1
        bad = [k for k, n in need.items() if s.pins.get(k, 0) < n]
        if bad:
            _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"release rejected, nothing released: {len(bad)} key(s) (first "
                f"{_short(bad[0])}) are not acquired by this session; a lease belongs "
                "to the session that acquired it",
            )
        for k, n in need.items():
            e = self.h.get(k)
            if e is not None:
                e.pins -= n
            s.pins[k] -= n
            if s.pins[k] <= 0:
                del s.pins[k]
        return pb.ReleaseResponse(status=_codes([Status.OK] * len(keys)))

    async def Prefetch(self, request: pb.PrefetchRequest, context: Ctx) -> Any:
        return await _guard(context, self._prefetch, request)

    def _prefetch(self, request: pb.PrefetchRequest) -> Any:
        self._session(request.session_id)
        keys = self._keys(request.keys)
        todo = [
            k
            for k in keys
            if (e := self.h.get(k)) is not None and e.state == READY and e.locs[self.w] is None
        ]
        if todo:
            # Answer first, promote right after: the caller does not wait for the reads.
            asyncio.get_running_loop().call_soon(self._promote_now, todo)
        return pb.PrefetchResponse(scheduled=len(todo))

    def _promote_now(self, keys: list[bytes]) -> None:
        plan, task = self.d.promoter.start(keys)
        if task is not None:  # reads off the loop: unpin when they are done
            self.d.promoter.release_when_done(task)
            return
        _, entries = acquire_finish(self.h, plan)
        self.h.release([e for e in entries if e is not None])

    async def Delete(self, request: pb.DeleteRequest, context: Ctx) -> Any:
        return await _guard(context, self._delete, request)

    def _delete(self, request: pb.DeleteRequest) -> Any:
        self._session(request.session_id)
        keys = self._keys(request.keys)
        return pb.DeleteResponse(status=_codes(self.h.delete(keys)))

    async def Stats(self, request: pb.StatsRequest, context: Ctx) -> Any:
        return pb.StatsResponse(json=json.dumps(self.d.stats(), default=str))


async def _guard(context: Ctx, fn: Any, request: Any) -> Any:
    """Runs a handler; validation failures become the gRPC status they name."""
    try:
        return fn(request)
    except _Abort as a:
        await context.abort(a.code, a.msg)
