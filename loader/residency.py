"""Which models are resident in the DRAM arena: loading, pinning, LRU eviction, swap.

A resident model occupies one extent of the :class:`~loader.arena.ModelArena`.
Sessions pin the models they use; an unpinned resident model stays (it is hot) until
its space is needed, then the eviction policy (LRU by default, any registered
:mod:`kvstore.policies` name) picks the victim.  ``swap(old, new)`` makes ``new``
resident and pinned and unpins ``old`` (evictable, not dropped: swapping back is
free while it stays).  ``prefetch`` starts a load in the background so a planned
swap finds its model resident.

Contract for readers: bytes of a model are stable while any session pins it.  A
client must not read a model's tensors after releasing its pin: the extent may be
reused for another model (the same contract as KV blocks: acquire, read, release).

A session that ends without closing (its Watch stream broke, its lease expired) while
its client process lives may come back: its pins are *parked* (kept, under the
negated session id) until a deadline, and a new session of that client adopts them,
so the client's tensors stay valid across the reconnect.  Parked pins that nobody
adopts in time are dropped.

Thread contract: every public method may be called from any thread; loads run one
at a time on the manager's loader thread (they share the read ring).
"""

from __future__ import annotations

import collections
import itertools
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from loader.arena import ModelArena
from loader.config import ModelsConfig
from loader.errors import ModelBudgetError, ModelError, ModelNotFoundError, ModelStoreError
from loader.manifest import Manifest
from loader.pipeline import HostSink, ReadPipeline, ReadStats
from loader.store import ModelStore

if TYPE_CHECKING:
    from kvstore.entry import BlockEntry

LOADING, READY, FAILED = "loading", "ready", "failed"


@dataclass(eq=False)
class Resident:
    """A model in (or on its way into) the arena.  Identity-hashed (policy entries)."""

    manifest: Manifest
    offset: int
    state: str = LOADING
    pins: dict[int, int] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    error: ModelError | None = None
    load_seconds: float = 0.0
    read: ReadStats | None = None
    hits: int = 0
    last_access: float = 0.0
    nbytes: int = 0
    load_id: int = 0  # this copy's load (unique in the daemon's life; 0: none yet)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def total_pins(self) -> int:
        return sum(self.pins.values())

    @property
    def parked_pins(self) -> int:
        """Pins of sessions that ended without closing, kept for their reconnect."""
        return sum(n for sid, n in self.pins.items() if sid < 0)


@dataclass(slots=True)
class ResidencyCounters:
    loads: int = 0
    load_bytes: int = 0
    load_seconds: float = 0.0
    hits: int = 0
    evictions: int = 0
    failures: int = 0


class ResidencyManager:
    """Keeps hot models in the DRAM arena under a budget.

    Args:
        store: the model store manifests are read from (on demand).
        config: budget, pipeline and policy settings (validated).
    """

    def __init__(self, store: ModelStore, config: ModelsConfig) -> None:
        from kvstore.policies import POLICIES

        self.store = store
        self.config = config
        # The arena (DRAM budget, pre-faulted) is made when the first model is stored
        # or asked for: a daemon that never serves weights holds no memory for them.
        self._arena: ModelArena | None = None
        self._arena_lock = threading.Lock()
        self._lock = threading.Lock()  # also the arena's allocator lock
        if store.list_models():
            self._make_arena()
        self.pipeline = ReadPipeline(
            io_threads=config.io_threads,
            ring_buffers=config.ring_buffers,
            ring_buffer_bytes=config.ring_buffer_bytes,
            direct=config.direct_io,
            max_inflight=config.max_inflight,
        )
        # A long-lived daemon: its first load should not pay for spawning the readers.
        self.pipeline.start_threads()
        self.policy = POLICIES.get(config.policy)(capacity_blocks=64)
        self.counters = ResidencyCounters()
        self._by_uid: dict[str, Resident] = {}
        # Ids of loads start at random, as session ids do: a client's id from before a
        # restart must not name another load.  Failed loads are remembered (bounded) so
        # the client's call that waits for one gets its error instead of a new load.
        self._load_ids = itertools.count(secrets.randbelow(1 << 47) + 1)
        self._failed: collections.OrderedDict[int, Resident] = collections.OrderedDict()
        # session id -> (time.monotonic() deadline of its parked pins, client pid)
        self._parked: dict[int, tuple[float, int]] = {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="loader-load")
        self._closed = False

    def _make_arena(self) -> ModelArena:
        with self._arena_lock:
            if self._arena is None:
                c = self.config
                self._arena = ModelArena(c.shm_dir, c.dram_budget, c.prefault, self._lock)
            return self._arena

    @property
    def arena(self) -> ModelArena:
        """The DRAM arena of resident models (created on first use)."""
        return self._arena if self._arena is not None else self._make_arena()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Waits until the arena is pre-faulted (True at once when there is none yet)."""
        return self._arena.wait_prefaulted(timeout) if self._arena is not None else True

    # ------------------------------------------------------------------ verbs
    def acquire(
        self,
        name: str,
        session_id: int = 0,
        pin: bool = True,
        wait: bool = True,
        load_id: int = 0,
    ) -> Resident:
        """Makes ``name`` resident (loading it if needed), optionally pins it, waits.

        With ``wait=False`` it returns as soon as the extent is reserved (the load runs
        on), so a client can map the extent while the bytes arrive.

        Raises:
            ModelNotFoundError, ModelBudgetError, ModelChecksumError, ModelStoreError.
        """
        pin_session = session_id if pin else None
        r = None
        if load_id:  # the load may be of a model removed since (its first call's pin keeps it)
            found = self.store.find(name)
            r = self._load_of(load_id, name, found.uid if found else None, pin_session)
        if r is None:
            r = self._ensure(self.store.get(name), pin_session)
        if not wait:
            return r
        r.done.wait()
        if r.error is not None:
            raise r.error
        return r

    def prefetch(self, name: str) -> Resident:
        """Starts loading ``name`` in the background (no pin); returns at once."""
        return self._ensure(self.store.get(name), None)

    def release(self, name: str, session_id: int = 0) -> int:
        """Drops every pin ``session_id`` holds on ``name``; returns how many."""
        with self._lock:
            n = 0
            unpinned = []
            for r in self._by_uid.values():
                if r.name == name and (k := r.pins.pop(session_id, 0)):
                    n += k
                    unpinned.append(r)
            self._drop_removed(unpinned)
            return n

    def pins(self, name: str, session_id: int) -> int:
        """How many pins ``session_id`` holds on ``name``."""
        with self._lock:
            return sum(r.pins.get(session_id, 0) for r in self._by_uid.values() if r.name == name)

    def release_session(self, session_id: int) -> int:
        """Drops every pin of a session (call when the session closes or dies)."""
        with self._lock:
            n = 0
            unpinned = []
            for r in self._by_uid.values():
                if k := r.pins.pop(session_id, 0):
                    n += k
                    unpinned.append(r)
            self._drop_removed(unpinned)
            return n

    def park_session(self, session_id: int, until: float, pid: int = 0) -> int:
        """Keeps the pins of a session that ended without closing until ``until``
        (``time.monotonic()``) for :meth:`adopt`; ``pid``: its client's process, for
        :meth:`expire_parked` to look at.  Returns how many were kept."""
        with self._lock:
            n = 0
            for r in self._by_uid.values():
                k = r.pins.pop(session_id, 0)
                if k:
                    r.pins[-session_id] = r.pins.get(-session_id, 0) + k
                    n += k
            if n:
                self._parked[session_id] = (until, pid)
            return n

    def adopt(self, old: int, new: int) -> list[str]:
        """Moves the parked pins of session ``old`` to session ``new``; returns the
        names of the models they pin (none when ``old`` has none parked: never
        parked, already adopted, or expired)."""
        with self._lock:
            if self._parked.pop(old, None) is None:
                return []
            names = set()
            for r in self._by_uid.values():
                k = r.pins.pop(-old, 0)
                if k:
                    r.pins[new] = r.pins.get(new, 0) + k
                    names.add(r.name)
            return sorted(names)

    def expire_parked(
        self, now: float | None = None, alive: Callable[[int], bool] | None = None
    ) -> int:
        """Drops parked pins whose deadline passed, or whose client process is gone
        by now (``alive(pid)`` False: a client that died is seen closing its
        connection while it still exits, so a first look may find it alive).
        Returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [
                sid
                for sid, (until, pid) in self._parked.items()
                if until <= now or (alive is not None and not alive(pid))
            ]
            n = 0
            unpinned = []
            for sid in gone:
                del self._parked[sid]
                for r in self._by_uid.values():
                    if k := r.pins.pop(-sid, 0):
                        n += k
                        unpinned.append(r)
            self._drop_removed(unpinned)
            return n

    def swap(self, session_id: int, old: str, new: str) -> tuple[Resident, int]:
        """Makes ``new`` resident and pinned, then unpins ``old``.

        ``new`` is acquired first so a failure leaves ``old`` pinned and usable.
        Returns the new resident model and the number of pins released on ``old``.
        An empty ``old`` swaps from nothing (a plain pinned load of ``new``).

        Raises:
            ModelNotFoundError: ``old`` is not registered, or ``session_id`` holds no
                pin on it (a swap from a model the caller does not hold is a caller
                bug); checked before anything is loaded, pinned or released.
            ModelBudgetError: no room for ``new`` while ``old`` is pinned (a swap
                needs room for both; the message says to release ``old`` first).
        """
        if old and not self.pins(old, session_id):
            self.store.get(old)  # not registered: "no model named ..." with the known ones
            raise ModelNotFoundError(
                f"cannot swap from model {old!r}: session {session_id} holds no pin on it "
                f"(swap from the model you loaded; to load {new!r} alone, use load_model)"
            )
        try:
            r = self.acquire(new, session_id, pin=True)
        except ModelBudgetError as exc:
            if not old or old == new or self.store.get(new).nbytes > self.arena.size:
                raise  # (the last: larger than the whole budget, releasing cannot help)
            raise ModelBudgetError(
                f"{exc}. A swap loads {new!r} before it unpins {old!r}, so that a failed "
                f"swap leaves {old!r} usable: it needs room for both. Where only one fits, "
                f"release {old!r} first, then load {new!r}"
            ) from None
        released = self.release(old, session_id) if old and old != new else 0
        return r, released

    def evict(self, name: str) -> bool:
        """Drops ``name`` from the arena now if it is resident and unpinned (also a
        copy of an earlier model of that name, removed from the store since)."""
        with self._lock:
            dropped = False
            for r in list(self._by_uid.values()):
                if r.name == name and r.state == READY and not r.pins:
                    self._drop(r)
                    dropped = True
            return dropped

    def resident(self, name: str) -> Resident | None:
        with self._lock:
            # The newest: a copy of a model of that name removed from the store since
            # (kept while pinned) came before the one registered now.
            for r in reversed(self._by_uid.values()):
                if r.name == name and r.state != FAILED:
                    return r
            return None

    def view(self, r: Resident) -> memoryview:
        """The arena bytes of a ready model (a view; release it when done)."""
        return self.arena.view(r.offset, r.manifest.nbytes)

    # ------------------------------------------------------------------ internals
    def _ensure(self, manifest: Manifest, pin_session: int | None) -> Resident:
        with self._lock:
            if self._closed:
                raise ModelStoreError("the model store is shutting down")
            r = self._by_uid.get(manifest.uid)
            if r is not None and r.state == FAILED:
                r = None
            if r is None:
                offset = self._allocate(manifest)
                r = Resident(
                    manifest=manifest,
                    offset=offset,
                    nbytes=manifest.nbytes,
                    load_id=next(self._load_ids),
                )
                self._by_uid[manifest.uid] = r
                self.policy.on_insert(cast("BlockEntry", r))
                self._loader.submit(self._load, r)
            else:
                self.counters.hits += 1
                r.hits += 1
                self.policy.on_access(cast("BlockEntry", r))
            r.last_access = time.monotonic()
            if pin_session is not None:
                r.pins[pin_session] = r.pins.get(pin_session, 0) + 1
            return r

    def _load_of(
        self, load_id: int, name: str, uid: str | None, pin_session: int | None
    ) -> Resident | None:
        """The copy of model ``name`` (registered as ``uid``; None: removed since) that
        load ``load_id`` made, still resident or failed (pinned for ``pin_session`` if
        resident); None when it is gone or is not of that registered model."""
        with self._lock:
            r = self._failed.get(load_id) or next(
                (x for x in self._by_uid.values() if x.load_id == load_id), None
            )
            if r is None or r.name != name or (uid is not None and r.manifest.uid != uid):
                return None
            if r.state != FAILED and pin_session is not None:
                r.pins[pin_session] = r.pins.get(pin_session, 0) + 1
            return r

    def _allocate(self, m: Manifest) -> int:
        if m.nbytes > self.arena.size:
            raise ModelBudgetError(
                f"model {m.name!r} needs {m.nbytes} bytes but the DRAM budget for models is "
                f"{self.arena.size} bytes (raise models.dram_budget)"
            )
        while (off := self.arena.allocator.alloc(m.nbytes)) is None:
            victims = self.policy.victims(
                1, lambda e: cast(Resident, e).state == READY and not cast(Resident, e).pins
            )
            if not victims:
                busy = sorted(
                    f"{r.name} ({r.state}, {r.total_pins} pins"
                    + (f", {p} of a disconnected client" if (p := r.parked_pins) else "")
                    + ")"
                    for r in self._by_uid.values()
                )
                raise ModelBudgetError(
                    f"model {m.name!r} needs {m.nbytes} bytes; the DRAM budget for models "
                    f"({self.arena.size} bytes) is held by pinned or loading models: "
                    f"{', '.join(busy)}; release one first"
                )
            self._drop(cast(Resident, victims[0]))
            self.counters.evictions += 1
        return off

    def _drop_removed(self, residents: list[Resident]) -> None:
        """Drops those of ``residents`` that are ready and unpinned and whose model was
        removed from the store (``kvstore models rm``, perhaps added again since):
        nobody can load them again, so their extent goes now rather than waiting for
        eviction (under ``self._lock``)."""
        for r in residents:
            if r.state != READY or r.pins or self._by_uid.get(r.manifest.uid) is not r:
                continue
            try:
                current = self.store.find(r.name)
            except ModelStoreError:  # the store is closing: leave it to close()
                return
            if current is None or current.uid != r.manifest.uid:
                self._drop(r)

    def _drop(self, r: Resident) -> None:
        self.policy.on_remove(cast("BlockEntry", r))
        self._by_uid.pop(r.manifest.uid, None)
        self.arena.allocator.free(r.offset, r.manifest.nbytes)

    def _load(self, r: Resident) -> None:
        m = r.manifest
        dest = self.arena.view(r.offset, m.nbytes)
        t0 = time.perf_counter()
        try:
            r.read = self.pipeline.read(
                self.store.data_path(m),
                m.nbytes,
                HostSink(dest),
                m.tensors if self.config.verify_checksums else None,
                m.chunks,
            )
            r.load_seconds = time.perf_counter() - t0
            with self._lock:
                r.state = READY
                self.counters.loads += 1
                self.counters.load_bytes += m.nbytes
                self.counters.load_seconds += r.load_seconds
        except ModelError as exc:
            # A fresh error without the traceback: the failed read's frames hold views
            # on the arena, which would keep it from ever being unmapped.
            err = type(exc)(str(exc))
            with self._lock:
                r.state, r.error = FAILED, err
                self.counters.failures += 1
                self._failed[r.load_id] = r
                if len(self._failed) > 64:
                    self._failed.popitem(last=False)
                if self._by_uid.get(m.uid) is r:
                    self._drop(r)
        finally:
            dest.release()
            r.done.set()

    # ------------------------------------------------------------------ status
    def models(self) -> list[dict[str, Any]]:
        """Every registered model with its residency state."""
        registered = self.store.list_models()
        with self._lock:
            by_uid = dict(self._by_uid)
            # Copies of models removed from the store that nobody pins any more.
            uids = {m.uid for m in registered}
            self._drop_removed([r for r in by_uid.values() if r.manifest.uid not in uids])
        out = []
        for m in registered:
            r = by_uid.get(m.uid)
            out.append(
                {
                    "name": m.name,
                    "nbytes": m.nbytes,
                    "tensor_bytes": m.tensor_bytes,
                    "num_tensors": len(m.tensors),
                    "state": r.state if r is not None else "stored",
                    "pins": r.total_pins if r is not None else 0,
                    "source": m.source,
                    "created": m.created,
                }
            )
        return out

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self.counters
            a = self._arena
            return {
                "dram_budget": a.size if a is not None else self.config.dram_budget,
                "dram_used": a.size - a.allocator.free_bytes if a is not None else 0,
                "prefaulted": a.prefaulted if a is not None else 0,
                "prefault_soaked": a.soaked if a is not None else 0,
                "prefault_seconds": round(a.prefault_seconds, 3) if a is not None else 0.0,
                "prefault_retries": a.refaults if a is not None else 0,
                # Physically contiguous runs per 4 MiB of the arena (mean of samples;
                # -1: unknown, not root). Direct reads split requests above 254.
                "arena_runs_per_4mib": (
                    a.runs_per_4mib if a is not None and a.runs_per_4mib is not None else -1
                ),
                "resident": sorted(r.name for r in self._by_uid.values()),
                "parked_sessions": len(self._parked),
                "loads": c.loads,
                "load_bytes": c.load_bytes,
                "load_seconds": round(c.load_seconds, 6),
                "hits": c.hits,
                "evictions": c.evictions,
                "failures": c.failures,
            }

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._loader.shutdown(wait=True)
        self.pipeline.close()
        if self._arena is not None:
            self._arena.close()
