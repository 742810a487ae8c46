"""Eviction and admission policies, registered by name (see :mod:`kvstore.policies.base`)."""

from kvstore.policies import lru  # noqa: F401  (registers)
from kvstore.policies.base import ADMISSIONS, POLICIES, AdmissionPolicy, EvictionPolicy

DEFAULT_POLICY = "lru"

__all__ = ["ADMISSIONS", "DEFAULT_POLICY", "POLICIES", "AdmissionPolicy", "EvictionPolicy"]
