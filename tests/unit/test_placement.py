"""Placement: each filter, the weights, and the explanation when nothing fits."""

from __future__ import annotations

import pytest

from ferry_common.messages.domain import VmPlacement, VmSpec
from ferry_common.messages.public import HostInventory
from ferry_coordinator.fleet.placement import Demand, Weights, place, why_not
from ferry_coordinator.fleet.view import FleetView, HostCondition, HostView


def host(name: str, *, free: int = 8192, driver: str = "sim", **kw: object) -> HostView:
    return HostView(name=name, driver=driver, capacity_mib=free, **kw)  # type: ignore[arg-type]


def demand(mem: int = 1024, **kw: object) -> Demand:
    return Demand(vm_id="vm-1", memory_mib=mem, driver=str(kw.pop("driver", "sim")), **kw)  # type: ignore[arg-type]


def test_capacity_counts_use_and_reservations() -> None:
    hosts = [host("a", free=4096, used_mib=2048, reserved_mib=1024), host("b", free=4096)]
    assert place(demand(1025), hosts).ranked == ("b",)
    assert place(demand(1024), hosts).ranked == ("b", "a")
    res = place(demand(5000), hosts)
    assert not res.fits
    assert res.rejected == {
        "a": "insufficient memory (1024 MiB free, 5000 needed)",
        "b": "insufficient memory (4096 MiB free, 5000 needed)",
    }


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        ({"cordoned": True}, "cordoned"),
        ({"draining": True, "cordoned": True}, "draining"),
        ({"ready": False, "cordoned": True}, "not ready"),
    ],
)
def test_a_host_that_is_not_ready_is_skipped(flags: dict[str, bool], reason: str) -> None:
    hosts = [host("a", **flags), host("b", free=1024)]
    assert place(demand(), hosts).ranked == ("b",)
    assert place(demand(2048), hosts).rejected["a"] == reason


def test_host_selector_matches_labels() -> None:
    hosts = [host("a", labels={"disk": "ssd", "zone": "z1"}), host("b", labels={"disk": "hdd"}), host("c")]
    d = demand(host_selector={"disk": "ssd"})
    assert place(d, hosts).ranked == ("a",)
    d = demand(host_selector={"disk": "ssd", "zone": "z2"})
    res = place(d, hosts)
    assert res.rejected == {
        "a": "labels do not match zone=z2",
        "b": "labels do not match disk=ssd,zone=z2",
        "c": "labels do not match disk=ssd,zone=z2",
    }


def test_anti_affinity_keeps_a_group_apart() -> None:
    from collections import Counter

    hosts = [host("a", groups=Counter({"db": 1})), host("b", groups=Counter({"web": 2})), host("c")]
    assert place(demand(anti_affinity=frozenset({"db"})), hosts).ranked in (("b", "c"), ("c", "b"))
    res = place(demand(anti_affinity=frozenset({"db", "web"})), hosts[:2])
    assert res.rejected == {
        "a": "anti-affinity group db already there",
        "b": "anti-affinity group web already there",
    }


def test_anti_affinity_counts_the_vms_on_their_way_in() -> None:
    vm = VmSpec(vm_id="v1", memory_mib=1024)
    view = FleetView.from_inventories(
        [HostInventory(host=h, vms=[vm] if h == "a" else [], capacity_mib=8192) for h in ("a", "b")]
    )
    d = demand(anti_affinity=frozenset({"db"}))
    view.reserve("b", 1024, d.anti_affinity)  # a first db VM is moving to b
    assert place(d, view.values(), exclude=()).ranked == ("a",)
    view.update(HostInventory(host="b", vms=[], capacity_mib=8192))  # not there yet: still counted
    assert place(d, view.values()).ranked == ("a",)
    view.unreserve("b", 1024, d.anti_affinity)
    assert set(place(d, view.values()).ranked) == {"a", "b"}
    assert not view.hosts["b"].incoming_groups


def test_same_driver_kind_and_not_the_source() -> None:
    hosts = [host("a", driver="qemu"), host("b"), host("src")]
    assert place(demand(source_host="src"), hosts).ranked == ("b",)
    res = place(demand(source_host="src", driver="libvirt"), hosts)
    assert res.rejected == {"a": "driver qemu, not libvirt", "b": "driver sim, not libvirt", "src": "the VM's own host"}


def test_the_explanation_names_each_host() -> None:
    hosts = [host("host-c", cordoned=True), host("host-b", free=512)]
    res = place(demand(1024), hosts)
    assert res.explanation() == "host-b: insufficient memory (512 MiB free, 1024 needed); host-c: cordoned"


def test_the_filters_run_in_a_fixed_order() -> None:
    # cordoned and too small: the condition is named, as the first filter that refuses it
    assert why_not(host("a", free=1, cordoned=True), demand()) == "cordoned"


def test_weights_most_free_memory_then_fewest_inbound() -> None:
    hosts = [host("small", free=4096), host("big", free=16384), host("mid", free=8192)]
    assert place(demand(), hosts).ranked == ("big", "mid", "small")
    # the same free memory: fewer migrations inbound wins
    hosts = [host("busy", free=8192, inbound=2), host("idle", free=8192)]
    assert place(demand(), hosts).ranked == ("idle", "busy")
    # inbound outweighs a little more memory when its multiplier says so
    hosts = [host("busy", free=9000, inbound=2), host("idle", free=8192)]
    assert place(demand(), hosts).ranked == ("busy", "idle")
    assert place(demand(), hosts, weights=Weights(free_memory=1.0, fewer_inbound=2.0)).ranked == ("idle", "busy")


def test_exclude_and_limit() -> None:
    hosts = [host(f"h{i}", free=1024 * (i + 2)) for i in range(5)]
    assert place(demand(), hosts, limit=2).ranked == ("h4", "h3")
    assert place(demand(), hosts, exclude={"h4"}, limit=2).ranked == ("h3", "h2")
    res = place(demand(), hosts[:1], exclude={"h0"})
    assert res.rejected == {"h0": "tried already"}


def test_the_view_takes_inventories_and_keeps_its_overlay() -> None:
    vm = VmSpec(vm_id="v1", memory_mib=1024, placement=VmPlacement(anti_affinity=["db"]))
    inv = HostInventory(host="a", vms=[vm], capacity_mib=4096, labels={"zone": "z1"}, period_s=1.0)
    view = FleetView.from_inventories([inv])
    view.reserve("a", 512)
    view.cordon("a")
    view.set_ready("a", False)
    view.update(inv.model_copy(update={"capacity_mib": 8192}))
    a = view.hosts["a"]
    assert (a.capacity_mib, a.used_mib, a.reserved_mib, a.inbound, a.free_mib) == (8192, 1024, 512, 1, 6656)
    assert a.condition is HostCondition.NOT_READY and a.cordoned and a.labels == {"zone": "z1"} and a.groups["db"] == 1
    view.set_ready("a", True)  # back, and still cordoned
    assert a.condition is HostCondition.CORDONED and not a.schedulable
    view.unreserve("a", 512)
    assert (a.reserved_mib, a.inbound) == (0, 0)
    d = Demand.of(VmSpec(vm_id="v2", memory_mib=10, placement=VmPlacement(host_selector={"zone": "z1"})), "b")
    assert (d.host_selector, d.source_host, d.anti_affinity) == ({"zone": "z1"}, "b", frozenset())


def test_old_inventories_and_specs_still_parse() -> None:
    # fields added for placement are optional: what an older adapter sends is still valid
    inv = HostInventory.model_validate({"host": "a", "vms": [{"vm_id": "v", "memory_mib": 1}], "capacity_mib": 1})
    assert inv.labels == {} and inv.period_s is None and inv.vms[0].placement is None
