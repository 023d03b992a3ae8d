"""Past the start of post-copy the saga goes forward only: a failure then ends ``failed`` with
``postcopy_failed`` and the VM's state on each host, never a rollback (the sim driver's
``sim_fail="postcopy"`` switches to post-copy after one pass, then breaks the stream)."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.harness import Cluster


async def test_a_failure_after_postcopy_started_ends_failed_not_rolled_back(
    cluster: Cluster, spans: InMemorySpanExporter
) -> None:
    await cluster.create_vm("host-a", "vm1", memory_mib=256, sim_fail="postcopy")
    await cluster.send_events("vm1", 4)
    mid = await cluster.client.migrate("vm1", "host-b")
    outcome = await cluster.client.outcome(mid, timeout=60)

    assert (outcome.status, outcome.code) == ("failed", "postcopy_failed"), outcome
    assert outcome.detail["vm_state"]["host-a"] == "paused", outcome.detail
    rec = await cluster.client.migration(mid)
    assert rec is not None and rec["status"] == "failed" and rec["data"]["postcopy_started"] is True
    events = [(h["step"], h["event"]) for h in rec["history"]]
    assert ("migrate_vm", "postcopy_started") in events
    assert events.index(("migrate_vm", "postcopy_started")) < events.index(("migrate_vm", "failed"))
    assert not any(step == "compensate" for step, _ in events), events  # nothing pretended undone
    # the one status stream says the same: no rollback announced, no second outcome
    statuses = [e.status for e in cluster.client._history if e.migration_id == mid and e.status != "progress"]
    assert statuses[-1] == "failed" and "rolled_back" not in statuses, statuses
    # and the trace: the migration's root span carries it
    root = next(s for s in spans.get_finished_spans() if s.name == f"migration {mid}")
    assert root.attributes is not None and root.attributes.get("ferry.postcopy") is True
    assert root.attributes.get("ferry.outcome") == "failed"
    assert any(e.name == "postcopy_started" for e in root.events)
    # the VM is free for the operator's next move (the record is terminal)
    assert await cluster.coordinator.store.active_for_vm("vm1") is None
