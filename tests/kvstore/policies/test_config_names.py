"""Policy and admission names in the TOML config are validated against the registries."""

from __future__ import annotations

import pytest

from kvstore.config import ConfigError, config_from_dict
from kvstore.policies import ADMISSIONS, DEFAULT_POLICY, POLICIES


def _cfg(**tier: object) -> dict[str, object]:
    return {"tiers": [{"name": "dram", "kind": "dram", "capacity": "64MiB", **tier}]}


def test_known_names_are_accepted_per_tier() -> None:
    cfg = config_from_dict(
        {
            "tiers": [
                {"name": "dram", "kind": "dram", "capacity": "64MiB", "policy": "s3fifo"},
                {
                    "name": "nvme",
                    "kind": "nvme",
                    "capacity": "1GiB",
                    "policy": "lru",
                    "admission": "seen-twice",
                },
            ]
        }
    )
    assert [(t.policy, t.admission) for t in cfg.tiers] == [
        ("s3fifo", "always"),
        ("lru", "seen-twice"),
    ]


def test_default_policy_when_unset() -> None:
    assert config_from_dict(_cfg()).tiers[0].policy == DEFAULT_POLICY


def test_unknown_policy_lists_known_names() -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(_cfg(policy="belady"))
    msg = str(exc.value)
    assert "tiers[0]" in msg and "'belady'" in msg
    for name in POLICIES.names():
        assert name in msg


def test_unknown_admission_lists_known_names() -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(_cfg(admission="twice"))
    msg = str(exc.value)
    assert "admission" in msg and "'twice'" in msg
    for name in ADMISSIONS.names():
        assert name in msg
