"""Tier backends; importing this package registers every kind in ``TIERS``."""

from kvstore.tiers import nvme as nvme  # noqa: F401 - registers "nvme"
