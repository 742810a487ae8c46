"""Daemon configuration: one TOML file, every field validated, flags override.

Each component has one dataclass.  Tier-specific options live in the tier's
``options`` table and are validated by the tier class itself
(``Tier.from_config``), so a new backend adds no field here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from loader.config import ModelsConfig


class ConfigError(ValueError):
    """An invalid configuration; the message names the field."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: int | str, field_name: str) -> int:
    """``"2GiB"``, ``"512MiB"``, ``"1.5G"`` or an int of bytes -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{field_name}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{field_name}: size must be >= 0, got {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"{field_name}: cannot parse size {value!r} (e.g. '2GiB', '512MiB')")
    unit = (m.group(2) or "").upper()[:1]
    return int(float(m.group(1)) * _UNITS[unit])


def default_runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/kvstore-{os.getuid()}"
    return Path(base) / "kvstore"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "kvstore"


def default_dram_bytes() -> int:
    """An eighth of available memory, between 256 MiB and 4 GiB (pre-faulted at start)."""
    avail = psutil.virtual_memory().available
    return int(min(max(avail // 8, 256 << 20), 4 << 30)) & ~((1 << 20) - 1)


LOG_LEVELS = ("debug", "info", "warning", "error")


def check_log_level(value: str, field_name: str) -> None:
    if value.lower() not in LOG_LEVELS:
        raise ConfigError(f"{field_name}: {value!r} not one of {', '.join(LOG_LEVELS)}")


@dataclass(slots=True)
class ServerConfig:
    """Control plane.  ``socket``: Unix socket path; ``tcp``: ``host:port`` or empty (off)."""

    socket: str = ""
    tcp: str = ""
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_level: str = "info"
    lease_timeout_s: float = 10.0
    max_keys_per_request: int = 65536
    max_message_bytes: int = 64 << 20
    shutdown_grace_s: float = 5.0
    persist_on_shutdown: bool = False

    def validate(self) -> None:
        if not self.socket:
            self.socket = str(default_runtime_dir() / "kvstore.sock")
        if self.tcp:
            host, _, port = self.tcp.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"server.tcp: expected 'host:port', got {self.tcp!r}")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"server.metrics_port: out of range: {self.metrics_port}")
        check_log_level(self.log_level, "server.log_level")
        if self.lease_timeout_s <= 0:
            raise ConfigError("server.lease_timeout_s: must be > 0")
        if self.max_keys_per_request <= 0:
            raise ConfigError("server.max_keys_per_request: must be > 0")


@dataclass(slots=True)
class TierConfig:
    """One tier of the ordered hierarchy (fastest first).

    ``kind`` is a registered tier backend (``dram``, ``cxl``, ``nvme``, ``gpu``);
    ``options`` holds kind-specific settings validated by that backend.
    """

    name: str
    kind: str
    capacity: int = 0
    policy: str = ""
    admission: str = "always"
    options: dict[str, Any] = field(default_factory=dict)


def default_nvme_bytes() -> int:
    """A quarter of the free space under the home folder, between 1 GiB and 64 GiB."""
    import shutil

    free = shutil.disk_usage(Path.home() if Path.home().exists() else Path("/")).free
    return int(min(max(free // 4, 1 << 30), 64 << 30)) & ~((1 << 20) - 1)


def _default_tiers() -> list[TierConfig]:
    """DRAM sized from free memory over an NVMe tier in ``<data_dir>/nvme``."""
    return [
        TierConfig(name="dram", kind="dram", capacity=default_dram_bytes()),
        TierConfig(name="nvme", kind="nvme", capacity=default_nvme_bytes()),
    ]


@dataclass(slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    tiers: list[TierConfig] = field(default_factory=_default_tiers)
    data_dir: str = ""
    models: ModelsConfig | None = None  # the [models] table (model-weight store)

    def validate(self) -> Config:
        from kvstore.policies import ADMISSIONS, DEFAULT_POLICY, POLICIES

        self.server.validate()
        if not self.data_dir:
            self.data_dir = str(default_data_dir())
        if not self.tiers:
            raise ConfigError("tiers: at least one tier is required")
        names = set()
        kinds = tier_kinds()
        for i, t in enumerate(self.tiers):
            where = f"tiers[{i}] ({t.name!r})"
            if not t.name or t.name in names:
                raise ConfigError(f"{where}: tier names must be unique and non-empty")
            names.add(t.name)
            if t.kind not in kinds:
                raise ConfigError(
                    f"tiers[{i}].kind: unknown tier kind {t.kind!r} (tier {t.name!r}); "
                    f"known: {', '.join(kinds)}"
                )
            t.policy = t.policy or DEFAULT_POLICY
            if t.policy not in POLICIES:
                raise ConfigError(
                    f"{where}.policy: unknown policy {t.policy!r}; known: {', '.join(POLICIES.names())}"
                )
            if t.admission not in ADMISSIONS:
                raise ConfigError(
                    f"{where}.admission: unknown admission {t.admission!r}; "
                    f"known: {', '.join(ADMISSIONS.names())}"
                )
            if t.capacity <= 0:
                raise ConfigError(f"{where}.capacity: must be > 0")
        drams = [f"tiers[{i}] ({t.name!r})" for i, t in enumerate(self.tiers) if t.kind == "dram"]
        if len(drams) != 1:
            raise ConfigError(
                "tiers: exactly one tier of kind 'dram' (the shared-memory arena) is required; "
                + (f"found {len(drams)}: {', '.join(drams)}" if drams else "found none")
            )
        return self


def tier_kinds() -> list[str]:
    """The tier kinds a daemon config may name (``tiers[].kind``), sorted.

    Only tiers that hold bytes: the byte-less ``null`` tier exists for the trace
    replay benchmark, which builds it directly, and cannot serve clients.
    """
    from kvstore.tiers import load_backends  # the tiers import this module: import late
    from kvstore.tiers.base import TIERS

    load_backends()
    return [name for name in TIERS.names() if TIERS.get(name).stores_bytes]


def _table(value: Any, where: str) -> dict[str, Any]:
    """``value`` if it is a TOML table, else a :class:`ConfigError` naming ``where``."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {type(value).__name__} ({value!r})")
    return value


def _field_type(cls: type, f: dataclasses.Field[Any]) -> type | None:
    """The plain type a field's TOML value must have, or ``None`` when not checked here."""
    if f.default is not dataclasses.MISSING:
        return None if f.default is None else type(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return type(f.default_factory())
    hint = typing.get_type_hints(cls).get(f.name)
    return hint if isinstance(hint, type) else None


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    data = _table(data, where)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        want = _field_type(cls, known[k])
        if k == "capacity":
            v = parse_size(v, f"{where}.{k}")
        elif want is not None:
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise ConfigError(
                    f"{where}.{k}: expected {want.__name__}, got {type(v).__name__} ({v!r})"
                )
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def config_from_dict(data: dict[str, Any]) -> Config:
    """Builds and validates a :class:`Config` from parsed TOML."""
    data = dict(data)
    server = _build(ServerConfig, data.pop("server", {}), "server")
    tiers_raw = data.pop("tiers", None)
    data_dir = data.pop("data_dir", "")
    if not isinstance(data_dir, str):
        raise ConfigError(f"data_dir: expected a path string, got {data_dir!r}")
    from loader.config import ModelsConfig  # loader imports this module: import late

    models = ModelsConfig.from_dict(_table(data.pop("models", {}), "models"))
    if data:
        raise ConfigError(
            f"unknown top-level field(s) {', '.join(sorted(data))}; "
            "known: server, tiers, data_dir, models"
        )
    if tiers_raw is None:
        tiers = _default_tiers()
    elif isinstance(tiers_raw, list):
        tiers = [_build(TierConfig, t, f"tiers[{i}]") for i, t in enumerate(tiers_raw)]
    else:
        raise ConfigError(
            f"tiers: expected an array of tables ([[tiers]]), got {type(tiers_raw).__name__} "
            f"({tiers_raw!r})"
        )
    return Config(server=server, tiers=tiers, data_dir=str(data_dir), models=models).validate()


def load_config(path: str | Path | None) -> Config:
    """Loads the TOML file at ``path`` (or the embedded defaults when ``None``)."""
    if path is None:
        return Config().validate()
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return config_from_dict(data)
