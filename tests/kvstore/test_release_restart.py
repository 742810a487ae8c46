"""Client.release() of pins taken before a daemon restart releases nothing and raises
LeaseLost (the daemon released them when the session ended), as closing a lease does:
what was read through their views cannot be vouched for."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore import Client, LeaseLost
from kvstore.errors import FailedPrecondition
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS, blocks_for

TOKS = np.arange(32)


def _pins(c: Client) -> int:
    return int(c.stats()["sessions"]["pins"])


def test_release_right_after_a_restart_says_the_pins_were_lost(daemon: DaemonProc) -> None:
    with Client(daemon.socket, timeout=10.0) as c:
        c.store_tokens(NS, TOKS, blocks_for(NS, TOKS))
        keys = NS.block_keys(TOKS)
        assert all(v is not None for v in c.acquire(keys))
        old = c.session_id
        daemon.kill()
        daemon.start()
        with pytest.raises(LeaseLost, match="2 pin"):
            c.release(keys)  # finds its session gone (unknown session): releases nothing
        assert c.lookup(keys).num_cached == 0  # the next call reconnects
        assert c.session_id != old
        assert _pins(c) == 0
        with pytest.raises(FailedPrecondition, match="not acquired by this session"):
            c.release(keys)  # a third release: a caller bug, as before


def test_release_after_another_call_reconnected_says_the_pins_were_lost(daemon: DaemonProc) -> None:
    with Client(daemon.socket, timeout=10.0) as c:
        c.store_tokens(NS, TOKS, blocks_for(NS, TOKS))
        keys = NS.block_keys(TOKS)
        c.acquire(keys)
        daemon.kill()
        daemon.start()
        assert c.store_tokens(NS, TOKS, blocks_for(NS, TOKS)).new == 2  # reconnects
        again = c.acquire(keys[:1])  # pinned in the new session
        assert again[0] is not None
        with pytest.raises(LeaseLost, match="1 pin"):
            c.release(keys)  # key 0: the new pin, released; key 1: ended with the old session
        assert _pins(c) == 0
        with pytest.raises(LeaseLost, match="1 pin"):
            c.release(keys[:1])  # key 0's old pin: ended too
        with pytest.raises(FailedPrecondition, match="not acquired by this session"):
            c.release(keys[:1])


def test_release_without_a_restart_still_checks(daemon: DaemonProc) -> None:
    with Client(daemon.socket) as c:
        c.store_tokens(NS, TOKS, blocks_for(NS, TOKS))
        keys = NS.block_keys(TOKS)
        c.acquire(keys)
        c.acquire(keys[:1])
        c.release([keys[0], keys[0], keys[1]])
        assert _pins(c) == 0
        with pytest.raises(FailedPrecondition, match="not acquired by this session"):
            c.release(keys[:1])
        c.acquire(keys[:1])
        with pytest.raises(FailedPrecondition):
            c.release([keys[0], keys[0]])  # one too many: nothing released
        assert _pins(c) == 1
        c.release(keys[:1])  # the failed release left its pin counted
        assert _pins(c) == 0
