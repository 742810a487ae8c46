"""Eviction and admission policies, registered by name (see :mod:`kvstore.policies.base`).

Eviction: ``lru``, ``lfu`` (with aging), ``s3fifo``, ``arc`` and ``chain`` (ours:
frequency-filtered, prefix-tree aware, sized from measured reuse distances).
Admission: ``always``, ``seen-twice``.
"""

from kvstore.policies import arc, chain, lfu, lru, s3fifo, seen_twice  # noqa: F401  (registers)
from kvstore.policies.base import ADMISSIONS, POLICIES, AdmissionPolicy, EvictionPolicy

DEFAULT_POLICY = "chain"
"""The policy that measured best on the Mooncake trace (bench/results/policies.md)."""

__all__ = ["ADMISSIONS", "DEFAULT_POLICY", "POLICIES", "AdmissionPolicy", "EvictionPolicy"]
