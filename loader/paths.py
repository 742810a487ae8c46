"""Configured paths as the daemon reads them.

The daemon expands ``~`` in every path it is given (``Path(cfg.data_dir).expanduser()``
in :mod:`kvstore.daemon`); whatever else opens the same data directory (``kvstore
models``, the standalone service, the store and the arena) goes through
:func:`user_path` so that ``data_dir = "~/kv"`` names the same folder everywhere,
never a literal ``./~/kv`` in the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def user_path(p: str | os.PathLike[str]) -> Path:
    """``p`` as a :class:`~pathlib.Path` with a leading ``~`` / ``~user`` expanded."""
    return Path(p).expanduser()
