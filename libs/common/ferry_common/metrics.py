"""The fleet's Prometheus metrics, kept by ``prometheus_client``.

The metrics a fleet operator expects are predefined on the process-wide :data:`REGISTRY`::

    from ferry_common import metrics

    metrics.MIGRATIONS_TOTAL.labels(outcome="completed").inc()
    metrics.MIGRATION_STEP_SECONDS.labels(step="precopy").observe(3.2)
    with metrics.MIGRATION_DURATION_SECONDS.time():
        ...
    metrics.QUEUED_EVENTS.labels(host="host-a").set(12)
    metrics.MESSAGES_HANDLED_TOTAL.labels(service="sensor").inc()

:class:`Registry` is a thin, named front of a ``prometheus_client.CollectorRegistry``: it
makes the families, finds them again by name and renders the text exposition (0.0.4) that
:class:`ferry_common.health.HealthServer` serves on ``GET /metrics``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "REGISTRY",
    "DEFAULT_BUCKETS",
    "MIGRATIONS_TOTAL",
    "MIGRATION_STEP_SECONDS",
    "MIGRATION_DURATION_SECONDS",
    "QUEUED_EVENTS",
    "VM_DOWNTIME_SECONDS",
    "MESSAGES_DEAD_LETTERED_TOTAL",
    "MESSAGES_HANDLED_TOTAL",
]

# the families are exported as they always were: no extra ``*_created`` series beside them
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

#: The ``Content-Type`` of :meth:`Registry.render` output.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: prometheus_client's default buckets (seconds), without the implicit +Inf.
DEFAULT_BUCKETS: tuple[float, ...] = tuple(b for b in Histogram.DEFAULT_BUCKETS if b != float("inf"))

M = TypeVar("M", Counter, Gauge, Histogram)

# prometheus_client also takes UTF-8 names; the fleet keeps to the classic ones that every
# scraper and the 0.0.4 text format read unquoted
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _classic(name: str, labelnames: Sequence[str]) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}")
    for label in labelnames:
        if not _LABEL.fullmatch(label):
            raise ValueError(f"invalid label name {label!r} for {name}")


class Registry:
    """A set of uniquely named metric families, rendered together (Prometheus text 0.0.4)."""

    def __init__(self) -> None:
        self.collectors = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._by_name: dict[str, Counter | Gauge | Histogram] = {}

    def _keep(self, name: str, metric: M) -> M:
        with self._lock:
            self._by_name[name] = metric
        return metric

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """Create and register a :class:`Counter` (a second family of the same name is an error)."""
        _classic(name, labelnames)
        return self._keep(name, Counter(name, documentation, labelnames, registry=self.collectors))

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Create and register a :class:`Gauge`."""
        _classic(name, labelnames)
        return self._keep(name, Gauge(name, documentation, labelnames, registry=self.collectors))

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """Create and register a :class:`Histogram` (+Inf is added to ``buckets``)."""
        _classic(name, labelnames)
        return self._keep(
            name,
            Histogram(name, documentation, labelnames, registry=self.collectors, buckets=buckets),
        )

    def get(self, name: str) -> Counter | Gauge | Histogram | None:
        """The family registered under ``name``, if any."""
        with self._lock:
            return self._by_name.get(name)

    def render(self) -> str:
        """Every family in the Prometheus text exposition format."""
        return generate_latest(self.collectors).decode("utf-8")


#: The process-wide registry that ``/metrics`` serves.
REGISTRY = Registry()

MIGRATIONS_TOTAL = REGISTRY.counter(
    "ferry_migrations_total",
    "Migrations finished, by outcome (completed, rolled_back, rejected, failed).",
    ["outcome"],
)
MIGRATION_STEP_SECONDS = REGISTRY.histogram(
    "ferry_migration_step_seconds",
    "Seconds spent in each saga step of a migration.",
    ["step"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
MIGRATION_DURATION_SECONDS = REGISTRY.histogram(
    "ferry_migration_duration_seconds",
    "Seconds from MigrateRequest to the migration's final outcome.",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
QUEUED_EVENTS = REGISTRY.gauge(
    "ferry_queued_events",
    "Service-plane events held back (queued) on a host while a VM's plane moves.",
    ["host"],
)
VM_DOWNTIME_SECONDS = REGISTRY.histogram(
    "ferry_vm_downtime_seconds",
    "Seconds a VM was paused during switch-over.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
MESSAGES_DEAD_LETTERED_TOTAL = REGISTRY.counter(
    "ferry_messages_dead_lettered_total",
    "Messages a service refused and dead-lettered, by service and error code.",
    ["service", "code"],
)
AMQP_PUBLISHED_TOTAL = REGISTRY.counter(
    "ferry_amqp_published_total",
    "AMQP messages this process published (a batch of coalesced messages counts once).",
)
AMQP_COALESCED_TOTAL = REGISTRY.counter(
    "ferry_amqp_coalesced_total",
    "Messages this process sent inside batches of coalesced messages.",
)
MESSAGES_HANDLED_TOTAL = REGISTRY.counter(
    "ferry_messages_handled_total",
    "Messages a service handled successfully.",
    ["service"],
)
