"""The management plane: its export to the target, the events' transfer, the dirty rounds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from ferry_common.errors import FailedOnHost, ProtocolError
from ferry_common.messages.commands import (
    EventsFrozen,
    ExportDirtyObjects,
    ExportManagementState,
    FetchModules,
    FreezeEvents,
    ManagedObjectInstantiationError,
    ManagementEventStateFailed,
    ManagementEventStateSuccess,
    ManagementStateFailed,
    ManagementStateSuccess,
    MigrationStateSuccess,
    ModulesFetched,
    ModulesRequired,
    SendEventState,
    StageEvents,
)
from ferry_common.messages.domain import Module

from .port import expect
from .run import SagaRun
from .switchover import start_switch

A = TypeVar("A")
B = TypeVar("B")


async def export_plane(run: SagaRun) -> None:
    modules: list[Module] = []
    fetched_rounds = 0
    for _ in range(run.t.max_module_rounds):
        # the source exports its plane and forwards it to the target as ManagementState (with
        # the modules fetched so far); the target answers here: the graph goes from host to
        # host once, not through the saga
        ans = await run.call(
            run.source,
            ExportManagementState(migration_id=run.mid, vm_id=run.vm_id, target_host=run.target, modules=modules),
            answered_by=f"managed_object on {run.target}",
        )
        if isinstance(ans, ModulesRequired):
            fetched_rounds += 1
            got = expect(await run.call(run.source, FetchModules(migration_id=run.mid, vm_id=run.vm_id, refs=ans.missing)),
                         ModulesFetched)
            have = {(m.name, m.version) for m in got.modules}
            lacking = [r.key for r in ans.missing if (r.name, r.version) not in have]
            if lacking:
                raise FailedOnHost(f"modules unknown on both hosts: {', '.join(lacking)}", code="instantiation_error")
            modules = [*modules, *got.modules]
            continue
        if isinstance(ans, ManagementStateFailed):
            raise FailedOnHost(ans.reason, code="management_state_failed")
        if isinstance(ans, ManagedObjectInstantiationError):
            raise FailedOnHost(ans.reason, code="instantiation_error")
        ok = expect(ans, ManagementStateSuccess)
        # the target fetches what it lacks from the source itself and says so in its answer;
        # rounds made here are those a target without a source to ask sent back
        fetched = dict.fromkeys([*(f"{m.name}@{m.version}" for m in modules), *ok.modules_fetched])
        s = run.state
        s.element_ids, s.elements = list(ok.element_ids), len(ok.element_ids)
        s.module_rounds, s.modules_fetched = fetched_rounds + ok.module_rounds, list(fetched)
        return
    raise FailedOnHost("module dependencies nested too deep", code="instantiation_error")


async def freeze_events(run: SagaRun) -> None:
    start_switch(run)  # the target confirms the guest beside the freeze; the switch-over joins it
    # the target's sensor binds the events' key beside the freeze, not after it: an event that
    # reaches both hosts in between is acted on by the source and its id goes over in the final
    # dirty round, so the target's managed object skips it (the window is one round trip; the
    # dirty rounds carry the last 4,096 ids)
    frozen, _ = await asyncio.gather(
        run.call(run.source, FreezeEvents(migration_id=run.mid, vm_id=run.vm_id)),
        run.call(run.target, StageEvents(migration_id=run.mid, vm_id=run.vm_id)),
    )
    run.state.queued_at_freeze = expect(frozen, EventsFrozen).queued


async def move_events(run: SagaRun) -> None:
    element_ids = run.state.element_ids
    if element_ids is None:
        # a record from before the ids were kept: the staged graph is not known here
        raise ProtocolError("the record does not name the staged elements (written by an older coordinator)")
    # the target's sensor was staged beside the freeze; the source's sensor sends its queue to
    # the target's as ManagementEventState, and the target answers here: the events go from
    # host to host once. Beside it, the final dirty round: the source acts on nothing since the
    # freeze, and what it acted on until then is in the managed object's queue ahead of this
    send = run.call(
        run.source,
        SendEventState(migration_id=run.mid, vm_id=run.vm_id, target_host=run.target, element_ids=element_ids),
        answered_by=f"sensor on {run.target}",
    )
    ans, applied = await _both(send, dirty_round(run, final=True))
    if isinstance(ans, ManagementEventStateFailed):
        raise FailedOnHost(ans.reason, code="event_state_failed")
    if isinstance(ans, ManagedObjectInstantiationError):
        raise FailedOnHost(ans.reason, code="instantiation_error")
    run.state.events_moved = expect(ans, ManagementEventStateSuccess).staged
    run.state.final_dirty_applied = applied


async def dirty_round(run: SagaRun, *, final: bool) -> int:
    """One round of the plane's changes, host to host: the source sends it to the target's
    managed object, which answers here (the source answers itself when nothing changed).

    The final round resends everything changed since the export: an export's answer lost on
    the way (a timeout, then a retry) took its dirty bits with it, and only this keeps those
    changes from being lost; the target applies them idempotently."""
    export = ExportDirtyObjects(migration_id=run.mid, vm_id=run.vm_id, final=final, since_export=final,
                                target_host=run.target)
    ans = await run.call(run.source, export, answered_by=f"managed_object on {run.target}")
    if isinstance(ans, ManagementStateFailed):
        raise FailedOnHost(ans.reason, code="migration_state_failed")
    return expect(ans, MigrationStateSuccess).applied


async def _both(a: Awaitable[A], b: Awaitable[B]) -> tuple[A, B]:
    """Run two calls together; if one fails, wait for the other before raising (a step ends
    with nothing of its own still running)."""
    first, second = await asyncio.gather(a, b, return_exceptions=True)
    for r in (first, second):
        if isinstance(r, BaseException):
            raise r
    assert not isinstance(first, BaseException) and not isinstance(second, BaseException)
    return first, second

