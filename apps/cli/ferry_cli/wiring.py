"""What the entry points build from :class:`~ferry_common.settings.Settings`: the bus, the
signing keys, tracing and the collector's thresholds (each module keeps its own parsing)."""

from __future__ import annotations

from collections.abc import Callable

from ferry_common.bus.amqp import AmqpBus
from ferry_common.runtime import tune_gc
from ferry_common.security import Authenticator
from ferry_common.settings import Settings
from ferry_common.signing import auth_factory_from_env, authenticator_from_env
from ferry_common.tracing import BusSpanExporter, Tracing, setup_tracing


def bus(settings: Settings, name: str) -> AmqpBus:
    """A bus on ``AMQP_URL`` with TLS as ``FERRY_AMQP_*`` configures it (unconnected)."""
    return AmqpBus.from_settings(settings, name=name)


def auth_factory(settings: Settings) -> Callable[[str], Authenticator]:
    """``identity -> authenticator`` for a process hosting several services."""
    return auth_factory_from_env(settings=settings)


def authenticator(settings: Settings) -> Authenticator:
    """The authenticator of a process with one identity (``FERRY_IDENTITY``)."""
    return authenticator_from_env(settings=settings)


def tracing(settings: Settings, service_name: str, *, collect: bool = True) -> Tracing:
    """Install tracing as ``OTEL_*`` and ``FERRY_TRACE_COLLECT`` say (spans shipped over the bus)."""
    return setup_tracing(service_name, bus_exporter=BusSpanExporter() if collect else None, env=settings.tracing_env())


def gc(settings: Settings) -> tuple[int, int, int]:
    """The collector's thresholds of ``FERRY_GC_THRESHOLD`` (Ferry's default when unset)."""
    return tune_gc(settings)
