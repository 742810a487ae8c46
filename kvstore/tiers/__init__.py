"""Tier backends, registered by kind in :data:`kvstore.tiers.base.TIERS`."""

from __future__ import annotations

import importlib

# Modules that register a backend when imported; optional ones need extra packages.
_BACKENDS = ("kvstore.tiers.dram", "kvstore.tiers.nvme", "kvstore.tiers.gpu")


def load_backends() -> None:
    """Imports every backend module so its kind is registered."""
    for mod in _BACKENDS:
        importlib.import_module(mod)
