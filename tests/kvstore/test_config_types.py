"""Config values of the wrong type or an unknown tier kind: a ConfigError naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvstore.cli import main
from kvstore.config import ConfigError, config_from_dict, tier_kinds

DRAM = {"name": "dram", "kind": "dram", "capacity": "16MiB"}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"tiers": "x"}, r"^tiers: expected an array of tables"),
        ({"tiers": ["x"]}, r"^tiers\[0\]: expected a table, got str"),
        ({"tiers": [DRAM, 5]}, r"^tiers\[1\]: expected a table, got int"),
        ({"server": 5}, r"^server: expected a table, got int"),
        ({"models": "big"}, r"^models: expected a table, got str"),
        ({"data_dir": 5}, r"^data_dir: expected a path string"),
        ({"tiers": [{**DRAM, "name": 5}]}, r"^tiers\[0\]\.name: expected str"),
        ({"tiers": [{**DRAM, "kind": ["dram"]}]}, r"^tiers\[0\]\.kind: expected str"),
        ({"tiers": [{**DRAM, "options": "fast"}]}, r"^tiers\[0\]\.options: expected dict"),
        (
            {"tiers": [DRAM, {"name": "slow", "kind": "nvm", "capacity": "1GiB"}]},
            r"^tiers\[1\]\.kind: unknown tier kind 'nvm' .*known: cxl, dram, gpu, nvme$",
        ),
        # The unknown kind is reported, not the missing dram tier it causes.
        (
            {"tiers": [{**DRAM, "kind": "dramm"}]},
            r"^tiers\[0\]\.kind: unknown tier kind 'dramm'",
        ),
        # The byte-less trace-replay tier cannot serve clients: not a daemon tier kind.
        ({"tiers": [DRAM, {**DRAM, "name": "n", "kind": "null"}]}, r"unknown tier kind 'null'"),
        (
            {"tiers": [DRAM, {**DRAM, "name": "dram2"}]},
            r"exactly one tier of kind 'dram'.*found 2: tiers\[0\] \('dram'\), tiers\[1\]",
        ),
    ],
)
def test_wrong_types_and_kinds_are_named(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_daemon_tier_kinds_exclude_null() -> None:
    assert tier_kinds() == ["cxl", "dram", "gpu", "nvme"]


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ('tiers = "x"\n', "tiers: expected an array of tables"),
        ("server = 5\n", "server: expected a table"),
        (
            '[[tiers]]\nname = "dram"\nkind = "dram"\ncapacity = "16MiB"\n'
            '[[tiers]]\nname = "slow"\nkind = "nvm"\ncapacity = "1GiB"\n',
            "tiers[1].kind: unknown tier kind 'nvm'",
        ),
    ],
)
def test_serve_reports_config_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, match: str
) -> None:
    cfg = tmp_path / "kvstore.toml"
    cfg.write_text(toml)
    sock = str(tmp_path / "s.sock")
    assert main(["serve", "--config", str(cfg), "--socket", sock, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvstore: config error: ") and match in err, err
