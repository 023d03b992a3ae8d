"""One migration with one fault against the process cluster, judged and recorded."""

from __future__ import annotations

import asyncio
import io
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from ferry_coordinator.saga import STEPS
from tests.faults.procs import HOSTS, ProcCluster, Session
from tests.faults.report import RESULTS, Case

# inject(source, target, migration id) -> what to append to the case's detail
Inject = Callable[[str, str, str], Awaitable[str | None]]
_counter = iter(range(1_000_000))


def step_at(rec: dict[str, Any], when: float) -> str:
    """The step the saga was in at wall-clock time ``when``, from its history."""
    here = "-"
    for h in rec.get("history", []):
        if h["at"] > when:
            break
        if h["step"] == "compensate" or h["event"] == "failed":
            here = "compensate"
        elif h["event"] in ("started", "retry"):
            here = h["step"]
        elif h["event"] == "succeeded":
            i = STEPS.index(h["step"]) if h["step"] in STEPS else -1
            here = STEPS[i + 1] if 0 <= i < len(STEPS) - 1 else "ended"
    return here


async def migration_case(
    procs: ProcCluster | None,
    sess: Session,
    kind: str,
    step: str,
    inject: Inject,
    *,
    vm_params: dict[str, Any] | None = None,
    expect: str | None = None,
    timeout: float = 120.0,
) -> Case:
    """Create a VM, feed it events, migrate it, call ``inject`` once the saga reached ``step``,
    wait for the outcome, then check every invariant. The case is recorded either way."""
    n = next(_counter)
    source, target = HOSTS if n % 2 == 0 else HOSTS[::-1]
    vm = f"vm-{n}-{uuid.uuid4().hex[:6]}"
    params = {"sim_bandwidth_mibps": 512, **(vm_params or {})}
    await sess.create_vm(vm, source, **params)
    await sess.send_events(vm, 10)
    stop = asyncio.Event()
    feeder = asyncio.create_task(sess.feed(vm, stop))
    case = Case(kind, step, "unknown")
    stuck: list[str] = []
    # a stuck await must fail the case and say where it stuck, not stall the suite
    watchdog = asyncio.get_running_loop().call_later(timeout + 220, lambda: stuck.append(task_stacks()))
    try:
        async with asyncio.timeout(timeout + 240):
            await _run(sess, case, vm, source, target, step, inject, feeder, stop, timeout, expect)
    except Exception as exc:
        case.violations.append(f"{type(exc).__name__}: {exc}")
        if stuck:
            print(f"\n---- {kind} at {step}: the asyncio tasks when it stuck\n{stuck[0]}", file=sys.stderr)
            case.violations.append("stuck (asyncio task stacks on stderr)")
    finally:
        watchdog.cancel()
        stop.set()
        if not feeder.done():
            feeder.cancel()
        RESULTS.add(case)
        if procs is not None:
            dead = [name for name, p in procs.procs.items() if not p.alive]
            for name in dead:  # a test must not leave a service down for the next one
                await procs.restart(name)
    return case


async def _run(sess: Session, case: Case, vm: str, source: str, target: str, step: str, inject: Inject,
               feeder: asyncio.Task[None], stop: asyncio.Event, timeout: float, expect: str | None) -> None:
    """The body of :func:`migration_case`: migrate, inject, wait, judge into ``case``."""
    mid = await sess.client.migrate(vm, target)
    await sess.wait_step(mid, step, (*STEPS, "compensate"))
    injected_at = time.time()
    case.detail = (await inject(source, target, mid)) or ""
    rec = await sess.outcome(mid, timeout=timeout)
    case.outcome = rec["status"]
    case.step = step_at(rec, injected_at)
    stop.set()
    await feeder
    await sess.send_events(vm, 5)
    where = target if rec["status"] == "completed" else source
    case.violations = await sess.verdict(vm, where, HOSTS)
    ends = [h for h in rec["history"] if h["event"] in ("compensated",) or h.get("detail", {}).get("outcome")]
    if len(ends) > 1:
        case.violations.append(f"the record ended twice: {[(h['step'], h['event']) for h in ends]}")
    seen = sess.terminal_events(mid)
    if seen - {rec["status"]}:
        case.violations.append(f"announced {sorted(seen)} but the record says {rec['status']}")
    if rec["status"] not in ("completed", "rolled_back"):
        case.violations.append(f"ended {rec['status']}: {rec['data'].get('reason')}")
    if expect is not None and rec["status"] != expect:
        case.violations.append(f"expected {expect}, got {rec['status']} ({rec['data'].get('reason')})")


def task_stacks() -> str:
    """Every asyncio task of the running loop with the frames it is suspended in."""
    out = []
    for task in asyncio.all_tasks():
        buf = io.StringIO()
        task.print_stack(limit=12, file=buf)
        out.append(buf.getvalue())
    return "\n".join(out)
