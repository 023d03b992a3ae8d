"""A minimal, dependency-free metrics registry rendering the Prometheus text format (0.0.4).

Counters, gauges and histograms, each optionally labelled. Thread-safe (drivers may update
metrics from worker threads). The metrics a fleet operator expects are predefined on the
default :data:`REGISTRY`::

    from ferry_common import metrics

    metrics.MIGRATIONS_TOTAL.labels(outcome="completed").inc()
    metrics.MIGRATION_STEP_SECONDS.labels(step="precopy").observe(3.2)
    with metrics.MIGRATION_DURATION_SECONDS.time():
        ...
    metrics.QUEUED_EVENTS.labels(host="host-a").set(12)
    metrics.MESSAGES_HANDLED_TOTAL.labels(service="sensor").inc()

:func:`ferry_common.health.HealthServer` serves ``REGISTRY.render()`` on ``GET /metrics``.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Generic, TypeVar

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

#: The ``Content-Type`` of :meth:`Registry.render` output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: prometheus_client's default buckets (seconds).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _format_value(value: float) -> str:
    """Render a sample value the way Prometheus expects (``+Inf``, ``NaN``, integers bare)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _render_labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{name}="{_escape_label_value(value)}"' for name, value in pairs)
    return "{" + inner + "}"


class _CounterChild:
    """One labelled series of a :class:`Counter`."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (must be >= 0)."""
        if amount < 0:
            raise ValueError("a counter can only increase")
        with self._lock:
            self.value += amount


class _GaugeChild:
    """One labelled series of a :class:`Gauge`."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.value = 0.0

    def set(self, value: float) -> None:
        """Set the gauge to ``value``."""
        with self._lock:
            self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (may be negative)."""
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Subtract ``amount``."""
        with self._lock:
            self.value -= amount


class _HistogramChild:
    """One labelled series of a :class:`Histogram`."""

    def __init__(self, lock: threading.Lock, buckets: tuple[float, ...]) -> None:
        self._lock = lock
        self._buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative; last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        with self._lock:
            self.sum += value
            self.count += 1
            for i, bound in enumerate(self._buckets):
                if value <= bound:
                    self.counts[i] += 1
                    break

    @contextmanager
    def time(self) -> Iterator[None]:
        """Observe the wall-clock seconds the ``with`` block takes."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - start)


Child = TypeVar("Child", _CounterChild, _GaugeChild, _HistogramChild)


class _Metric(Generic[Child]):
    """Common part of a metric family: name, help, label names and its labelled children."""

    type_name = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for {name}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names for {name}")
        self.name = name
        self.documentation = documentation
        self.labelnames: tuple[str, ...] = tuple(labelnames)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], Child] = {}

    def _new_child(self) -> Child:
        raise NotImplementedError

    def labels(self, *values: str, **kwargs: str) -> Child:
        """The series for these label values (by position or by name, not both)."""
        if values and kwargs:
            raise ValueError("pass label values by position or by name, not both")
        if kwargs:
            if set(kwargs) != set(self.labelnames):
                raise ValueError(
                    f"{self.name} takes labels {list(self.labelnames)}, got {sorted(kwargs)}"
                )
            key = tuple(str(kwargs[label]) for label in self.labelnames)
        else:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {list(self.labelnames)}")
            key = tuple(str(v) for v in values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def _unlabelled(self) -> Child:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {list(self.labelnames)}: use .labels()")
        return self.labels()

    def clear(self) -> None:
        """Drop every labelled series (e.g. a host that left the fleet)."""
        with self._lock:
            self._children.clear()

    def _series(self) -> list[tuple[tuple[tuple[str, str], ...], Child]]:
        with self._lock:
            items = sorted(self._children.items())
        return [(tuple(zip(self.labelnames, key, strict=True)), child) for key, child in items]

    def _samples(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> str:
        """This family in the text exposition format (HELP, TYPE, samples)."""
        lines = [
            f"# HELP {self.name} {_escape_help(self.documentation)}",
            f"# TYPE {self.name} {self.type_name}",
        ]
        lines.extend(self._samples())
        return "\n".join(lines) + "\n"


class Counter(_Metric[_CounterChild]):
    """A monotonically increasing count. By convention the name ends in ``_total``."""

    type_name = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        if not self.labelnames:
            self.labels()  # an unlabelled counter is exported as 0 from the start

    def _new_child(self) -> _CounterChild:
        return _CounterChild(threading.Lock())

    def inc(self, amount: float = 1.0) -> None:
        """Increment an unlabelled counter."""
        self._unlabelled().inc(amount)

    def _samples(self) -> list[str]:
        return [
            f"{self.name}{_render_labels(labels)} {_format_value(child.value)}"
            for labels, child in self._series()
        ]


class Gauge(_Metric[_GaugeChild]):
    """A value that goes up and down."""

    type_name = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        if not self.labelnames:
            self.labels()

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild(threading.Lock())

    def set(self, value: float) -> None:
        """Set an unlabelled gauge."""
        self._unlabelled().set(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add to an unlabelled gauge."""
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        """Subtract from an unlabelled gauge."""
        self._unlabelled().dec(amount)

    def _samples(self) -> list[str]:
        return [
            f"{self.name}{_render_labels(labels)} {_format_value(child.value)}"
            for labels, child in self._series()
        ]


class Histogram(_Metric[_HistogramChild]):
    """Observations counted into cumulative buckets, with their sum and count."""

    type_name = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        if "le" in labelnames:
            raise ValueError("'le' is reserved for histogram buckets")
        super().__init__(name, documentation, labelnames)
        bounds = sorted(float(b) for b in buckets)
        if not bounds:
            raise ValueError("a histogram needs at least one bucket")
        if len(set(bounds)) != len(bounds):
            raise ValueError("duplicate histogram buckets")
        if not math.isinf(bounds[-1]):
            bounds.append(math.inf)
        self.buckets: tuple[float, ...] = tuple(bounds)
        if not self.labelnames:
            self.labels()

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(threading.Lock(), self.buckets)

    def observe(self, value: float) -> None:
        """Observe into an unlabelled histogram."""
        self._unlabelled().observe(value)

    def time(self) -> AbstractContextManager[None]:
        """Time a ``with`` block into an unlabelled histogram."""
        return self._unlabelled().time()

    def _samples(self) -> list[str]:
        lines: list[str] = []
        for labels, child in self._series():
            with child._lock:
                counts = list(child.counts)
                total, count = child.sum, child.count
            cumulative = 0
            for bound, n in zip(self.buckets, counts, strict=True):
                cumulative += n
                le = (("le", _format_value(bound) if math.isinf(bound) else repr(bound)),)
                lines.append(
                    f"{self.name}_bucket{_render_labels(labels + le)} {_format_value(cumulative)}"
                )
            lines.append(f"{self.name}_sum{_render_labels(labels)} {_format_value(total)}")
            lines.append(f"{self.name}_count{_render_labels(labels)} {_format_value(count)}")
        return lines


M = TypeVar("M", Counter, Gauge, Histogram)
AnyMetric = Counter | Gauge | Histogram


class Registry:
    """A set of uniquely named metric families, rendered together."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, AnyMetric] = {}

    def register(self, metric: M) -> M:
        """Add ``metric``; a second family with the same name is an error."""
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} already registered")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """Create and register a :class:`Counter`."""
        return self.register(Counter(name, documentation, labelnames))

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Create and register a :class:`Gauge`."""
        return self.register(Gauge(name, documentation, labelnames))

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """Create and register a :class:`Histogram`."""
        return self.register(Histogram(name, documentation, labelnames, buckets))

    def get(self, name: str) -> Counter | Gauge | Histogram | None:
        """The family registered under ``name``, if any."""
        with self._lock:
            return self._metrics.get(name)

    def render(self) -> str:
        """Every family in the Prometheus text exposition format, sorted by name."""
        with self._lock:
            metrics = sorted(self._metrics.values(), key=lambda m: m.name)
        return "".join(m.render() for m in metrics)


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
