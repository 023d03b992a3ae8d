"""One migration is one trace, completed or rolled back, also when every service is its own
process: the coordinator and the eight host services of the fault suite's process cluster (no
fault injected), each shipping its spans over RabbitMQ to the coordinator, which
``ferry trace`` then reads."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ferry_cli.render import render_trace
from ferry_common.bus import topology
from ferry_common.security import host_identity
from ferry_coordinator.saga import STEPS
from tests.faults.procs import ProcCluster, Session

pytestmark = pytest.mark.rabbitmq

# which host services a step asks, as "host/<host>/<service>" (the source is host-a)
UNDER = {
    "step admission": {"host/host-b/migration_policy"},
    "step freeze_events": {"host/host-a/sensor"},
    # the target's managed object and sensor answer forwarded requests: their spans are under
    # the source's handler spans, not the step's (each span's parent is checked in the trace)
    "step management_state": {"host/host-a/managed_object"},
    # the receiving VM and the VM's migration are launched beside step 3 (their own spans)
    "prepare incoming": {"host/host-b/hypervisor_adapter"},
    "launch migration": {"host/host-a/hypervisor_adapter"},
    "step migrate_vm": {"host/host-a/managed_object"},  # the dirty rounds
    # the guest confirmed on the target beside steps 2 and 4, taken at step 6b
    "finish incoming": {"host/host-b/hypervisor_adapter"},
    # sent when step 7 begins, beside it
    "source teardown": {"host/host-a/sensor", "host/host-a/managed_object", "host/host-a/hypervisor_adapter"},
}


@pytest.fixture
async def sess(procs: ProcCluster) -> AsyncIterator[Session]:
    s = await Session.open(procs.vhost)
    yield s
    await s.close()


def _shape(spans: list[dict[str, Any]], mid: str) -> list[str]:
    """What is still missing or wrong in the stored trace of ``mid`` (empty: complete)."""
    roots = [s for s in spans if s["name"] == f"migration {mid}"]
    if len(roots) != 1:
        return [f"{len(roots)} root spans"]
    root = roots[0]
    trace = [s for s in spans if s["trace_id"] == root["trace_id"]]
    ids = {s["span_id"] for s in trace}
    wrong = [f"{s['name']} [{s['service']}] is in another trace" for s in spans
             if s["trace_id"] != root["trace_id"] and s["name"] != "handle MigrateRequest"]
    # the context survived every hop: each span's parent is a span of this trace
    wrong += [f"{s['name']} [{s['service']}] has no parent in the trace" for s in trace
              if s is not root and s["parent_id"] not in ids]
    steps = {s["name"]: s for s in trace if s["parent_id"] == root["span_id"]}
    wrong += [f"no span for step {n} under the root" for n in STEPS if f"step {n}" not in steps]
    for name, services in UNDER.items():
        if name not in steps:
            continue
        under = {s["service"] for s in trace if s["parent_id"] == steps[name]["span_id"] and s["name"].startswith("handle ")}
        wrong += [f"no handler span of {svc} under {name}" for svc in sorted(services - under)]
    return wrong


HOST_SERVICES = {host_identity(h, svc) for h in ("host-a", "host-b") for svc in topology.HOST_SERVICES}


def _absent(spans: list[dict[str, Any]], mid: str) -> list[str]:
    """The host services with no span in the trace of ``mid`` yet."""
    root = next((s for s in spans if s["name"] == f"migration {mid}"), None)
    if root is None:
        return ["no root span"]
    present = {s["service"] for s in spans if s["trace_id"] == root["trace_id"]}
    return [f"no span of {svc}" for svc in sorted(HOST_SERVICES - present)]


async def _stored_trace(sess: Session, mid: str, problems: Callable[[list[dict[str, Any]]], list[str]],
                        timeout: float = 20.0) -> list[dict[str, Any]]:
    """The stored trace of ``mid`` once ``problems`` finds nothing wrong with it (each process
    ships its spans in batches, so the tree fills in over a moment); fails with what is still
    wrong after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        spans = await sess.client.trace(mid)
        wrong = problems(spans)
        if not wrong:
            return spans
        assert time.monotonic() < deadline, wrong
        await asyncio.sleep(0.3)


async def test_one_migration_is_one_trace_across_processes(procs: ProcCluster, sess: Session) -> None:
    vm = f"vm-trace-{uuid.uuid4().hex[:6]}"
    await sess.create_vm(vm, "host-a", sim_bandwidth_mibps=512)
    await sess.send_events(vm, 5)
    mid = await sess.client.migrate(vm, "host-b")
    rec = await sess.outcome(mid, timeout=60)
    assert rec["status"] == "completed", rec["data"].get("reason")

    # spans are shipped in batches by each process: wait until the tree is whole and every
    # process's spans are in (the source's policy service takes part last: it handles the
    # inventory its adapter publishes at teardown, and may ship that span a moment later)
    spans = await _stored_trace(sess, mid, lambda got: _shape(got, mid) + _absent(got, mid))

    root = next(s for s in spans if s["name"] == f"migration {mid}")
    assert root["service"] == "coordinator" and root["attributes"]["ferry.outcome"] == "completed"
    assert root["attributes"]["ferry.vm_id"] == vm and root["attributes"]["ferry.target_host"] == "host-b"
    # every span of the trace carries its migration, so a backend filters on it
    assert all(s["attributes"].get("ferry.migration_id") == mid for s in spans), [
        s["name"] for s in spans if s["attributes"].get("ferry.migration_id") != mid
    ]
    services = {s["service"] for s in spans if s["trace_id"] == root["trace_id"]}
    # every process took part: the coordinator and the four services of both hosts
    assert services >= HOST_SERVICES
    for s in spans:
        assert s["end"] >= s["start"] > 0, s
    text = render_trace(spans)
    assert f"migration {mid}" in text and "[host/host-b/migration_policy]" in text


async def test_a_rolled_back_migration_is_one_trace_across_processes(procs: ProcCluster, sess: Session) -> None:
    """The hypervisor fails the migration: the failed step and the compensation, with the
    clean-up handlers of both hosts under it, are in the same trace."""
    vm = f"vm-trace-{uuid.uuid4().hex[:6]}"
    await sess.create_vm(vm, "host-a", sim_bandwidth_mibps=512, sim_fail="migrate")
    await sess.send_events(vm, 5)
    mid = await sess.client.migrate(vm, "host-b")
    rec = await sess.outcome(mid, timeout=60)
    assert rec["status"] == "rolled_back", rec["data"].get("reason")

    def compensated(spans: list[dict[str, Any]]) -> list[str]:
        root = next((s for s in spans if s["name"] == f"migration {mid}"), None)
        if root is None:
            return ["no root span"]
        trace = [s for s in spans if s["trace_id"] == root["trace_id"]]
        ids = {s["span_id"] for s in trace}
        wrong = [f"{s['name']} [{s['service']}] has no parent in the trace" for s in trace
                 if s is not root and s["parent_id"] not in ids]
        comp = [s for s in trace if s["name"] == "compensate" and s["parent_id"] == root["span_id"]]
        if len(comp) != 1:
            return [*wrong, f"{len(comp)} compensate spans under the root"]
        cleanup = {s["service"] for s in trace if s["parent_id"] == comp[0]["span_id"] and s["name"].startswith("handle ")}
        want = {"host/host-a/sensor", "host/host-a/managed_object", "host/host-a/hypervisor_adapter",
                "host/host-b/sensor", "host/host-b/managed_object", "host/host-b/hypervisor_adapter"}
        return wrong + [f"no clean-up handler of {svc} under compensate" for svc in sorted(want - cleanup)]

    spans = await _stored_trace(sess, mid, compensated)
    root = next(s for s in spans if s["name"] == f"migration {mid}")
    assert root["status"] == "ERROR" and root["attributes"]["ferry.outcome"] == "rolled_back"
    failed = [s["name"] for s in spans if s["name"].startswith("step ") and s["status"] == "ERROR"]
    assert failed == ["step migrate_vm"], failed
    assert any("compensation" in e for s in spans if s["name"] == "compensate" for e in s["events"])
