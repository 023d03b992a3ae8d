"""The verdict on a migration: what must hold on every host afterwards.

Works on what the services report over the bus (``Inspect``), so the demo, the tests
and an operator check the same things the same way.
"""

from __future__ import annotations

from typing import Any

from ferry_cli.client import FerryClient
from ferry_common.messages.domain import Event, ManagementGraph
from ferry_managed_object.plane import VmPlane, apply_event
from ferry_managed_object.policy import PolicyEngine

Inspections = dict[str, dict[str, dict[str, Any]]]  # host -> service -> data


async def inspect_all(client: FerryClient, hosts: list[str], vm_id: str) -> Inspections:
    return {h: await client.inspect(h, vm_id) for h in hosts}


def problems(seen: Inspections, vm_id: str, where: str, sent: list[Event]) -> list[str]:
    """Everything wrong with ``vm_id``'s placement; empty means the verdict holds.

    Exactly one active management plane, on ``where``, which is where the VM runs;
    nothing staged, frozen or reserved anywhere; every event in ``sent`` dispatched
    exactly once, in time order.
    """
    out: list[str] = []
    active = []
    dispatched: list[str] = []
    for host, s in seen.items():
        plane = s["managed_object"]["planes"].get(vm_id)
        if plane is not None and plane["status"] == "active":
            active.append(host)
        elif plane is not None:
            out.append(f"{host}: management plane left {plane['status']}")
        sensor = s["sensor"]["vms"].get(vm_id)
        if sensor is not None and (sensor["mode"] != "active" or sensor["queued"]):
            out.append(f"{host}: sensor {sensor['mode']} with {sensor['queued']} events queued")
        if host != where and sensor is not None:
            out.append(f"{host}: sensor still takes events of {vm_id}")
        if s["migration_policy"]["reservations"]:
            out.append(f"{host}: reservation left: {sorted(s['migration_policy']['reservations'])}")
        vm_state = s["hypervisor_adapter"]["vms"].get(vm_id, "absent")
        if host == where and vm_state != "running":
            out.append(f"{host}: the VM is {vm_state}, not running")
        if host != where and vm_state != "absent":
            out.append(f"{host}: the VM is {vm_state} here too")
        dispatched.extend(s["managed_object"]["ledger"].get(vm_id, []))
    if active != [where]:
        out.append(f"management plane active on {active or 'no host'}, expected only on {where}")
    sent_ids = [e.id for e in sent]
    lost = set(sent_ids) - set(dispatched)
    dups = len(dispatched) - len(set(dispatched))
    if lost or dups:
        out.append(f"events: {len(lost)} lost, {dups} dispatched twice")
    ts = {e.id: (e.ts, e.id) for e in sent}
    for host, s in seen.items():
        order = [ts[i] for i in s["managed_object"]["ledger"].get(vm_id, []) if i in ts]
        if order != sorted(order):
            out.append(f"{host}: events dispatched out of time order")
    return out


def replay(graph: ManagementGraph, events: list[Event]) -> dict[str, dict[str, Any]]:
    """The embot state a single host would have reached from ``graph`` with every event once.

    A migrated plane must end exactly here: its policies carried on where they stopped.
    """
    plane = VmPlane.from_graph(graph, "active")
    engine = PolicyEngine()
    for event in sorted(events, key=lambda e: (e.ts, e.id)):
        apply_event(engine, plane, event)
    return plane.state


def state_problems(seen: Inspections, vm_id: str, where: str, expected: dict[str, dict[str, Any]]) -> list[str]:
    plane = seen[where]["managed_object"]["planes"].get(vm_id)
    if plane is None:
        return [f"{where}: no management plane for {vm_id}"]
    out = []
    for embot_id, state in expected.items():
        got = plane["embots"].get(embot_id)
        if got != state:
            out.append(f"{where}: embot {embot_id} state {got} differs from a single-host run {state}")
    return out
