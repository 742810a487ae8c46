"""``kvstore bench NAME``: every registered benchmark is reachable and takes its args."""

from __future__ import annotations

import pytest

from kvstore import cli


# ids: a bare "gpu" id would count as the gpu marker and skip without CUDA
@pytest.mark.parametrize("name", sorted(cli._BENCHES), ids=lambda n: f"bench-{n}")
def test_every_bench_answers_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and cli._BENCHES[name].split(".")[1] in out.replace("-", "_")


def test_unknown_bench_lists_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "no-such-bench"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "load-gap" in err and "weight-swap" in err
