"""What the coordinator exports about the fleet, on the process's ``/metrics``.

The names here are the ones ``deploy/prometheus/ferry-alerts.yaml`` alerts on; the functions
turn what the store and the liveness tracker say into samples, so the coordinator calls one
function per source of truth instead of setting gauges here and there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from ferry_common import metrics as metrics

from .queue import Decision, EntryState, Limits, QueueEntry, Reason


def _gauge(name: str, documentation: str, *labels: str) -> metrics.Gauge:
    return metrics.REGISTRY.gauge(name, documentation, labels)


QUEUE_DEPTH = _gauge(
    "ferry_fleet_queue_depth",
    "Migrations queued, by what holds them (cluster_limit, source_outbound, target_inbound, "
    "no_capacity, policy_blocked, automatic_limit, awaiting_inventory; 'none' for those about to start).",
    "reason",
)
QUEUE_OLDEST_SECONDS = _gauge(
    "ferry_fleet_queue_oldest_seconds",
    "Seconds the longest-waiting queued migration has waited, by what holds it.",
    "reason",
)
SLOTS_IN_USE = _gauge("ferry_fleet_slots_in_use", "Migrations holding a slot (in flight), cluster-wide.")
SLOT_LIMIT = _gauge(
    "ferry_fleet_slot_limit", "The limits in force: cluster, outbound_per_host, inbound_per_host, automatic.", "kind"
)
HOST_MIGRATIONS = _gauge(
    "ferry_fleet_host_migrations", "Migrations in flight per host, by direction (outbound, inbound).", "host", "direction"
)
HOST_READY = _gauge(
    "ferry_fleet_host_ready", "1 while the host's heartbeats arrive within their bound, 0 once it is marked not ready.", "host"
)
DRAIN_VMS = _gauge(
    "ferry_fleet_drain_vms", "VMs of a host's drain by state (total, done, failed, in_flight, queued).", "host", "state"
)
DRAIN_REMAINING = _gauge(
    "ferry_fleet_drain_remaining", "VMs still to leave a draining host (0 once drained or when no drain runs).", "host"
)

REASONS = tuple(r.value for r in Reason)
LIMIT_KINDS = ("cluster", "outbound_per_host", "inbound_per_host", "automatic")
DRAIN_STATES = ("total", "done", "failed", "in_flight", "queued")


def observe_queue(decisions: Iterable[Decision], now: float) -> None:
    """Queue depth and oldest wait by reason, from the store's ``explain``."""
    depth: Counter[str] = Counter()
    oldest: dict[str, float] = {}
    for d in decisions:
        key = d.reason.value if d.reason is not None else "none"
        depth[key] += 1
        oldest[key] = max(oldest.get(key, 0.0), now - d.entry.enqueued_at)
    for key in (*REASONS, "none"):  # every reason present, 0 when empty: alerts see a series
        QUEUE_DEPTH.labels(reason=key).set(depth[key])
        QUEUE_OLDEST_SECONDS.labels(reason=key).set(oldest.get(key, 0.0))


def observe_slots(started: Iterable[QueueEntry], limits: Limits) -> None:
    """Slots in use, cluster-wide and per host, and the limits in force."""
    held = [e for e in started if e.state is EntryState.STARTED]
    SLOTS_IN_USE.set(len(held))
    for kind in LIMIT_KINDS:
        SLOT_LIMIT.labels(kind=kind).set(getattr(limits, kind))
    HOST_MIGRATIONS.clear()
    by_direction = {
        "outbound": Counter(e.source_host for e in held),
        "inbound": Counter(e.target_host or "?" for e in held),
    }
    for direction, counts in by_direction.items():
        for host, count in counts.items():
            HOST_MIGRATIONS.labels(host=host, direction=direction).set(count)


def observe_host_ready(host: str, ready: bool) -> None:
    """A liveness tracker listener: ``LivenessTracker(on_change=observe_host_ready)``."""
    HOST_READY.labels(host=host).set(1 if ready else 0)


def observe_drain(host: str, counts: Mapping[str, int]) -> None:
    """A drain's progress (``counts`` by state, see DRAIN_STATES)."""
    for state in DRAIN_STATES:
        DRAIN_VMS.labels(host=host, state=state).set(counts.get(state, 0))
    # still to leave: queued or in flight; a VM left behind (unmovable) or cancelled is not, so
    # an ended drain reads 0 and the "drain not progressing" alert does not fire for it
    if "in_flight" in counts or "queued" in counts:
        remaining = counts.get("in_flight", 0) + counts.get("queued", 0)
    else:
        remaining = counts.get("total", 0) - counts.get("done", 0) - counts.get("failed", 0)
    DRAIN_REMAINING.labels(host=host).set(max(0, remaining))
