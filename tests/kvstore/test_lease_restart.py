"""A lease taken before a daemon restart: closing it raises LeaseLost (its pins ended
with the session, so what was read under it cannot be vouched for) and releases
nothing, never someone else's pins."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore import Client, LeaseLost
from kvstore.errors import FailedPrecondition
from tests.kvstore.conftest import DaemonProc
from tests.kvstore.helpers import NS, blocks_for


def test_lease_from_before_a_restart_says_it_was_lost(daemon: DaemonProc) -> None:
    toks = np.arange(32)
    with Client(daemon.socket, timeout=10.0) as c:
        c.store_tokens(NS, toks, blocks_for(NS, toks))
        lease = c.load_tokens(NS, toks)
        assert len(lease.keys) == 2
        old_session = c.session_id
        daemon.kill()
        daemon.start()
        with pytest.raises(LeaseLost, match="2 pin"):
            lease.close()  # the daemon released those pins when the session ended
        lease.close()  # once only
        # The client works on in a new session, whose id the old one never shares.
        assert c.store_tokens(NS, toks, blocks_for(NS, toks)).new == 2
        assert c.session_id != old_session
        with c.load_tokens(NS, toks) as again:
            assert len(again.keys) == 2
        st = c.stats()["sessions"]
        assert st["open"] == 1 and st["pins"] == 0


def test_other_release_errors_still_raise(daemon: DaemonProc) -> None:
    toks = np.arange(32)
    with Client(daemon.socket) as c:
        c.store_tokens(NS, toks, blocks_for(NS, toks))
        lease = c.load_tokens(NS, toks)
        c.release(lease.keys)  # released behind the lease's back: a caller bug
        with pytest.raises(FailedPrecondition, match="not acquired by this session"):
            lease.close()
