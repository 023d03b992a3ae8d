"""Settings from the environment, read in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Settings:
    amqp_url: str = field(default_factory=lambda: _env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    host: str = field(default_factory=lambda: _env("FERRY_HOST", os.uname().nodename))
    driver: str = field(default_factory=lambda: _env("FERRY_DRIVER", "sim"))
    store_url: str = field(default_factory=lambda: _env("FERRY_STORE_URL", "sqlite:///ferry-coordinator.db"))
    state_dir: str = field(default_factory=lambda: _env("FERRY_STATE_DIR", ".ferry/state"))
    health_port: int = field(default_factory=lambda: int(_env("FERRY_HEALTH_PORT", "8080")))
    allowed_sources: tuple[str, ...] = field(
        default_factory=lambda: tuple(p for p in _env("FERRY_ALLOWED_SOURCES", "*").split(",") if p)
    )
    capacity_mib: int | None = field(
        default_factory=lambda: int(v) if (v := os.environ.get("FERRY_CAPACITY_MIB")) else None
    )
    identity: str | None = field(default_factory=lambda: os.environ.get("FERRY_IDENTITY"))
