"""A QEMU target keeps receiving processes ready per VM shape and migrates into one."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from ferry_hypervisor_adapter.drivers.base import MigrationParams, MigrationProgress
from ferry_hypervisor_adapter.drivers.qemu import QemuDriver, _process_alive, _read_pid
from ferry_hypervisor_adapter.drivers.standby import Shape, StandbyPool, parse_shapes

from .conftest import Pair, require_qemu, short_dir


def test_shapes_parse_and_refuse_nonsense() -> None:
    assert parse_shapes("128, 512:2=2") == {Shape(128, 1): 1, Shape(512, 2): 2}
    assert parse_shapes("") == {} and parse_shapes(None) == {}
    for bad in ("x", "128:0", "128=0", "128=99", "128;256"):
        with pytest.raises(ValueError, match="standby shape"):
            parse_shapes(bad)


def test_the_pool_hands_out_ready_processes_and_counts_what_is_missing() -> None:
    pool = StandbyPool({Shape(128): 2, Shape(512, 2): 1})
    assert sorted(pool.missing()) == [Shape(128), Shape(128), Shape(512, 2)]
    pool.add(Shape(128), "a")
    assert pool.take(Shape(512, 2)) is None and pool.take(Shape(128)) == "a"
    assert pool.take(Shape(128)) is None and pool.names() == []


async def _ready(driver: QemuDriver, shape: Shape, count: int = 1) -> list[str]:
    for _ in range(500):
        names = list(driver.standby.ready.get(shape, []))
        if len(names) >= count:
            return names
        await asyncio.sleep(0.02)
    raise AssertionError(f"no standby of {shape} became ready")


def _standby_pair(guest_image: Path, base: Path, refill_s: float) -> Pair:
    """A source keeping no standbys and a target keeping one 128 MiB process ready."""
    require_qemu()
    source = QemuDriver("host-a", run_dir=base / "a", guest_image=guest_image)
    target = QemuDriver("host-b", run_dir=base / "b", guest_image=guest_image, standby="128",
                        standby_refill_s=refill_s)
    return Pair(source, target, lambda vm_id: None, "qemu")


async def _ignore(_: MigrationProgress) -> None:
    return None


async def test_an_incoming_guest_of_a_kept_shape_lands_in_a_standby_process(guest_image: Path) -> None:
    base = short_dir("fs-")
    pair = _standby_pair(guest_image, base, refill_s=0.2)
    source, target = pair.source, pair.target
    try:
        await source.start()
        await target.start()
        (name,) = await _ready(target, Shape(128))
        standby_pid = _read_pid(target.run_dir / ".standby" / name)
        assert standby_pid is not None and _process_alive(standby_pid)
        assert await target.list() == []  # a standby is not a guest of the host

        spec = pair.spec(memory_mib=128, dirty_mib=8, rate_mibps=32)
        await source.create(spec)
        await pair.wait_booted(source, spec.vm_id)
        params = MigrationParams()
        uri = await target.prepare_incoming(spec, params)
        assert target.pid(spec.vm_id) == standby_pid  # taken, not started
        assert await target.state(spec.vm_id) == "inmigrate"
        assert target.standby.names() == []  # its replacement starts once this migration is over

        result = await source.migrate(spec.vm_id, uri, params, _ignore)
        assert result.outcome == "completed", result
        assert await target.finish_incoming(spec.vm_id)
        await _ready(target, Shape(128))  # replaced
        assert await pair.advancing(target, spec.vm_id), "guest does not run in the standby process"
        assert not await pair.advancing(source, spec.vm_id)
        assert [s.vm_id for s in await target.list()] == [spec.vm_id]

        other = pair.spec(memory_mib=64)  # a shape the pool does not keep: started as before
        await target.prepare_incoming(other, params)
        assert target.pid(other.vm_id) not in (None, standby_pid)
        assert len(target.standby.ready[Shape(128)]) == 1
    finally:
        spare = [_read_pid(target.run_dir / ".standby" / n) for n in target.standby.names()]
        await pair.teardown()
        shutil.rmtree(base, ignore_errors=True)
    assert spare and not any(p is not None and _process_alive(p) for p in spare)  # close ends them


async def test_a_standby_whose_port_was_hit_while_waiting_is_not_taken(guest_image: Path) -> None:
    """A standby listens before it is taken; a stray connection that ends its wait leaves it
    unusable, and the incoming VM gets a fresh process instead."""
    base = short_dir("fs-")
    pair = _standby_pair(guest_image, base, refill_s=60)
    source, target = pair.source, pair.target
    try:
        await target.start()
        (name,) = await _ready(target, Shape(128))
        standby_dir = target.run_dir / ".standby" / name
        standby_pid = _read_pid(standby_dir)
        uri = json.loads((standby_dir / "meta.json").read_text())["uri"]
        host, port = uri.removeprefix("tcp:").rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"not a migration stream\n" * 64)  # QEMU gives up on this stream
        await writer.drain()
        writer.close()
        for _ in range(250):
            if standby_pid is None or not _process_alive(standby_pid):
                break
            await asyncio.sleep(0.02)

        await source.start()
        spec = pair.spec(memory_mib=128)
        await source.create(spec)
        await pair.wait_booted(source, spec.vm_id)
        params = MigrationParams()
        uri = await target.prepare_incoming(spec, params)
        assert target.pid(spec.vm_id) not in (None, standby_pid)
        assert not standby_dir.exists()

        result = await source.migrate(spec.vm_id, uri, params, _ignore)
        assert result.outcome == "completed", result
        assert await target.finish_incoming(spec.vm_id)
        assert await pair.advancing(target, spec.vm_id)
    finally:
        await pair.teardown()
        shutil.rmtree(base, ignore_errors=True)
