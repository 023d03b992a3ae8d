"""Hostile management state sent to a target's managed-object, and sagas that meet it.

Each bad graph must be answered (``ManagementStateFailed``,
``ManagedObjectInstantiationError`` or, for what cannot even be decoded, an
``ErrorReply``) quickly and without staging anything; a saga that meets one must
roll back with the VM, its plane and its events where they were.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ferry_common.bus.memory import MemoryBus
from ferry_common.bus.topology import host_command
from ferry_common.errors import RemoteError
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import (
    InstallModules,
    ManagedObjectInstantiationError,
    ManagementState,
    ManagementStateFailed,
    ManagementStateSuccess,
    ModulesRequired,
)
from ferry_common.messages.domain import (
    Action,
    Element,
    Embot,
    ManagementGraph,
    Module,
    ModuleRef,
    Policy,
)
from ferry_common.messages.limits import MAX_ELEMENTS
from ferry_managed_object.policy import _state_problem
from ferry_testing.sample import CORE, LOAD, METRICS, MODULES
from tests.harness import Cluster, check_invariants, make_cluster

TARGET = "host-b"
MANIFEST = [CORE.ref(), LOAD.ref()]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = await make_cluster("memory")
    yield c
    await c.close()


async def send_state(c: Cluster, state: Wire, *, wait_s: float = 10.0) -> tuple[Wire | RemoteError, float]:
    """Ask the target's managed-object to stage ``state``; the answer and how long it took."""
    started = time.perf_counter()
    try:
        ans: Wire | RemoteError = await c.client.endpoint.request(
            host_command(TARGET, "managed_object"), state, timeout=wait_s
        )
    except RemoteError as exc:
        ans = exc
    return ans, time.perf_counter() - started


def element(vm: str, eid: str, deps: list[str] | None = None, module: str = CORE.ref().key, type_: str = "disk") -> Element:
    return Element(id=eid, vm_id=vm, type=type_, module=module, depends_on=deps or [])


def hostile_graph(vm: str, elements: list[Element], embots: list[Embot] | None = None,
                  manifest: list[ModuleRef] | None = None) -> ManagementGraph:
    return ManagementGraph(vm_id=vm, elements=[element(vm, vm, type_="vm"), *elements], embots=embots or [],
                           manifest=MANIFEST if manifest is None else manifest)


def state(g: ManagementGraph, modules: list[Module] | None = None, mid: str = "m-hostile") -> ManagementState:
    return ManagementState(migration_id=mid, vm_id=g.vm_id, graph=g, modules=modules or [])


async def preinstall(c: Cluster, host: str = TARGET) -> None:
    """The sample modules, installed on ``host`` as if an earlier migration had brought them."""
    await c.client.endpoint.request(host_command(host, "managed_object"), InstallModules(modules=MODULES), timeout=5.0)


def embot_with(vm: str, condition: str = "true", value: str | None = None) -> Embot:
    policy = Policy(name="p", trigger=["*"], condition=condition,
                    actions=[Action(kind="set", key="v", value=value)] if value else [])
    return Embot(id=f"{vm}.bot", module=LOAD.ref().key, elements=[vm], policies=[policy])


def _chain(vm: str, n: int) -> list[Element]:
    return [element(vm, f"{vm}.c{i}", [f"{vm}.c{i - 1}" if i else vm]) for i in range(n)]


CASES: dict[str, tuple[Any, type[Wire], str]] = {
    "cycle": (
        lambda vm: hostile_graph(vm, [element(vm, f"{vm}.a", [f"{vm}.b"]), element(vm, f"{vm}.b", [f"{vm}.a"])]),
        ManagementStateFailed, "cycle",
    ),
    "self_loop": (lambda vm: hostile_graph(vm, [element(vm, f"{vm}.a", [f"{vm}.a"])]), ManagementStateFailed, "cycle"),
    "dangling_dependency": (
        lambda vm: hostile_graph(vm, [element(vm, f"{vm}.a", [f"{vm}.ghost"])]), ManagementStateFailed, "unknown element",
    ),
    "chain_100_deep": (lambda vm: hostile_graph(vm, _chain(vm, 100)), ManagementStateFailed, "deeper"),
    "chain_100_deep_reversed": (lambda vm: hostile_graph(vm, _chain(vm, 100)[::-1]), ManagementStateFailed, "deeper"),
    "chain_64_deep_is_fine": (lambda vm: hostile_graph(vm, _chain(vm, 63)), ManagementStateSuccess, ""),
    "duplicate_ids": (
        lambda vm: hostile_graph(vm, [element(vm, f"{vm}.a"), element(vm, f"{vm}.a")]), ManagementStateFailed, "duplicate",
    ),
    "vm_element_missing": (
        lambda vm: ManagementGraph(vm_id=vm, elements=[element(vm, f"{vm}.a")], manifest=MANIFEST),
        ManagementStateFailed, "missing",
    ),
    "element_of_other_vm": (
        lambda vm: hostile_graph(vm, [element("other-vm", f"{vm}.a")]), ManagementStateFailed, "belongs to",
    ),
    "module_not_in_manifest": (
        lambda vm: hostile_graph(vm, [element(vm, f"{vm}.a", module="evil@6.6")]),
        ManagedObjectInstantiationError, "not in the manifest",
    ),
    "type_not_defined": (
        lambda vm: hostile_graph(vm, [element(vm, f"{vm}.a", type_="warhead")]),
        ManagedObjectInstantiationError, "not defined",
    ),
    "policy_does_not_compile": (
        lambda vm: hostile_graph(vm, [], [embot_with(vm, condition="event.data.value >")]), ManagementStateFailed, "compile",
    ),
    "action_does_not_compile": (
        lambda vm: hostile_graph(vm, [], [embot_with(vm, value="[1, 2")]), ManagementStateFailed, "compile",
    ),
    "embot_manages_unknown_element": (
        lambda vm: hostile_graph(vm, [], [Embot(id=f"{vm}.bot", module=LOAD.ref().key, elements=[f"{vm}.ghost"])]),
        ManagementStateFailed, "unknown element",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_malformed_graph_is_refused_with_a_reason(cluster: Cluster, case: str) -> None:
    build, answer_type, words = CASES[case]
    vm = f"vm-{case.replace('_', '-')}"
    await preinstall(cluster)
    ans, took = await send_state(cluster, state(build(vm)))
    assert isinstance(ans, answer_type), ans
    assert took < 5.0
    if answer_type is ManagementStateSuccess:
        return
    assert words in ans.reason, ans.reason  # type: ignore[union-attr]
    assert vm not in cluster.host(TARGET).managed_object.planes  # nothing staged
    await _still_serving(cluster)


async def test_oversized_state_is_refused_before_it_costs_memory(cluster: Cluster) -> None:
    """25,000 elements is over the model's limit: refused by the decoder, the sender told."""
    vm = "vm-huge"
    elements = [element(vm, vm, type_="vm")] + [element(vm, f"{vm}.e{i}", [vm]) for i in range(25_000)]
    g = ManagementGraph.model_construct(vm_id=vm, elements=elements, embots=[], manifest=MANIFEST, recent_event_ids=[])
    big = ManagementState.model_construct(migration_id="m-huge", vm_id=vm, graph=g, modules=[])
    ans, took = await send_state(cluster, big, wait_s=30.0)
    assert isinstance(ans, RemoteError) and ans.code == "invalid_message", ans
    assert f"at most {MAX_ELEMENTS}" in ans.reason, ans.reason
    assert took < 15.0
    assert vm not in cluster.host(TARGET).managed_object.planes
    await _still_serving(cluster)


async def test_unknown_module_is_asked_for_and_a_tampered_one_refused(cluster: Cluster) -> None:
    vm = "vm-mod"
    evil = Module(name="evil", version="1.0", element_types=["vm"])
    g = hostile_graph(vm, [], manifest=[*MANIFEST, evil.ref()])
    await preinstall(cluster)
    ans, _ = await send_state(cluster, state(g))
    assert isinstance(ans, ModulesRequired), ans
    assert {r.key for r in ans.missing} == {"evil@1.0"}
    # the module arrives, but its content is not what the manifest's digest names
    tampered = evil.model_copy(update={"element_types": ["vm", "backdoor"]})
    ans, _ = await send_state(cluster, state(g, modules=[tampered]))
    assert isinstance(ans, ManagedObjectInstantiationError), ans
    assert "does not match digest" in ans.reason
    # a module nobody asked for
    ans, _ = await send_state(cluster, state(hostile_graph(vm, []), modules=[evil]))
    assert isinstance(ans, ManagedObjectInstantiationError) and "not asked for" in ans.reason, ans
    assert cluster.host(TARGET).managed_object.modules.get("evil@1.0") is None
    await _still_serving(cluster)


async def test_expression_that_raises_at_runtime_is_counted_not_fatal(cluster: Cluster) -> None:
    """A policy that compiles but fails on every event: the graph is accepted, events count errors."""
    vm = "vm-raises"
    g = hostile_graph(vm, [], [embot_with(vm, condition="1 / 0 == 1", value="event.nope.deeper")])
    await preinstall(cluster)
    ans, _ = await send_state(cluster, state(g))
    assert isinstance(ans, ManagementStateSuccess), ans
    # and on a live host: register it on host-c, feed it events, it keeps running
    await cluster.create_vm("host-c", vm, g=g, modules=MODULES)
    await cluster.send_events(vm, 5, element=vm)
    await cluster.settle(vm)
    plane = cluster.host("host-c").managed_object.planes[vm]
    assert plane.status == "active" and plane.state[f"{vm}.bot"]["policy_errors"] == 5
    await _still_serving(cluster)


async def test_saga_rolls_back_when_target_has_other_module_content(cluster: Cluster) -> None:
    """The target knows ferry.load@1.3 with other content: instantiation fails, the saga rolls back."""
    impostor = Module(name=LOAD.name, version=LOAD.version, depends=[METRICS.ref()], element_types=["trojan"])
    assert impostor.digest() != LOAD.digest()
    await cluster.client.endpoint.request(
        host_command(TARGET, "managed_object"), InstallModules(modules=[CORE, METRICS, impostor]), timeout=5.0
    )
    await cluster.create_vm("host-a", "vm1")
    await cluster.send_events("vm1", 5)
    outcome = await cluster.migrate("vm1", TARGET)
    assert outcome.status == "rolled_back", outcome
    assert outcome.code == "instantiation_error", outcome
    await cluster.send_events("vm1", 3)
    await check_invariants(cluster, "vm1", "host-a")
    assert not _dead_letters_with(cluster, "internal")


async def test_policy_cannot_set_state_past_the_wire_limits(cluster: Cluster) -> None:
    """A 300-item list would make the plane unmigratable (the wire takes 256): the set is refused."""
    vm = "vm-fat"
    items = ",".join("1" * 300)
    g = hostile_graph(vm, [], [embot_with(vm, value=f"[{items}]")])
    await cluster.create_vm("host-a", vm, g=g, modules=MODULES)
    await cluster.send_events(vm, 1, element=vm)
    await cluster.settle(vm)
    st = cluster.host("host-a").managed_object.planes[vm].state[f"{vm}.bot"]
    assert "v" not in st and st["policy_errors"] == 1
    outcome = await cluster.migrate(vm, TARGET)
    assert outcome.status == "completed", outcome
    await check_invariants(cluster, vm, TARGET)
    assert not _dead_letters_with(cluster, "internal")


def _dead_letters_with(c: Cluster, code: str) -> list[str]:
    bus = c.buses[0]
    assert isinstance(bus, MemoryBus)
    return [m.headers.get("x-ferry-reason", "") for m in bus.dead_letters if m.headers.get("x-ferry-error-code") == code]


async def _still_serving(c: Cluster) -> None:
    data = await c.client.inspect(TARGET)
    assert "planes" in data["managed_object"]
    assert not _dead_letters_with(c, "internal")


async def test_policy_state_that_grows_every_event_is_bounded(cluster: Cluster) -> None:
    """A policy that quadruples its state per event (a hostile graph that compiles) is stopped at
    the wire's limits: the host keeps up, and the VM can still migrate."""
    vm = "vm-grow"
    g = hostile_graph(vm, [], [embot_with(vm, value="has(state.v) ? [state.v, state.v, state.v, state.v] : [1]")])
    await cluster.create_vm("host-a", vm, g=g, modules=MODULES)
    await cluster.send_events(vm, 14, element=vm)
    await cluster.settle(vm, timeout=20.0)  # unbounded, the 11th event alone would take ~40 s
    assert len(cluster.host("host-a").managed_object.ledger[vm]) == 14  # every event acted on
    st = cluster.host("host-a").managed_object.planes[vm].state[f"{vm}.bot"]
    assert st["policy_errors"] >= 1
    assert _state_problem(st) is None  # what it kept fits the wire and the node budget
    outcome = await cluster.migrate(vm, TARGET)
    assert outcome.status == "completed", outcome
    await check_invariants(cluster, vm, TARGET)
