"""``kvstore models add|ls|rm`` through the parser the daemon's CLI reuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loader.cli import main
from tests.loader.conftest import small_model, write_model


def test_add_ls_rm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_model(tmp_path / "m.safetensors", small_model())
    d = str(tmp_path / "data")
    assert main(["models", "--data-dir", d, "add", "-q", "llama", str(src)]) == 0
    assert "added llama" in capsys.readouterr().out
    assert main(["models", "--data-dir", d, "ls", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == ["llama"]
    assert main(["models", "--data-dir", d, "ls"]) == 0
    assert "llama" in capsys.readouterr().out
    assert main(["models", "--data-dir", d, "rm", "llama"]) == 0
    assert main(["models", "--data-dir", d, "ls"]) == 0
    assert "no models" in capsys.readouterr().out
    # --data-dir also after the subcommand, as people type it
    assert main(["models", "add", "-q", "qwen", str(src), "--data-dir", d]) == 0
    assert "added qwen" in capsys.readouterr().out
    assert main(["models", "ls", "--json", "--data-dir", d]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["qwen"]
    assert main(["models", "--data-dir", str(tmp_path / "other"), "ls", "--data-dir", d]) == 0
    assert "qwen" in capsys.readouterr().out  # the later one wins
    assert main(["models", "rm", "qwen", "--data-dir", d]) == 0
    # A folder of shards: `ls` shows the folder given, not its first shard.
    shards = tmp_path / "shards"
    write_model(shards / "model-00001-of-00002.safetensors", small_model(1))
    write_model(shards / "model-00002-of-00002.safetensors", {"extra": small_model(2)["scalar"]})
    assert main(["models", "add", "-q", "sharded", str(shards), "--data-dir", d]) == 0
    capsys.readouterr()
    assert main(["models", "ls", "--json", "--data-dir", d]) == 0
    assert json.loads(capsys.readouterr().out)[0]["source"] == str(shards)


def test_errors_are_messages_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path / "data")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"hello world, not a model")
    assert main(["models", "--data-dir", d, "add", "-q", "x", str(bad)]) == 1
    assert "error:" in capsys.readouterr().err
    assert main(["models", "--data-dir", d, "rm", "nope"]) == 1
    assert "no model named 'nope'" in capsys.readouterr().err
    src = write_model(tmp_path / "m.safetensors", small_model())
    assert main(["models", "--data-dir", d, "add", "-q", "x", str(src)]) == 0
    assert main(["models", "--data-dir", d, "add", "-q", "x", str(src)]) == 1
    assert "already registered" in capsys.readouterr().err


def test_tilde_in_data_dir_is_the_daemons_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The daemon opens Path(data_dir).expanduser(); `kvstore models` must open the same
    # folder, never a literal ./~/... under the current directory.
    from kvstore.config import load_config
    from loader.arena import ModelArena
    from loader.store import ModelStore

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('data_dir = "~/rvdata"\n')
    src = write_model(tmp_path / "m.safetensors", small_model())
    assert main(["models", "--config", str(cfg), "add", "-q", "m", str(src)]) == 0
    assert main(["models", "--data-dir", "~/other", "add", "-q", "o", "~/../m.safetensors"]) == 0
    capsys.readouterr()
    assert not (cwd / "~").exists()
    daemons_dir = Path(load_config(str(cfg)).data_dir).expanduser()  # as kvstore.daemon does
    assert daemons_dir == home / "rvdata"
    with ModelStore(daemons_dir) as st:
        assert [m.name for m in st.list_models()] == ["m"]
    with ModelStore("~/other") as st:  # the store expands too (service, standalone)
        assert st.root == home / "other" / "models"
        assert [m.name for m in st.list_models()] == ["o"]
    (home / "shm").mkdir()
    arena = ModelArena("~/shm", 1 << 20, prefault=False)  # models.shm_dir = "~/shm"
    try:
        assert arena.path.parent == home / "shm"
    finally:
        arena.close()
