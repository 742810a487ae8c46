"""The command line's small promises: flags its help names exist, output and errors are clean."""

from __future__ import annotations

import argparse
import re

import pytest

from kvstore.cli import CONFIG_HELP, _serve_parser, main


def test_flags_named_in_serve_help_exist() -> None:
    sub = argparse.ArgumentParser().add_subparsers()
    _serve_parser(sub)
    serve = sub.choices["serve"]
    flags = {s for a in serve._actions for s in a.option_strings}
    named = set(re.findall(r"(--[a-z][a-z-]+)", CONFIG_HELP))
    assert "--list-kinds" in named
    assert named <= flags, named - flags


def test_list_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--list-kinds"]) == 0
    lines = capsys.readouterr().out.splitlines()
    kinds = [ln.split()[0] for ln in lines if ln.startswith("  ")]
    assert kinds == ["cxl", "dram", "gpu", "nvme"]  # not the trace-replay-only null tier
    assert any(ln.startswith("eviction policies: ") and "lru" in ln for ln in lines)
    assert any(ln.startswith("admission policies: ") and "always" in ln for ln in lines)
