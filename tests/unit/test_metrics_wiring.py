"""The fleet metrics are fed by the code paths they describe: after one completed migration
the registry (what ``/metrics`` serves) shows its outcome, duration, step timings, downtime
and the messages the services handled."""

from __future__ import annotations

from ferry_common import metrics
from ferry_coordinator.saga import STEPS
from tests.harness import make_cluster
from tests.harness import metric_sample as sample


async def test_completed_migration_shows_in_the_registry() -> None:
    before = metrics.REGISTRY.render()
    c = await make_cluster("memory", ("host-a", "host-b"))
    try:
        await c.create_vm("host-a", "vm1")
        await c.send_events("vm1", 4)
        outcome = await c.migrate("vm1", "host-b")
        assert outcome.status == "completed", outcome
        await c.coordinator.wait_idle()  # the metrics are taken when the saga ends
    finally:
        await c.close()
    after = metrics.REGISTRY.render()

    def grew(name: str, labels: str = "") -> float:
        return sample(after, name, labels) - sample(before, name, labels)

    assert grew("ferry_migrations_total", '{outcome="completed"}') == 1
    assert grew("ferry_migration_duration_seconds_count") == 1
    assert grew("ferry_migration_duration_seconds_sum") > 0
    for step in STEPS:
        assert grew("ferry_migration_step_seconds_count", f'{{step="{step}"}}') == 1, step
    assert grew("ferry_vm_downtime_seconds_count") == 1
    for service in ("coordinator", "sensor", "managed_object", "migration_policy", "hypervisor_adapter"):
        assert grew("ferry_messages_handled_total", f'{{service="{service}"}}') > 0, service
    assert "# TYPE ferry_queued_events gauge" in after
    assert "# TYPE ferry_messages_dead_lettered_total counter" in after


def test_rejection_counts() -> None:
    before = sample(metrics.REGISTRY.render(), "ferry_migrations_total", '{outcome="rejected"}')
    from ferry_coordinator import observe

    observe.migration_rejected()
    assert sample(metrics.REGISTRY.render(), "ferry_migrations_total", '{outcome="rejected"}') == before + 1
