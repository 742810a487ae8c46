"""Sessions: one per engine connection, owning its pins and its pending allocations.

When a session ends (``CloseSession``, its ``Watch`` stream breaks because the
client closed or died, or it was idle past the lease timeout) the daemon releases
its pins and aborts its allocations, so nothing stays pinned forever and readers
never see a half-written block.  A namespace stays registered while a session that
registered it is open (the clients register theirs again in every new session), so
sessions that come and go with new models or tenant salts leave nothing behind.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kvstore.hierarchy import Hierarchy
from kvstore.keys import Namespace

log = logging.getLogger(__name__)


LOST_REASONS = frozenset({"client disconnected", "lease expired", "client reconnected"})
"""Ways a session ends without its client closing it: the client may come back."""
MAX_LOST_SESSIONS = 4096
"""How many such ended sessions the daemon remembers the client of (for a reconnect)."""


@dataclass(slots=True)
class Session:
    id: int
    name: str
    pid: int
    opened: float
    last_seen: float
    pins: Counter[bytes] = field(default_factory=Counter)
    allocs: set[bytes] = field(default_factory=set)
    namespaces: set[bytes] = field(default_factory=set)  # ids this session registered
    watchers: int = 0


class SessionManager:
    """Creates, finds and reclaims sessions.  Single-threaded like the hierarchy."""

    def __init__(self, hierarchy: Hierarchy, lease_timeout_s: float) -> None:
        self.h = hierarchy
        self.lease_timeout_s = lease_timeout_s
        self.sessions: dict[int, Session] = {}
        # Ids start at random: a client that has not noticed a restart yet must never
        # reach another client's session (and its pins) with its old id.
        self._ids = itertools.count(secrets.randbelow(1 << 47) + 1)
        # The namespaces registered by open sessions, and how many of those registered
        # each: one goes when the last session that registered it ends.
        self.namespaces: dict[bytes, Namespace] = {}
        self._ns_users: Counter[bytes] = Counter()
        self.opened_total = 0
        self.reclaimed_total = 0
        # callables(session_id), run however a session ends: they drop what the server
        # and the model service keep per session (Watch events, model pins).
        self.on_close: list[Any] = []
        # callables(session), run first when a session ends without the client
        # closing it (LOST_REASONS): the model service parks its pins there.
        self.on_lost: list[Any] = []
        # callables(old_id, new_id) -> names, run when a client reopens: the model
        # service moves the parked pins of ``old_id`` to ``new_id``.
        self.on_reopen: list[Any] = []
        # pid of each session that ended in a LOST_REASONS way (bounded): only the
        # same client process may take over what such a session kept.
        self._lost_pids: dict[int, int] = {}

    def open(self, name: str, pid: int) -> Session:
        now = time.monotonic()
        s = Session(next(self._ids), name or f"pid-{pid}", pid, now, now)
        self.sessions[s.id] = s
        self.opened_total += 1
        return s

    def get(self, sid: int) -> Session | None:
        s = self.sessions.get(sid)
        if s is not None:
            s.last_seen = time.monotonic()
        return s

    def register_namespace(self, s: Session, ns: Namespace) -> bytes:
        """Registers ``ns`` for session ``s`` (again is a no-op); returns its id."""
        ns_id = ns.digest()
        if ns_id not in s.namespaces:
            s.namespaces.add(ns_id)
            self._ns_users[ns_id] += 1
            self.namespaces[ns_id] = ns
        return ns_id

    def _drop_namespaces(self, s: Session) -> None:
        for ns_id in s.namespaces:
            self._ns_users[ns_id] -= 1
            if self._ns_users[ns_id] <= 0:
                del self._ns_users[ns_id]
                del self.namespaces[ns_id]
        s.namespaces.clear()

    def reopen(self, previous: int, new: Session) -> list[str]:
        """Session ``new`` is a reconnect of the client of session ``previous``: ends
        that one if it is still open (its client left it), then lets the hooks move
        what it kept (parked model pins) to ``new``.  Only a session of the same
        client process may do so.  Returns the models adopted."""
        old = self.sessions.get(previous)
        if old is not None:
            if old.pid != new.pid or old is new:
                return []
            self.close(previous, reason="client reconnected")
        if self._lost_pids.get(previous) != new.pid:
            return []
        del self._lost_pids[previous]
        names: list[str] = []
        for hook in self.on_reopen:
            try:
                names += hook(previous, new.id)
            except Exception:  # noqa: BLE001 - the new session works without it
                log.exception("session %d: on_reopen hook %r failed", new, hook)
        return names

    def close(self, sid: int, reason: str = "closed") -> tuple[int, int]:
        """Ends a session: releases its pins, aborts its allocations.

        Returns:
            (pins released, allocations aborted).
        """
        s = self.sessions.pop(sid, None)
        if s is None:
            return 0, 0
        if reason in LOST_REASONS:
            self._lost_pids[sid] = s.pid
            if len(self._lost_pids) > MAX_LOST_SESSIONS:
                del self._lost_pids[next(iter(self._lost_pids))]
            for hook in self.on_lost:
                try:
                    hook(s)
                except Exception:  # noqa: BLE001 - the close must go on
                    log.exception("session %d: on_lost hook %r failed", sid, hook)
        released = 0
        for key, count in s.pins.items():
            e = self.h.get(key)
            if e is not None:
                n = min(count, e.pins)
                e.pins -= n
                released += n
        aborted = self.h.abort(sid, s.allocs)
        self._drop_namespaces(s)
        for hook in self.on_close:
            try:
                hook(sid)
            except Exception:  # noqa: BLE001 - every hook must run: each drops state
                log.exception("session %d: on_close hook %r failed", sid, hook)
        if reason != "closed" or released or aborted:
            log.info(
                "session %d (%s) %s: released %d pins, aborted %d allocations",
                s.id, s.name, reason, released, aborted,
            )  # fmt: skip
        if reason != "closed":
            self.reclaimed_total += 1
        return released, aborted

    def reap_idle(self) -> int:
        """Closes sessions with no open Watch stream that were idle past the lease timeout."""
        now = time.monotonic()
        dead = [
            s.id
            for s in self.sessions.values()
            if s.watchers == 0 and now - s.last_seen > self.lease_timeout_s
        ]
        for sid in dead:
            self.close(sid, reason="lease expired")
        return len(dead)

    def close_all(self) -> None:
        for sid in list(self.sessions):
            self.close(sid, reason="daemon shutdown")
