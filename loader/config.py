"""Configuration of the model-weight store (the ``[models]`` table of the TOML file)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import psutil

from kvstore.config import ConfigError, parse_size
from loader.manifest import ALIGN

_SIZE_FIELDS = ("dram_budget", "ring_buffer_bytes")


def default_models_budget() -> int:
    """A quarter of available memory, between 512 MiB and 16 GiB."""
    avail = psutil.virtual_memory().available
    return int(min(max(avail // 4, 512 << 20), 16 << 30)) & ~((1 << 20) - 1)


@dataclass(slots=True)
class ModelsConfig:
    """Model-weight residency and the read pipeline.

    Attributes:
        dram_budget: bytes of host DRAM for resident models (one shared-memory arena);
            0 picks :func:`default_models_budget`.
        shm_dir: where the arena file lives (a tmpfs).
        prefault: touch the whole arena at start (in the background) so loads never
            pay first-touch page faults (~0.4 GB/s on small VMs).
        policy: eviction policy among unpinned resident models (a registered name).
        ring_buffers: buffers in the read ring (used when reads cannot land in the
            destination directly, e.g. GPU); bounds the pipeline's own memory.
        ring_buffer_bytes: size of each buffer and of each read.
        max_inflight: reads in flight (loads into DRAM land straight in the arena, so
            depth costs no memory; this disk reads ~2x faster at 64 than at 8).
        io_threads: threads issuing reads.
        direct_io: read with O_DIRECT (falls back to buffered reads if refused).
        verify_checksums: verify every tensor's xxh3_64 on load.
        pin_grace_s: how long the model pins of a session that ended without closing
            (its Watch stream broke or its lease expired while its process lives) are
            kept for its client to reconnect and take them over; 0: released at once.
    """

    dram_budget: int = 0
    shm_dir: str = "/dev/shm"
    prefault: bool = True
    policy: str = "lru"
    ring_buffers: int = 8
    ring_buffer_bytes: int = 8 << 20
    max_inflight: int = 64
    io_threads: int = 64
    direct_io: bool = True
    verify_checksums: bool = True
    pin_grace_s: float = 30.0

    def validate(self) -> ModelsConfig:
        from kvstore.policies import POLICIES

        if self.dram_budget == 0:
            self.dram_budget = default_models_budget()
        if self.dram_budget < (1 << 20):
            raise ConfigError(f"models.dram_budget: at least 1 MiB, got {self.dram_budget}")
        if self.ring_buffers < 1 or self.ring_buffers > 1024:
            raise ConfigError(f"models.ring_buffers: 1..1024, got {self.ring_buffers}")
        rb = self.ring_buffer_bytes
        if rb < ALIGN or rb % ALIGN or rb > (1 << 30):
            raise ConfigError(
                f"models.ring_buffer_bytes: a multiple of {ALIGN} up to 1 GiB, got {rb}"
            )
        if self.max_inflight < 1 or self.max_inflight > 1024:
            raise ConfigError(f"models.max_inflight: 1..1024, got {self.max_inflight}")
        if self.io_threads < 1 or self.io_threads > 256:
            raise ConfigError(f"models.io_threads: 1..256, got {self.io_threads}")
        if not 0 <= self.pin_grace_s <= 86400:
            raise ConfigError(f"models.pin_grace_s: 0..86400 seconds, got {self.pin_grace_s}")
        if self.policy not in POLICIES:
            raise ConfigError(
                f"models.policy: unknown policy {self.policy!r}; known: {', '.join(POLICIES.names())}"
            )
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelsConfig:
        """Builds and validates the config from the parsed ``[models]`` table."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"models: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        kwargs: dict[str, Any] = {}
        for k, v in data.items():
            if k in _SIZE_FIELDS:
                v = parse_size(v, f"models.{k}")
            else:
                want = type(known[k].default)
                if want is float and isinstance(v, int) and not isinstance(v, bool):
                    v = float(v)  # `pin_grace_s = 30` in TOML
                if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                    raise ConfigError(
                        f"models.{k}: expected {want.__name__}, got {type(v).__name__} ({v!r})"
                    )
            kwargs[k] = v
        return cls(**kwargs).validate()
