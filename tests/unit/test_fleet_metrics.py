"""The fleet metrics: what they report, and that the alerting rules name only metrics that exist."""

from __future__ import annotations

import re
from pathlib import Path

from ferry_common import metrics
from ferry_coordinator.fleet import metrics as fleet_metrics
from ferry_coordinator.fleet.queue import Decision, Limits, Reason, new_entry

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "ferry-alerts.yaml"


def _sample(name: str, **labels: str) -> float | None:
    """The sample of ``name`` with exactly these labels, in whatever order they are rendered."""
    for line in metrics.REGISTRY.render().splitlines():
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        found = dict(pair.split("=", 1) for pair in rest.rstrip("}").split(",") if pair)
        if {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    return None


def test_every_metric_the_alerts_use_is_exported() -> None:
    text = "\n".join(line for line in RULES.read_text().splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\b(ferry_[a-z_]+)\b", text))
    assert used, "no metric found in the rules"
    families = {line.split()[2] for line in metrics.REGISTRY.render().splitlines() if line.startswith("# TYPE")}
    # a counter's family is exported under its own name (ferry_migrations_total)
    assert used <= families, used - families


def test_queue_depth_and_oldest_wait_by_reason() -> None:
    a = new_entry("m-1", "vm-1", "h1", ["h2"], now=100.0)
    b = new_entry("m-2", "vm-2", "h1", ["h3"], now=40.0)
    c = new_entry("m-3", "vm-3", "h4", ["h5"], now=90.0)
    fleet_metrics.observe_queue(
        [Decision(a, Reason.SOURCE_OUTBOUND), Decision(b, Reason.SOURCE_OUTBOUND), Decision(c, None, "h5")], now=160.0
    )
    assert _sample("ferry_fleet_queue_depth", reason="source_outbound") == 2
    assert _sample("ferry_fleet_queue_depth", reason="cluster_limit") == 0
    assert _sample("ferry_fleet_queue_depth", reason="none") == 1
    assert _sample("ferry_fleet_queue_oldest_seconds", reason="source_outbound") == 120


def test_slots_host_readiness_and_drain_progress() -> None:
    e = new_entry("m-1", "vm-1", "h1", ["h2"], now=1.0).started("h2", "r1", 2.0)
    fleet_metrics.observe_slots([e], Limits(cluster=7))
    assert _sample("ferry_fleet_slots_in_use") == 1
    assert _sample("ferry_fleet_slot_limit", kind="cluster") == 7
    assert _sample("ferry_fleet_host_migrations", host="h2", direction="inbound") == 1
    fleet_metrics.observe_host_ready("h9", False)
    assert _sample("ferry_fleet_host_ready", host="h9") == 0
    fleet_metrics.observe_drain("h1", {"total": 10, "done": 6, "failed": 1, "in_flight": 2, "queued": 1})
    assert _sample("ferry_fleet_drain_remaining", host="h1") == 3
    assert _sample("ferry_fleet_drain_vms", host="h1", state="failed") == 1
