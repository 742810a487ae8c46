"""Config: every field validated with a message naming it; `serve --help` documents them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.cli import CONFIG_HELP, main
from kvstore.config import (
    ConfigError,
    ServerConfig,
    TierConfig,
    config_from_dict,
    load_config,
    parse_size,
)
from tests.kvstore.conftest import SMALL, DaemonProc
from tests.kvstore.helpers import ROOT


def test_defaults_validate() -> None:
    cfg = load_config(None)
    assert cfg.server.socket.endswith("kvstore.sock")
    assert cfg.tiers[0].kind == "dram" and cfg.tiers[0].capacity >= 256 << 20
    # The embedded default puts an NVMe tier in a local folder under the DRAM arena.
    assert cfg.tiers[1].kind == "nvme" and cfg.tiers[1].capacity >= 1 << 30


def test_nvme_flags(tmp_path: Path) -> None:
    from kvstore.cli import build_config

    def cfg(*argv: str) -> list[tuple[str, int, dict]]:
        import argparse

        p = argparse.ArgumentParser()
        sub = p.add_subparsers()
        from kvstore.cli import _serve_parser

        _serve_parser(sub)
        c = build_config(p.parse_args(["serve", *argv]))
        return [(t.kind, t.capacity, t.options) for t in c.tiers]

    assert [k for k, _, _ in cfg("--no-nvme")] == ["dram"]
    kinds = cfg("--nvme", "2GiB", "--nvme-path", str(tmp_path))
    assert kinds[1] == ("nvme", 2 << 30, {"path": str(tmp_path)})
    for extra in (("--nvme", "1GiB"), ("--nvme-path", str(tmp_path))):
        with pytest.raises(ConfigError, match="--no-nvme contradicts --nvme / --nvme-path"):
            cfg("--no-nvme", *extra)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"server": {"sockt": "x"}}, "server: unknown field.*sockt"),
        ({"server": {"lease_timeout_s": "soon"}}, "server.lease_timeout_s: expected float"),
        ({"server": {"tcp": "localhost"}}, "server.tcp"),
        ({"server": {"log_level": "loud"}}, "server.log_level"),
        ({"server": {"metrics_port": 70000}}, "metrics_port"),
        ({"tiers": [{"name": "dram", "kind": "dram", "capacity": "2 parsecs"}]}, "capacity"),
        ({"tiers": [{"name": "dram", "kind": "dram", "capacity": 0}]}, "capacity: must be > 0"),
        (
            {"tiers": [{"name": "dram", "kind": "dram", "capacity": "1GiB", "policy": "magic"}]},
            "unknown policy 'magic'; known: .*lru",
        ),
        (
            {"tiers": [{"name": "dram", "kind": "dram", "capacity": "1GiB", "admission": "x"}]},
            "unknown admission 'x'; known: .*always",
        ),
        ({"tiers": [{"name": "n", "kind": "nvme", "capacity": "1GiB"}]}, "kind 'dram'"),
        ({"tiers": [{"name": "a", "kind": "dram", "capacity": 1, "colour": 1}]}, "colour"),
        ({"tier": []}, "unknown top-level field"),
    ],
)
def test_invalid_fields_are_named(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_sizes() -> None:
    assert parse_size("2GiB", "x") == 2 << 30
    assert parse_size("512 MiB", "x") == 512 << 20
    assert parse_size("1.5G", "x") == int(1.5 * (1 << 30))
    assert parse_size(4096, "x") == 4096
    with pytest.raises(ConfigError):
        parse_size(True, "x")


def test_help_documents_every_field() -> None:
    for f in dataclasses.fields(ServerConfig):
        assert f"{f.name} =" in CONFIG_HELP, f.name
    for f in dataclasses.fields(TierConfig):
        assert f"{f.name} =" in CONFIG_HELP, f.name
    assert "data_dir =" in CONFIG_HELP
    from loader.config import ModelsConfig

    for f in dataclasses.fields(ModelsConfig):
        assert f"{f.name} =" in CONFIG_HELP, f.name


def test_serve_help_and_bad_config_exit_codes(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvstore", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0 and "persist_on_shutdown" in out.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlog_level = "loud"\n')
    assert main(["serve", "--config", str(bad)]) == 2
    bad.write_text("this is not toml ===")
    assert main(["serve", "--config", str(bad)]) == 2
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2


def test_socket_in_use_is_a_clear_error(
    daemon: DaemonProc, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    rc = main(["serve", "--socket", daemon.socket, "--dram", "64MiB", "--data-dir", str(tmp_path)])
    assert rc == 2
    assert "already serving" in capsys.readouterr().err
    assert Path(daemon.socket).is_socket()  # the running daemon's socket is left alone
    assert main(["stats", "--socket", daemon.socket]) == 0


def test_socket_in_use_is_said_before_the_tiers_are_built(
    make_daemon: type[DaemonProc], capsys: pytest.CaptureFixture
) -> None:
    """A second daemon on the first one's defaults: the clear error, not the NVMe
    folder's lock (held by the first) that building the tiers would run into."""
    # DRAM, and NVMe in the default <data_dir>/nvme (as the embedded defaults have it)
    d = make_daemon(SMALL + '[[tiers]]\nname = "nvme"\nkind = "nvme"\ncapacity = "64MiB"\n')
    d.start()
    data = str(d.tmp / "data")
    rc = main(["serve", "--socket", d.socket, "--dram", "64MiB", "--data-dir", data])
    assert rc == 2
    err = capsys.readouterr().err
    assert "another kvstore daemon is already serving at" in err and "LOCK" not in err


def test_stats_command(daemon: DaemonProc, capsys: pytest.CaptureFixture) -> None:
    assert main(["stats", "--socket", daemon.socket]) == 0
    out = capsys.readouterr().out
    assert "hit rate" in out and "dram" in out
    assert main(["stats", "--socket", daemon.socket, "--json"]) == 0
    assert '"counters"' in capsys.readouterr().out
