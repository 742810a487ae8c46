"""The daemon's collector settings: applied at start, undone by the caller in tests."""

from __future__ import annotations

import gc

from kvstore.gc_tuning import YOUNG_THRESHOLD, tune_gc


def test_tune_gc_sets_and_returns_previous() -> None:
    before = gc.get_threshold()
    try:
        assert tune_gc() == before
        assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
    finally:
        gc.set_threshold(*before)


def test_daemon_runs_with_tuned_gc(daemon: object) -> None:
    from kvstore import Client

    with Client(daemon.socket) as c:  # type: ignore[attr-defined]
        st = c.stats()
    assert st["gc"]["threshold"][0] == YOUNG_THRESHOLD
    assert st["gc"]["frozen_objects"] > 0  # start-up objects left out of full collections
