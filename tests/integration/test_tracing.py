"""One migration is one trace: its shape across services, on both buses, and ``ferry trace``.

The process has one ``TracerProvider`` (the harness installs it through ``setup_tracing``);
these tests add an in-memory exporter to it once and clear it per test.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from ferry_cli.render import render_trace
from ferry_common.tracing import installed
from ferry_coordinator.saga import STEPS
from tests.harness import Cluster, until


def hexid(n: int, width: int) -> str:
    return format(n, f"0{width}x")


def trace_of(exporter: InMemorySpanExporter, mid: str) -> tuple[ReadableSpan, list[ReadableSpan]]:
    finished = exporter.get_finished_spans()
    roots = [s for s in finished if s.name == f"migration {mid}"]
    assert len(roots) == 1, [s.name for s in finished]
    root = roots[0]
    assert root.context is not None
    mine = [s for s in finished if s.context is not None and s.context.trace_id == root.context.trace_id]
    return root, mine


async def wait_root(exporter: InMemorySpanExporter, mid: str) -> None:
    # the client hears the outcome from inside the saga: the root span ends just after
    async def ended() -> bool:
        return any(s.name == f"migration {mid}" for s in exporter.get_finished_spans())

    await until(ended, 10.0, f"the root span of {mid}")


def check_common(cluster: Cluster, mid: str, root: ReadableSpan, trace: list[ReadableSpan]) -> None:
    by_id = {s.context.span_id: s for s in trace if s.context is not None}
    # the root starts a trace of its own and keeps a link to the request that asked for it
    assert root.parent is None
    assert len(root.links) == 1 and root.links[0].context.trace_id != root.context.trace_id  # type: ignore[union-attr]
    attrs = root.attributes or {}
    assert attrs["ferry.migration_id"] == mid
    assert attrs["ferry.vm_id"] == "vm1"
    assert attrs["ferry.source_host"] == "host-a" and attrs["ferry.target_host"] == "host-b"
    assert "ferry.outcome" in attrs and "ferry.retry_count" in attrs
    # context survived every hop: no span points at a parent outside the trace
    orphans = [s.name for s in trace if s is not root and (s.parent is None or s.parent.span_id not in by_id)]
    assert not orphans, orphans
    # every span of the trace knows its migration (attribute or baggage), so backends filter on it
    strangers = [s.name for s in trace if (s.attributes or {}).get("ferry.migration_id") != mid]
    assert not strangers, strangers


async def checked_trace(
    cluster: Cluster, exporter: InMemorySpanExporter, mid: str
) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The migration's root span and its trace, once the root ended, with what every trace
    must show checked (:func:`check_common`)."""
    await wait_root(exporter, mid)
    root, trace = trace_of(exporter, mid)
    check_common(cluster, mid, root, trace)
    return root, trace


async def stored_trace(cluster: Cluster, mid: str, root: ReadableSpan) -> list[dict[str, Any]]:
    tracing = installed()
    assert tracing is not None and tracing.bus_exporter is not None
    root_id = hexid(root.context.span_id, 16)  # type: ignore[union-attr]

    async def shipped() -> bool:
        await tracing.bus_exporter.flush()  # type: ignore[union-attr]
        return any(s["span_id"] == root_id for s in await cluster.client.trace(mid))

    await until(shipped, 10.0, f"the spans of {mid} to reach the coordinator's store")
    return await cluster.client.trace(mid)


async def test_completed_migration_is_one_trace(cluster: Cluster, spans: InMemorySpanExporter) -> None:
    await cluster.create_vm("host-a", "vm1")
    await cluster.send_events("vm1", 5)
    outcome = await cluster.migrate("vm1", "host-b")
    assert outcome.status == "completed", outcome
    mid = outcome.migration_id
    root, trace = await checked_trace(cluster, spans, mid)
    assert (root.attributes or {})["ferry.outcome"] == "completed"
    assert root.status.status_code != StatusCode.ERROR

    rec = await cluster.store.get(mid)
    assert rec is not None and rec.data["trace_id"] == hexid(root.context.trace_id, 32)  # type: ignore[union-attr]

    children = [s for s in trace if s.parent is not None and s.parent.span_id == root.context.span_id]  # type: ignore[union-attr]
    steps = [s for s in children if s.name.startswith("step ")]
    # the receiving VM is started and the VM's migration launched beside step 3, the guest
    # confirmed on the target beside steps 2 and 4, and the source torn down beside step 7,
    # each in a span of its own under the root
    names = ("prepare incoming", "launch migration", "finish incoming", "source teardown")
    beside = [s for s in children if s.name in names]
    assert sorted(s.name for s in beside) == sorted(names)
    assert len(children) == len(steps) + len(names), [s.name for s in children]
    assert [s.name for s in sorted(steps, key=lambda s: s.start_time or 0)] == [f"step {n}" for n in STEPS]
    for s in steps:
        a = s.attributes or {}
        assert a["ferry.step"] == s.name.removeprefix("step ")
        assert a["ferry.outcome"] == "succeeded" and a["ferry.retry_count"] == 0
        assert s.status.status_code != StatusCode.ERROR

    # the handlers on both hosts nest under the step that asked them
    step_of = {s.context.span_id: s.name for s in [*steps, *beside]}  # type: ignore[union-attr]
    handlers = [s for s in trace if s.name.startswith("handle ")]
    under: dict[str, set[str]] = {}
    for h in handlers:
        assert h.parent is not None
        service = str((h.attributes or {})["ferry.service"])
        if h.parent.span_id in step_of and service.startswith("host/"):  # clients follow too
            under.setdefault(step_of[h.parent.span_id], set()).add(str((h.attributes or {})["ferry.service"]))
    assert under["step admission"] == {"host/host-b/migration_policy"}
    # the source freezes, and the target's sensor takes the events' key beside it
    assert under["step freeze_events"] == {"host/host-a/sensor", "host/host-b/sensor"}
    assert "host/host-a/managed_object" in under["step management_state"]
    # steps 3, 4 and 6 go host to host, and step 7 from the target's managed object to its
    # sensor: the handler that answers is under the one that forwarded
    by_id = {s.context.span_id: s for s in trace}  # type: ignore[union-attr]
    for forwarded, target_service, forwarders in (
        # the target lacks the VM's modules: it asks the source, which sends the graph again
        ("handle ManagementState", "host/host-b/managed_object", {"handle ExportManagementState", "handle FetchModules"}),
        ("handle FetchModules", "host/host-a/managed_object", {"handle ManagementState"}),
        ("handle ManagementEventState", "host/host-b/sensor", {"handle SendEventState"}),
    ):
        spans_of = [h for h in handlers if h.name == forwarded]
        assert spans_of and all((h.attributes or {})["ferry.service"] == target_service for h in spans_of)
        parents = {by_id[h.parent.span_id].name for h in spans_of if h.parent is not None}
        assert parents == forwarders, parents
    # the target's managed object and sensor are told at once, not one through the other
    assert under["step complete"] == {"host/host-b/managed_object", "host/host-b/sensor", "host/host-b/migration_policy"}
    assert under["prepare incoming"] == {"host/host-b/hypervisor_adapter"}
    assert under["launch migration"] == {"host/host-a/hypervisor_adapter"}
    assert under["finish incoming"] == {"host/host-b/hypervisor_adapter"}
    assert "step switch_over" not in under  # it takes the answer FinishIncoming got beside steps 2 and 4
    assert under["source teardown"] == {"host/host-a/sensor", "host/host-a/managed_object", "host/host-a/hypervisor_adapter"}

    # the hypervisor's background migration and its finish notice belong to the trace too
    hv = [s for s in trace if s.name == "hypervisor migrate vm1"]
    assert len(hv) == 1 and (hv[0].attributes or {})["ferry.outcome"] == "completed"
    finished = [s for s in handlers if s.name == "handle VmMigrationFinished"]
    assert finished and all(s.parent is not None and s.parent.span_id == hv[0].context.span_id for s in finished)  # type: ignore[union-attr]

    # shipped over the bus, stored by the coordinator, rendered by ``ferry trace``
    stored = await stored_trace(cluster, mid, root)
    # the migration's trace, and the request's handler span that the root links to
    request_trace = hexid(root.links[0].context.trace_id, 32)
    assert {s["trace_id"] for s in stored} == {hexid(root.context.trace_id, 32), request_trace}  # type: ignore[union-attr]
    assert [s["name"] for s in stored if s["trace_id"] == request_trace] == ["handle MigrateRequest"]
    assert {s["span_id"] for s in stored} >= {hexid(s.context.span_id, 16) for s in steps}  # type: ignore[union-attr]
    recorded = next(s for s in stored if s["span_id"] == hexid(root.context.span_id, 16))  # type: ignore[union-attr]
    assert recorded["start"] == (root.start_time or 0) / 1e9 and recorded["end"] == (root.end_time or 0) / 1e9
    text = render_trace(stored)
    lines = text.splitlines()
    assert lines[0].startswith("handle MigrateRequest  ")
    assert lines[1].startswith(f"migration {mid}  ") and "[coordinator]" in lines[1]
    for name in STEPS:
        assert any(line.startswith(f"  step {name}  ") for line in lines), name
    assert any(line.startswith("    handle StartMigration") and "[host/host-b/migration_policy]" in line for line in lines)
    assert not any("telemetry" in line or "SpanBatch" in line for line in lines)


async def test_rolled_back_migration_trace(cluster: Cluster, spans: InMemorySpanExporter) -> None:
    # the target's sensor refuses the staged events: step 4 fails, the saga rolls back
    await cluster.create_vm("host-a", "vm1")
    target = cluster.host("host-b")
    await target.stop(("hypervisor_adapter",))
    outcome = await cluster.migrate("vm1", "host-b")
    assert outcome.status == "rolled_back", outcome
    mid = outcome.migration_id
    root, trace = await checked_trace(cluster, spans, mid)
    attrs = root.attributes or {}
    assert attrs["ferry.outcome"] == "rolled_back"
    assert root.status.status_code == StatusCode.ERROR and root.status.description

    failed = [s for s in trace if s.name.startswith("step ") and s.status.status_code == StatusCode.ERROR]
    assert [s.name for s in failed] == ["step migrate_vm"]
    assert failed[0].status.description and "hypervisor_adapter" in failed[0].status.description
    assert any(e.name == "timeout" for e in failed[0].events)

    comp = [s for s in trace if s.name == "compensate"]
    assert len(comp) == 1 and comp[0].parent is not None
    assert comp[0].parent.span_id == root.context.span_id  # type: ignore[union-attr]
    assert any(e.name == "compensation" for e in comp[0].events)
    cleanup = {str((s.attributes or {})["ferry.service"]) for s in trace
               if s.parent is not None and s.parent.span_id == comp[0].context.span_id}  # type: ignore[union-attr]
    assert {"host/host-a/sensor", "host/host-a/managed_object", "host/host-b/sensor"} <= cleanup

    stored = await stored_trace(cluster, mid, root)
    text = render_trace(stored)
    assert "ERROR" in text.splitlines()[1]
    assert "! compensation" in text


def test_nothing_is_installed_without_otel_or_collection() -> None:
    from ferry_common.tracing import BusSpanExporter, build_tracing

    off = build_tracing("x", bus_exporter=BusSpanExporter(), env={"FERRY_TRACE_COLLECT": "0"})
    assert off.provider is None and off.bus_exporter is None and not off.otlp
    assert build_tracing("x", env={}).provider is None
    assert build_tracing("x", env={"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://j:4318"}).provider is None
    assert build_tracing("x", bus_exporter=BusSpanExporter(), env={"OTEL_SDK_DISABLED": "true"}).provider is None


def test_otlp_when_the_standard_variables_say_so() -> None:
    from ferry_common.tracing import build_tracing

    for env in ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}, {"OTEL_TRACES_EXPORTER": "otlp"}):
        t = build_tracing("ferry-x", env=env)
        assert t.otlp and t.provider is not None and t.bus_exporter is None
        assert t.provider.resource.attributes["service.name"] == "ferry-x"
        t.provider.shutdown()
