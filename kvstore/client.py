"""The engine's side of kvstore: a synchronous client.

Control goes over gRPC (a Unix socket by default); block bytes never do: the
client maps the daemon's shared-memory arena and reads and writes slots in place.

Example:
    >>> from kvstore import Client, Namespace
    >>> ns = Namespace("llama-3-8b", num_layers=32, num_kv_heads=8, head_dim=128,
    ...                block_tokens=16)
    >>> with Client() as c:
    ...     c.register_namespace(ns)
    ...     c.store_tokens(ns, tokens, blocks)          # one array per full block
    ...     with c.load_tokens(ns, tokens) as lease:    # zero-copy views, pinned
    ...         use(lease.arrays)
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
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

__all__ = ["Allocation", "BlockLease", "Client", "LookupResult", "StoreResult"]


class BlockLease:
    """Pinned, zero-copy views of a cached prefix; released on ``close``/context exit.

    Attributes:
        keys: the pinned block keys, first block first.
        arrays: one read-only ``np.uint8`` view on the arena per block.
        num_tokens: tokens covered (``len(keys) * block_tokens``).
    """

    def __init__(
        self, client: Client, keys: Sequence[bytes], views: list[memoryview], bt: int
    ) -> None:
        self._client = client
        self._session_id = client.session_id  # the session that holds the pins
        self.keys = list(keys)
        self._views = views
        self.arrays = w.readonly_arrays(views)
        self.num_tokens = len(keys) * bt
        self._open = True

    def tensor(self, i: int, dtype: Any, shape: Sequence[int]) -> Any:
        """Block ``i`` as a torch tensor view (no copy) of ``dtype`` and ``shape``."""
        import torch

        # torch has no read-only tensors: treat the result as read-only.
        t = torch.frombuffer(self._views[i], dtype=torch.uint8)
        return t.view(dtype).view(*shape)

    def close(self) -> None:
        """Releases the pins.

        Raises:
            LeaseLost: the session holding them ended before this (daemon restart,
                expiry, reconnect): what was read through the views may be another
                block's bytes; discard it.
        """
        if self._open:
            self._open = False
            self.arrays = []
            self._views = []
            if self.keys:
                self._client._release_lease(self._session_id, self.keys)

    def __enter__(self) -> BlockLease:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the exception in flight says more than a failed release would
            self.close()
        except KVStoreError as err:
            log.warning("kvstore: lease release failed while handling an error: %s", err)


class Client:
    """Synchronous kvstore client.  Not thread-safe: use one per thread (they are cheap).

    Args:
        socket: Unix socket path; default ``$KVSTORE_SOCKET`` or the daemon's default.
        address: ``host:port`` of a TCP endpoint instead of the socket.
        name: shown in the daemon's logs and stats.
        timeout: seconds for connecting and for each call.
        reconnect: after the daemon restarts, reopen the session once and retry the call.

    Raises:
        DaemonUnavailable: no daemon answers at the socket.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        address: str | None = None,
        name: str = "",
        timeout: float = 10.0,
        reconnect: bool = True,
    ) -> None:
        self.target = w.target(socket, address)
        self.name = name
        self.timeout = timeout
        self.auto_reconnect = reconnect
        self._namespaces: dict[bytes, Namespace] = {}
        self._channel: grpc.Channel | None = None
        self._arena: w.ArenaMap | None = None
        self._watch: Any = None
        # Pins taken by acquire() (the low-level call): in the current session, and in
        # sessions that ended (the daemon dropped those; release() of them: LeaseLost).
        self._pins: Counter[bytes] = Counter()
        self._ended_pins: Counter[bytes] = Counter()
        self._models_held = w.HeldModels()
        if w.missing_unix_socket(self.target):
            # Nothing can answer there: say so now rather than after the connect timeout.
            # (A reconnect still waits: the socket is briefly missing while a daemon restarts.)
            raise DaemonUnavailable(w.unavailable_msg(self.target))
        self._connect()

    # ------------------------------------------------------------------ connection
    def _connect(self, previous: int = 0) -> None:
        """Opens a session (a reconnect names its ``previous`` one: the daemon carries
        over the model pins it kept for us)."""
        ch = grpc.insecure_channel(self.target, options=w.CHANNEL_OPTIONS)
        try:
            grpc.channel_ready_future(ch).result(timeout=self.timeout)
        except grpc.FutureTimeoutError:
            ch.close()
            raise DaemonUnavailable(w.unavailable_msg(self.target)) from None
        stub = pb_grpc.KVStoreStub(ch)
        try:
            resp = stub.OpenSession(
                pb.OpenSessionRequest(
                    client_name=self.name, client_pid=os.getpid(), previous_session_id=previous
                ),
                timeout=self.timeout,
            )
        except grpc.RpcError as exc:
            ch.close()  # not kept: later calls say "client is closed", not a closed channel
            raise from_rpc_error(exc) from None
        self._channel, self._stub = ch, stub
        self.session_id = resp.session_id
        self._models_held.reopened(resp.adopted_models, previous, self.session_id)
        self._arena = w.map_arena(resp.arena.path, resp.arena.size)
        self._watch = self._stub.Watch(pb.WatchRequest(session_id=self.session_id))
        self._watch_thread = threading.Thread(
            target=self._drain_watch, args=(self._watch,), daemon=True, name="kvstore-watch"
        )
        self._watch_thread.start()
        for ns in self._namespaces.values():
            self._register(ns)

    @staticmethod
    def _drain_watch(call: Any) -> None:
        # Holding this stream open is what tells the daemon we are alive.
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass

    def _teardown(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._arena is not None:
            self._arena.close()
            self._arena = None

    def _mapped(self) -> w.ArenaMap:
        if self._arena is None:
            raise DaemonUnavailable("client is closed")
        return self._arena

    def reconnect(self) -> None:
        """Drops the connection and opens a new session (e.g. after a daemon restart).

        The KV pins of the old session end with it (the daemon releases them); its
        model pins carry over to the new one when the same daemon still keeps
        them (:attr:`lost_models` names those it did not).
        """
        previous = self.session_id
        self._teardown()
        self._ended_pins += self._pins
        self._pins = Counter()
        self._connect(previous)

    # ------------------------------------------------------------------ model weights
    # Errors are ``loader.errors.ModelError``s; like the KV verbs, a call that finds its
    # session lost (the daemon restarted) reconnects once and runs in the new session.
    def _models(self, call: Callable[[grpc.Channel, int], T]) -> T:
        from loader.errors import ModelError

        for attempt in (0, 1):
            if self._channel is None:
                raise DaemonUnavailable("client is closed")
            try:
                return call(self._channel, self.session_id)
            except ModelError as exc:
                if attempt == 0 and self.auto_reconnect and exc.session_lost:
                    log.warning("kvstore session lost (%s); reconnecting", exc.code)
                    try:
                        self.reconnect()
                    except DaemonUnavailable:
                        raise exc from None
                    continue
                raise
        raise AssertionError("unreachable")

    def load_model(self, name: str, device: str = "cpu", pin: bool = True) -> dict[str, Any]:
        """Tensors of model ``name`` (views on shared memory; pinned for this session)."""
        from loader.client import load_model

        out = self._models(lambda ch, sid: load_model(ch, name, device, session_id=sid, pin=pin))
        self._models_held.loaded(name, pin)
        return out

    @property
    def lost_models(self) -> frozenset[str]:
        """Models whose pin this client lost (its session ended and the daemon did not
        keep the pin for the new one): their tensors may have changed; load them again."""
        return frozenset(self._models_held.lost)

    def swap(self, old: str, new: str, device: str = "cpu") -> dict[str, Any]:
        """Makes ``new`` resident and pinned, unpins ``old``; returns ``new``'s tensors.

        After a reconnect that did not keep the pin on ``old`` (the daemon restarted),
        ``new`` is simply loaded and pinned."""
        from loader.client import load_model, swap_models

        first = self.session_id

        def call(ch: grpc.Channel, sid: int) -> dict[str, Any]:
            if old in self._models_held.lost or (
                sid != first and old not in self._models_held.held
            ):
                # Its pin ended with an earlier session (a reconnect, by this call or
                # another): there is nothing to swap from, just load and pin ``new``.
                return load_model(ch, new, device, session_id=sid)
            return swap_models(ch, old, new, device, session_id=sid)

        out = self._models(call)
        self._models_held.swapped_from(old)
        self._models_held.loaded(new)
        return out

    def prefetch_model(self, name: str) -> str:
        from loader.client import prefetch_model

        return self._models(lambda ch, sid: prefetch_model(ch, name))

    def release_model(self, name: str, evict: bool = False) -> int:
        from loader.client import release_model
        from loader.errors import ModelPinLost

        n = self._models(lambda ch, sid: release_model(ch, name, session_id=sid, evict=evict))
        if self._models_held.released(name):
            raise ModelPinLost(name)
        return n

    def models(self) -> list[dict[str, Any]]:
        from loader.client import list_models

        return self._models(lambda ch, sid: list_models(ch))

    def close(self) -> None:
        """Ends the session: the daemon releases its pins and aborts its allocations."""
        if self._channel is None:
            return
        try:
            self._stub.CloseSession(
                pb.CloseSessionRequest(session_id=self.session_id), timeout=self.timeout
            )
        except grpc.RpcError:
            pass  # daemon gone: nothing left to release
        self._teardown()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rpc(self, method: str, build: Callable[[int], Any]) -> Any:
        if self._channel is None:
            raise DaemonUnavailable("client is closed")
        for attempt in (0, 1):
            try:
                return getattr(self._stub, method)(build(self.session_id), timeout=self.timeout)
            except grpc.RpcError as exc:
                if attempt == 0 and self.auto_reconnect and w.is_session_lost(exc):
                    log.warning("kvstore session lost (%s); reconnecting", exc.code())
                    try:
                        self.reconnect()
                    except DaemonUnavailable:
                        raise from_rpc_error(exc) from None
                    continue
                raise from_rpc_error(exc) from None
        raise AssertionError("unreachable")

    def _release_lease(self, sid: int, keys: Sequence[bytes]) -> None:
        """Releases pins in session ``sid``, the one that took them.

        Raises:
            LeaseLost: that session no longer holds them (it ended: client closed or
                reconnected, session expired, daemon restarted); when the release
                itself finds the session lost, the client reconnects first, as any
                call would.  Other errors raise as for :meth:`release`.
        """
        if self._channel is None or sid != self.session_id:
            raise LeaseLost(len(keys))
        try:
            self._stub.Release(pb.ReleaseRequest(session_id=sid, keys=keys), timeout=self.timeout)
        except grpc.RpcError as exc:
            if not w.is_session_lost(exc):
                raise from_rpc_error(exc) from None
            if self.auto_reconnect:
                log.warning("kvstore session lost (%s); reconnecting", exc.code())
                with contextlib.suppress(DaemonUnavailable):
                    self.reconnect()  # a later call retries if this fails
            raise LeaseLost(len(keys), f"the session ended: {exc.code().name}") from None

    # ------------------------------------------------------------------ namespaces
    def register_namespace(self, ns: Namespace) -> bytes:
        """Registers ``ns`` with the daemon; returns its id (``ns.digest()``)."""
        ns_id = self._register(ns)
        self._namespaces[ns_id] = ns
        return ns_id

    def _register(self, ns: Namespace) -> bytes:
        resp = self._rpc("RegisterNamespace", lambda sid: w.register_req(sid, ns))
        return bytes(resp.namespace_id)

    def _ns_id(self, ns: Namespace) -> bytes:
        ns_id = ns.digest()
        if ns_id not in self._namespaces:
            self.register_namespace(ns)
        return ns_id

    # ------------------------------------------------------------------ low level
    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """Length of the longest cached prefix of the chain ``keys`` and each hit's tier."""
        resp = self._rpc("Lookup", lambda sid: w.lookup_req(sid, keys))
        return w.lookup_result(resp)

    def allocate(
        self,
        ns: Namespace,
        keys: Sequence[bytes],
        parent: bytes | None = None,
        first_depth: int = 0,
    ) -> list[Allocation]:
        """Slots for the keys of one chain not yet stored (``NEW``: write, then commit)."""
        ns_id = self._ns_id(ns)
        resp = self._rpc(
            "Allocate",
            lambda sid: w.allocate_req(sid, ns_id, ns.block_nbytes, parent, keys, first_depth),
        )
        return w.allocations(keys, resp, self._mapped())

    def commit(self, keys: Sequence[bytes], checksums: Sequence[int] | None = None) -> list[str]:
        """Makes written slots visible.  ``checksums``: xxh3-64 per block, or ``None``."""
        resp = self._rpc(
            "Commit",
            lambda sid: pb.CommitRequest(session_id=sid, keys=keys, checksums=checksums or []),
        )
        return w.status_names(resp.status)

    def abort(self, keys: Sequence[bytes]) -> int:
        resp = self._rpc("Abort", lambda sid: pb.AbortRequest(session_id=sid, keys=keys))
        return int(resp.aborted)

    def acquire(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        """Pins blocks (promoting them to DRAM) and returns read-only views, ``None`` = miss.

        Give the pins back with :meth:`release`; they also end with the session.
        """
        views = self._acquire(keys)
        self._pins.update(k for k, v in zip(keys, views, strict=True) if v is not None)
        return [None if v is None else v.toreadonly() for v in views]

    def _acquire(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        resp = self._rpc("Acquire", lambda sid: pb.AcquireRequest(session_id=sid, keys=keys))
        return w.acquired_views(resp, self._mapped())

    def release(self, keys: Sequence[bytes]) -> None:
        """Gives back pins taken by :meth:`acquire` (one per key listed).

        Raises:
            LeaseLost: some of these pins were lost before this release (their
                session ended: the daemon restarted, the session expired, the client
                reconnected): the daemon released them then, and bytes read through
                their views may have changed.  The others are released all the same.
            FailedPrecondition: a key this client's session does not hold (nothing
                is released then).
            DaemonUnavailable: no daemon answers.
        """
        taken, send, lost = w.split_release(self._pins, self._ended_pins, keys)
        if send is not None:
            if self._channel is None:
                self._pins += taken
                raise DaemonUnavailable("client is closed")
            try:
                # In this session only: if it ended meanwhile, so did its pins.
                self._release_lease(self.session_id, send)
            except LeaseLost as exc:
                raise LeaseLost(exc.lost + lost) from None  # gone: not given back
            except BaseException:
                self._pins += taken  # nothing was released
                raise
        if lost:
            raise LeaseLost(lost)

    def prefetch(self, keys: Sequence[bytes]) -> int:
        """Promotes blocks to DRAM ahead of need; returns how many moved."""
        resp = self._rpc("Prefetch", lambda sid: pb.PrefetchRequest(session_id=sid, keys=keys))
        return int(resp.scheduled)

    def delete(self, keys: Sequence[bytes]) -> list[str]:
        resp = self._rpc("Delete", lambda sid: pb.DeleteRequest(session_id=sid, keys=keys))
        return w.status_names(resp.status)

    def stats(self) -> dict[str, Any]:
        return w.parse_stats(self._rpc("Stats", lambda sid: pb.StatsRequest()))

    # ------------------------------------------------------------------ engine level
    def lookup_tokens(self, ns: Namespace, token_ids: Sequence[int] | np.ndarray) -> int:
        """How many leading tokens of ``token_ids`` are cached (a multiple of block_tokens)."""
        keys = ns.block_keys(token_ids)
        if not keys:
            return 0
        return self.lookup(keys).num_cached * ns.block_tokens

    def store_tokens(
        self,
        ns: Namespace,
        token_ids: Sequence[int] | np.ndarray,
        blocks: Sequence[Any] | Callable[[int, np.ndarray], None],
        checksums: bool = True,
    ) -> StoreResult:
        """Stores the KV blocks of every full block of ``token_ids``.

        Args:
            blocks: one bytes-like / ``np.ndarray`` / CPU tensor of ``ns.block_nbytes``
                bytes per full block, or ``fill(i, dst)`` writing block ``i`` into the
                ``np.uint8`` slot view ``dst``.
            checksums: send xxh3-64 checksums so every tier can verify the bytes.

        Raises:
            InvalidArgument: a block has the wrong size.
            ResourceExhausted: no room can be made (everything pinned).
        """
        keys = ns.block_keys(token_ids)
        fill = w.block_filler(blocks, len(keys), ns.block_nbytes)
        if not keys:
            return StoreResult(0, 0)
        allocs = self.allocate(ns, keys)
        new = [(i, a) for i, a in enumerate(allocs) if a.status == "NEW"]
        new_keys = [a.key for _, a in new]
        try:
            for i, a in new:
                assert a.view is not None
                fill(i, np.frombuffer(a.view, dtype=np.uint8))
        except BaseException:
            self.abort(new_keys)
            raise
        sums = [w.checksum(a.view) for _, a in new] if checksums else None  # type: ignore[arg-type]
        if new_keys:
            self.commit(new_keys, sums)
        return StoreResult(len(new), sum(1 for a in allocs if a.status == "PRESENT"))

    def load_tokens(
        self, ns: Namespace, token_ids: Sequence[int] | np.ndarray, max_tokens: int | None = None
    ) -> BlockLease:
        """Pins the longest cached prefix of ``token_ids`` and returns zero-copy views.

        Use as a context manager; the views are valid until the lease is released.
        """
        toks = np.asarray(token_ids)
        if max_tokens is not None:
            toks = toks[:max_tokens]
        keys = ns.block_keys(toks)
        if not keys:
            return BlockLease(self, [], [], ns.block_tokens)
        n = self.lookup(keys).num_cached
        if n == 0:
            return BlockLease(self, [], [], ns.block_tokens)
        views = self._acquire(keys[:n])
        m = next((i for i, v in enumerate(views) if v is None), len(views))
        # A block in the middle vanished (evicted between lookup and acquire): only the
        # prefix before it is usable, so give back the pins taken after it.
        tail = [k for k, v in zip(keys[m:n], views[m:], strict=True) if v is not None]
        if tail:
            self._release_lease(self.session_id, tail)
        held = [v for v in views[:m] if v is not None]
        return BlockLease(self, keys[:m], held, ns.block_tokens)
