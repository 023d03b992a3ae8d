"""Management planes from files, through the managed object of the VM's host, on the
in-process bus and on the real RabbitMQ: apply creates, applies again unchanged, and
updates in place keeping the embots' state; get prints the file back; a plane that is part
of a migration is not changed (``plane_migrating``)."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from pathlib import Path

import pytest

from ferry_common.bus.topology import host_command
from ferry_common.endpoint import Endpoint
from ferry_common.errors import RemoteError
from ferry_common.messages.commands import ActivateVmEvents, CreateVm
from ferry_common.messages.domain import Policy
from ferry_common.messages.plane import PlaneDocument, PlaneEmbot
from ferry_common.messages.planes import ApplyPlane, GetPlane
from ferry_common.planes.commands import apply_command, get_command, read_plane
from ferry_common.planes.loader import load_plane, parse_plane
from ferry_common.planes.remote import apply_plane, get_plane
from ferry_common.signing import auth_factory_from_env, init_keydir
from ferry_managed_object.service import ManagedObjectService
from ferry_testing.sample import vm_spec
from tests.harness import Cluster, amqp_url, make_cluster, until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
async def cluster(bus_kind: str):
    c = await make_cluster(bus_kind, ("host-a", "host-b"))
    yield c
    await c.close()


async def guest_without_plane(c: Cluster, host: str, vm_id: str) -> None:
    """A VM running on ``host`` that has no management plane yet."""
    await c.client.endpoint.request(host_command(host, "hypervisor_adapter"), CreateVm(vm=vm_spec(vm_id, memory_mib=256)),
                                    timeout=5.0)
    await c.wait_placement(vm_id, host)


async def test_apply_creates_then_is_idempotent_and_get_prints_the_file_back(cluster: Cluster) -> None:
    await guest_without_plane(cluster, "host-a", "db-01")
    doc = load_plane(EXAMPLES / "database.yaml")
    # not where the VM runs: refused, no plane made there
    with pytest.raises(RemoteError) as elsewhere:
        await apply_plane(cluster.client.endpoint, "host-b", doc)
    assert elsewhere.value.code == "vm_not_here" and "absent on 'host-b'" in elsewhere.value.reason
    assert "db-01" not in cluster.host("host-b").managed_object.planes
    out, err = io.StringIO(), io.StringIO()
    # the host is found where the coordinator sees the VM
    assert await apply_command(cluster.client.endpoint, doc, out=out, err=err) == 0, err.getvalue()
    assert out.getvalue().startswith("plane of db-01 on host-a: created; added db-01, db-01.data")
    mo = cluster.host("host-a").managed_object
    assert mo.planes["db-01"].status == "active"
    assert set(mo.planes["db-01"].embots) == {"db-01.data-disk", "db-01.service"}
    stored = {k for k, _ in await mo.state.items("eb.db-01")}
    assert stored == {"db-01.data-disk", "db-01.service"}
    # the VM's events now reach its plane
    sent = await cluster.send_events("db-01", 4, element="db-01.data")
    await cluster.settle("db-01")
    assert mo.ledger["db-01"] == [e.id for e in sent]
    assert mo.planes["db-01"].state["db-01.data-disk"]["io_errors"] == 1  # the 4th is a disk error
    again = await apply_plane(cluster.client.endpoint, "host-a", doc)
    assert again.result == "unchanged" and not (again.added or again.removed or again.changed)
    # get prints what was applied, in the file's form (policies named where they were)
    assert await get_plane(cluster.client.endpoint, "host-a", "db-01") == doc
    for fmt in ("yaml", "json"):
        text = io.StringIO()
        assert await get_command(cluster.client.endpoint, "db-01", fmt=fmt, out=text) == 0
        printed = parse_plane(text.getvalue(), f"got.{fmt}")
        assert printed == doc
        assert (await apply_plane(cluster.client.endpoint, "host-a", printed)).result == "unchanged"
    if fmt == "json":
        assert '"track-usage"' in text.getvalue()


async def test_the_sample_plane_is_the_example_and_a_bad_plane_changes_nothing(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1")  # the demo's sample plane
    doc = read_plane(str(EXAMPLES / "web-server.yaml"), "vm1")
    assert doc is not None and doc.vm == "vm1"
    assert (await apply_plane(cluster.client.endpoint, "host-a", doc)).result == "unchanged"
    # an embot watching an element the plane does not have: refused, nothing installed or changed
    mo = cluster.host("host-a").managed_object
    before = (dict(mo.planes["vm1"].embots), [r.key for r in mo.modules.refs()])
    bad = doc.model_copy(update={
        "modules": [*doc.modules, doc.modules[0].model_copy(update={"version": "9.9"})],
        "embots": [*doc.embots, PlaneEmbot(id="vm1.ghost", module="ferry.load@1.3", elements=["vm1.nope"])]})
    with pytest.raises(RemoteError) as refused:
        await apply_plane(cluster.client.endpoint, "host-a", bad)
    assert refused.value.code == "invalid_message" and "unknown element 'vm1.nope'" in refused.value.reason
    assert (dict(mo.planes["vm1"].embots), [r.key for r in mo.modules.refs()]) == before
    # a module changed without a new version is refused by name
    edited = doc.model_copy(update={"modules": [doc.modules[0].model_copy(update={"element_types": ["vm"]}),
                                                *doc.modules[1:]]})
    with pytest.raises(RemoteError, match="ferry.core@1.0 is already installed with other content"):
        await apply_plane(cluster.client.endpoint, "host-a", edited)


def edited(doc: PlaneDocument) -> PlaneDocument:
    """The web server's plane with the load embot's counting policy removed, the services'
    embot removed, and a new embot with a policy of its own and an initial state."""
    load, disks, _services = doc.embots
    watch = Policy(name="count-everything", trigger=["*"], actions=[{"kind": "increment", "key": "n"}])
    return doc.model_copy(update={"embots": [
        load.model_copy(update={"policies": ["alarm-on-sustained-load", "remember-last-event"]}),
        disks,
        PlaneEmbot(id="vm1.audit", module="ferry.load@1.3", elements=["vm1"], policies=[watch], state={"n": 100}),
    ]})


async def test_updating_a_running_plane_keeps_the_state_of_what_stays(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1")
    await cluster.send_events("vm1", 12)
    await cluster.settle("vm1")
    mo = cluster.host("host-a").managed_object
    load = dict(mo.planes["vm1"].state["vm1.load"])
    disks = dict(mo.planes["vm1"].state["vm1.disks"])
    assert load["high_samples"] == 3 and "sustained-load" in load["alarms"] and load["seen"] == 10  # 2 of 12 on a disk

    doc = read_plane(str(EXAMPLES / "web-server.yaml"), "vm1")
    assert doc is not None
    ans = await apply_plane(cluster.client.endpoint, "host-a", edited(doc))
    assert (ans.result, ans.added, ans.removed, ans.changed) == ("updated", ["vm1.audit"], ["vm1.services"], ["vm1.load"])
    plane = mo.planes["vm1"]
    # kept: what the remaining policies keep; dropped: what only the removed policy kept
    assert plane.state["vm1.load"] == {k: v for k, v in load.items() if k not in ("high_samples", "last_high")}
    assert plane.state["vm1.disks"] == disks
    assert "vm1.services" not in plane.state and plane.state["vm1.audit"] == {"n": 100}
    stored = {k: v for k, v in await mo.state.items("eb.vm1")}
    assert set(stored) == {"vm1.load", "vm1.disks", "vm1.audit"}
    assert stored["vm1.load"]["state"]["seen"] == 10
    # the same update again changes nothing
    assert (await apply_plane(cluster.client.endpoint, "host-a", edited(doc))).result == "unchanged"
    # what is stored is the updated plane: a restart restores it as it is
    restarted = ManagedObjectService("host-a", mo.endpoint, mo.state)
    await restarted.restore()
    again = restarted.planes["vm1"]
    assert (again.state, again.embots.keys(), again.elements) == (plane.state, plane.embots.keys(), plane.elements)
    read = [(await m.plane_files.on_get(GetPlane(vm_id="vm1"), None)).plane  # type: ignore[arg-type]
            for m in (restarted, mo)]
    # (stored by id, the elements and embots come back in the order of their ids)
    assert [({e.id: e for e in d.elements}, {b.id: b for b in d.embots}, d.modules) for d in read] == \
        [({e.id: e for e in read[1].elements}, {b.id: b for b in read[1].embots}, read[1].modules)] * 2

    # events go on from the kept state, each acted on once
    await cluster.send_events("vm1", 3)
    await cluster.settle("vm1")
    assert plane.state["vm1.load"]["seen"] == 13
    assert plane.state["vm1.audit"]["n"] == 103
    assert "high_samples" not in plane.state["vm1.load"]
    # the updated plane migrates as it is, and reads back the same on the target
    outcome = await cluster.migrate("vm1", "host-b")
    assert outcome.status == "completed", outcome
    moved = cluster.host("host-b").managed_object.planes["vm1"]
    assert moved.state["vm1.audit"]["n"] == 103 and set(moved.embots) == {"vm1.load", "vm1.disks", "vm1.audit"}
    got = await get_plane(cluster.client.endpoint, "host-b", "vm1")
    # as applied, less the new embot's initial state: a running embot keeps its own
    want = edited(doc)
    assert got == want.model_copy(update={"embots": [*want.embots[:2], want.embots[2].model_copy(update={"state": {}})]})


async def test_a_plane_is_not_changed_while_its_vm_migrates(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1", memory_mib=4096, sim_bandwidth_mibps=1024)  # ~4 s of copying
    await cluster.client.endpoint.request(host_command("host-a", "sensor"), ActivateVmEvents(vm_id="vm1"),
                                          timeout=5.0)
    doc = read_plane(str(EXAMPLES / "web-server.yaml"), "vm1")
    assert doc is not None
    source, target = cluster.host("host-a").managed_object, cluster.host("host-b").managed_object
    mid = await cluster.client.migrate("vm1", "host-b")

    async def exported() -> bool:
        p, t = source.planes.get("vm1"), target.planes.get("vm1")
        return p is not None and p.status == "exporting" and t is not None and t.status == "staged"
    await until(exported, 20.0, "the plane to be exported and staged")
    for host in ("host-a", "host-b"):
        with pytest.raises(RemoteError) as refused:
            await apply_plane(cluster.client.endpoint, host, edited(doc))
        assert refused.value.code == "plane_migrating" and "migrating" in refused.value.reason
    err = io.StringIO()
    assert await apply_command(cluster.client.endpoint, edited(doc), host="host-a", err=err) == 1
    assert err.getvalue().startswith("plane of vm1 not applied: plane_migrating:")
    outcome = await cluster.client.outcome(mid, timeout=60)
    assert outcome.status == "completed", outcome
    # nothing of the refused update reached either plane
    assert set(target.planes["vm1"].embots) == {"vm1.load", "vm1.disks", "vm1.services"}
    # once the migration has ended the plane changes again, where the VM now runs
    await asyncio.sleep(0)
    ans = await apply_command(cluster.client.endpoint, edited(doc), err=err)
    assert ans == 0, err.getvalue()
    assert set(target.planes["vm1"].embots) == {"vm1.load", "vm1.disks", "vm1.audit"}


async def test_only_clients_may_apply_a_plane_when_messages_are_signed(tmp_path: Path, bus_kind: str) -> None:
    keys = init_keydir(tmp_path / "keys", hosts=["host-a", "host-b"], clients=["test"])
    auth = auth_factory_from_env(environ={"FERRY_AUTH": "ed25519", "FERRY_KEYS_DIR": str(keys)})
    c = await make_cluster(bus_kind, ("host-a", "host-b"), auth=auth)
    try:
        await c.create_vm("host-a", "vm1", memory_mib=256)
        doc = read_plane(str(EXAMPLES / "web-server.yaml"), "vm1")
        assert doc is not None
        # a signed client's apply is taken
        assert (await apply_plane(c.client.endpoint, "host-a", edited(doc))).result == "updated"
        # another host's services, though trusted, may not change (or read) a plane
        mo = c.host("host-a").managed_object
        before = mo.endpoint.stats["unauthenticated"]
        host_b = Endpoint(c.client.endpoint.bus, "host/host-b/managed_object", auth=auth("host/host-b/managed_object"))
        await host_b.send(host_command("host-a", "managed_object"), ApplyPlane(plane=doc))
        await host_b.send(host_command("host-a", "managed_object"), GetPlane(vm_id="vm1"))

        async def refused() -> bool:
            return mo.endpoint.stats["unauthenticated"] >= before + 2
        await until(refused, 5.0, "the managed object to refuse both")
        assert "vm1.audit" in mo.planes["vm1"].embots  # the host's apply changed nothing
    finally:
        await c.close()


@pytest.mark.rabbitmq
async def test_the_ferry_command_applies_and_gets_a_plane(rabbitmq_available: None, tmp_path: Path) -> None:
    """``ferry plane apply`` and ``ferry plane get`` as a person runs them, against RabbitMQ."""
    c = await make_cluster("rabbitmq", ("host-a", "host-b"))
    try:
        await guest_without_plane(c, "host-a", "db-07")
        env = {**os.environ, "AMQP_URL": amqp_url(c.vhost or ""), "FERRY_AUTH": "none"}

        async def ferry(*args: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("ferry")), *args, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            return proc.returncode or 0, out.decode(), err.decode()

        code, out, err = await ferry("plane", "apply", "-f", str(EXAMPLES / "database.yaml"), "--vm", "db-07")
        assert code == 0, err
        assert out.startswith("plane of db-07 on host-a: created")
        code, out, err = await ferry("plane", "get", "db-07", "-o", "yaml")
        assert code == 0, err
        got = tmp_path / "db-07.yaml"
        got.write_text(out)
        assert load_plane(got) == read_plane(str(EXAMPLES / "database.yaml"), "db-07")
        code, out, err = await ferry("plane", "apply", "-f", str(got))
        assert (code, out.strip()) == (0, "plane of db-07 on host-a: unchanged"), err
        bad = tmp_path / "bad.yaml"
        bad.write_text("vm: db-07\nelements:\n  - id: db-07\n    type: vm\n    module: ferry.core@1.0\n    colour: red\n")
        code, out, err = await ferry("plane", "apply", "-f", str(bad))
        assert code == 2 and err.strip().endswith(f"{bad}:6: elements.0.colour: unknown field 'colour'"), err
    finally:
        await c.close()
