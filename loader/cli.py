"""``kvstore models add|ls|rm``: manage the model store of a data directory.

Works directly on ``<data_dir>/models`` (LMDB is multi-process safe), so it may run
while the daemon serves.  ``python -m loader.cli models ...`` runs it standalone.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loader.errors import ModelError
from loader.paths import user_path
from loader.store import ModelStore, resolve_sources


def _data_dir(args: argparse.Namespace) -> Path:
    """``--data-dir`` or the config's ``data_dir``, ``~`` expanded as the daemon does."""
    if getattr(args, "data_dir", None):
        return user_path(args.data_dir)
    from kvstore.config import load_config

    return user_path(load_config(getattr(args, "config", None)).data_dir)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_add(args: argparse.Namespace) -> int:
    with ModelStore(_data_dir(args)) as store:
        store.check_absent(args.name)  # before parsing and the progress bar
        files = resolve_sources(args.path)
        total = sum(t.nbytes for f in files for t in f.tensors)
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"ingest {args.name}",
            disable=args.quiet,
            file=sys.stderr,
        ) as bar:
            m = store.add(args.name, files, progress=bar.update, label=str(args.path))
    print(f"added {m.name}: {len(m.tensors)} tensors, {_human(m.tensor_bytes)} ({m.uid})")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with ModelStore(_data_dir(args)) as store:
        models = store.list_models()
    if args.json:
        doc: list[dict[str, Any]] = [
            {
                "name": m.name,
                "nbytes": m.nbytes,
                "tensor_bytes": m.tensor_bytes,
                "num_tensors": len(m.tensors),
                "source": m.source,
                "uid": m.uid,
            }
            for m in models
        ]
        print(json.dumps(doc, indent=2))
        return 0
    if not models:
        print("no models registered")
        return 0
    w = max(len("NAME"), *(len(m.name) for m in models))
    print(f"{'NAME':<{w}}  {'SIZE':>10}  {'TENSORS':>7}  SOURCE")
    for m in models:
        print(f"{m.name:<{w}}  {_human(m.tensor_bytes):>10}  {len(m.tensors):>7}  {m.source}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with ModelStore(_data_dir(args)) as store:
        for name in args.names:
            m = store.remove(name)
            print(f"removed {m.name} ({_human(m.tensor_bytes)})")
    return 0


def register(subparsers: Any) -> None:
    """Adds the ``models`` command (``add``, ``ls``, ``rm``) to a subparsers object."""
    p = subparsers.add_parser("models", help="manage stored model weights")
    p.add_argument("--data-dir", help="data directory (default: the config's data_dir)")
    p.add_argument("--config", help="TOML config file (for data_dir)")
    # The same two options after the subcommand (`models add NAME PATH --data-dir D`):
    # SUPPRESS keeps a value given before it when they are not repeated.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir", default=argparse.SUPPRESS, help="data directory (as before the command)"
    )
    common.add_argument(
        "--config", default=argparse.SUPPRESS, help="TOML config file (for data_dir)"
    )
    sub = p.add_subparsers(dest="models_cmd", required=True)
    add_parser = functools.partial(sub.add_parser, parents=[common])
    a = add_parser("add", help="ingest safetensors (file, folder of shards, or index.json)")
    a.add_argument("name")
    a.add_argument("path")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_guarded(cmd_add))
    ls = add_parser("ls", help="list stored models")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_guarded(cmd_ls))
    rm = add_parser("rm", help="remove models")
    rm.add_argument("names", nargs="+")
    rm.set_defaults(func=_guarded(cmd_rm))


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Model errors become a one-line message and exit status 1 (no traceback)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except ModelError as exc:
            print(f"kvstore models: error: {exc}", file=sys.stderr)
            return 1

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvstore")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
