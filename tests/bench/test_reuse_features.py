"""The reuse-by-feature analysis behind bench/results/policies.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import reuse_features as rf
from bench import trace_replay as tr

# Four requests: a conversation of three turns (0-1-2, +3, +5) and a branch (0-4).
TINY = [[0, 1, 2], [0, 1, 2, 3], [0, 4], [0, 1, 2, 3, 5]]


def test_tiny_trace_by_hand() -> None:
    s = rf.reuse_by_feature(TINY, within=2)
    # Blocks 0, 1, 2 are reused 3, 2, 1 new blocks after they were created; 3 after 2;
    # 4 and 5 never.  Only block 2's reuse is within 2 new blocks.
    assert s["last_block"] == {"no": (2, 1.0, 0.0), "yes": (4, 0.5, 0.25)}
    assert s["turn"] == {"1": (4, 0.75, 0.25), "2": (1, 1.0, 0.0), "3": (1, 0.0, 0.0)}
    assert s["hit_depth"] == {
        "0": (3, 1.0, 1 / 3),
        "1": (1, 0.0, 0.0),
        "2-3": (1, 1.0, 0.0),
        "4-7": (1, 0.0, 0.0),
    }
    # Block 4's parent (0) already had one continuation (1).
    assert s["parent_children"]["1"] == (1, 0.0, 0.0)
    assert sum(n for n, _, _ in s["parent_children"].values()) == 6


def test_every_feature_covers_every_block_once() -> None:
    trace = tr.synthetic_trace(400, seed=3)
    s = rf.reuse_by_feature(trace, within=500)
    for rows in s.values():
        assert sum(n for n, _, _ in rows.values()) == tr.unique_blocks(trace)
        for _, p, pw in rows.values():
            assert 0.0 <= pw <= p <= 1.0


def test_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps({"hash_ids": ids}) + "\n" for ids in TINY))
    assert rf.main(["--trace", str(p), "--within", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["last_block"]["yes"] == [4, 0.5, 0.25]
    assert rf.main(["--trace", str(p)]) == 0
    assert "P(reused)" in capsys.readouterr().out
