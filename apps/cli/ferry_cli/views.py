"""What the CLI shows people: rich tables, and ``ferry migrate``'s live progress bar.

Every function writes to the :class:`~rich.console.Console` it is given, so tests render into
a recording console. Scripts use ``--json`` instead of parsing these.
"""

from __future__ import annotations

import json
import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

MIB = 2**20
PAGE = 4096  # dirty rates are reported in pages per second; guests' pages are 4 KiB

_STYLE = {"completed": "green", "rolled_back": "yellow", "rejected": "red", "failed": "bold red",
          "cancelled": "yellow", "running": "cyan", "queued": "magenta", "ready": "green",
          "not_ready": "bold red", "cordoned": "yellow", "draining": "yellow"}


def _status(text: str) -> str:
    style = _STYLE.get(text)
    return f"[{style}]{escape(text)}[/]" if style else escape(text)


def _when(at: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(at)))
    except (TypeError, ValueError):
        return ""


# ---- ferry migrations ----------------------------------------------------------------------
def migrations_table(console: Console, rows: list[dict[str, Any]], *, history: bool = True) -> None:
    """One line per migration, then (``history``) each migration's steps as it recorded them."""
    if not rows:
        console.print("no migrations recorded")
        return
    table = Table(title="Migrations", title_justify="left")
    for column in ("Migration", "VM", "From", "To", "Status", "Steps", "Started", "Reason"):
        table.add_column(column, overflow="fold")
    for r in rows:
        data = r.get("data") or {}
        table.add_row(escape(str(r.get("migration_id", ""))), escape(str(r.get("vm_id", ""))),
                      escape(str(r.get("source_host") or "")), escape(str(r.get("target_host") or "")),
                      _status(str(r.get("status", ""))), str(len(r.get("history") or [])),
                      _when(r.get("created_at")), escape(str(data.get("reason") or "")))
    console.print(table)
    if not history:
        return
    for r in rows:
        steps = r.get("history") or []
        if not steps:
            continue
        t0 = float(steps[0].get("at", 0.0))
        table = Table(title=f"{r.get('migration_id')} steps", title_justify="left", show_edge=False)
        for column, justify in (("+s", "right"), ("Step", "left"), ("Event", "left"), ("Detail", "left")):
            table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for h in steps:
            table.add_row(f"{float(h.get('at', t0)) - t0:.3f}", escape(str(h.get("step", ""))),
                          _status(str(h.get("event", ""))), escape(str(h.get("detail") or "")))
        console.print(table)


# ---- ferry hosts, ferry limits ---------------------------------------------------------------
def hosts_table(console: Console, rows: list[dict[str, Any]]) -> None:
    """One line per host as placement sees it."""
    if not rows:
        console.print("no hosts known")
        return
    table = Table(title="Hosts", title_justify="left")
    for column in ("Host", "State", "Capacity MiB", "Used MiB", "Reserved MiB", "Free MiB", "VMs", "In", "Out",
                   "Labels"):
        table.add_column(column, overflow="fold", justify="right" if "MiB" in column or column in ("VMs", "In", "Out") else "left")
    for r in rows:
        labels = ",".join(f"{k}={v}" for k, v in sorted((r.get("labels") or {}).items()))
        table.add_row(escape(str(r.get("host", ""))), _status(str(r.get("state", ""))),
                      *(str(r.get(k, 0)) for k in ("capacity_mib", "used_mib", "reserved_mib", "free_mib", "vms",
                                                    "inbound", "outbound")),
                      escape(labels))
    console.print(table)


def limits_table(console: Console, info: dict[str, Any]) -> None:
    table = Table(title="Migration limits", title_justify="left", show_header=False)
    table.add_column("Limit")
    table.add_column("Value", justify="right")
    for key in ("cluster", "outbound_per_host", "inbound_per_host", "automatic", "ageing_s", "in_flight", "queued"):
        if key in info:
            table.add_row(key, escape(str(info[key])))
    console.print(table)


# ---- ferry vm show -------------------------------------------------------------------------
def vm_view(vm_id: str, placement: dict[str, list[str]], seen: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """What ``ferry vm show`` knows of a VM, as data (its ``--json``): where it runs, and each
    host's view of it (hosts that know nothing of it are left out)."""
    hosts: dict[str, Any] = {}
    for host in sorted(seen):
        s = seen[host]
        plane = (s.get("managed_object") or {}).get("planes", {}).get(vm_id)
        sensor = (s.get("sensor") or {}).get("vms", {}).get(vm_id)
        vm_state = (s.get("hypervisor_adapter") or {}).get("vms", {}).get(vm_id, "absent")
        if plane is None and sensor is None and vm_state == "absent":
            continue
        hosts[host] = {
            "vm": vm_state,
            "plane": plane["status"] if plane else None,
            "events": {"mode": sensor["mode"], "queued": sensor["queued"]} if sensor else None,
            "embots": dict(plane["embots"]) if plane else {},
        }
    runs_on = sorted(h for h, vms in placement.items() if vm_id in vms)
    return {"vm": vm_id, "runs_on": runs_on, "hosts": hosts}


def vm_table(console: Console, view: dict[str, Any]) -> None:
    console.print(f"[bold]{escape(view['vm'])}[/]: runs on {escape(', '.join(view['runs_on']) or 'no known host')}")
    if not view["hosts"]:
        return
    table = Table(show_edge=False)
    for column in ("Host", "VM", "Management plane", "Events", "Queued"):
        table.add_column(column)
    for host, h in view["hosts"].items():
        events = h["events"] or {}
        table.add_row(escape(host), escape(str(h["vm"])), escape(str(h["plane"] or "none")),
                      escape(str(events.get("mode", "-"))), str(events.get("queued", "-")))
    console.print(table)
    embots = [(host, name, state) for host, h in view["hosts"].items() for name, state in h["embots"].items()]
    if embots:
        table = Table(title="Embots", title_justify="left", show_edge=False)
        for column in ("Host", "Embot", "State"):
            table.add_column(column, overflow="fold")
        for host, name, state in embots:
            table.add_row(escape(host), escape(name), escape(json.dumps(state, default=str)))
        console.print(table)


# ---- ferry config --------------------------------------------------------------------------
def config_table(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title="Effective settings (secrets masked)", title_justify="left")
    for column in ("Variable", "Value", "Source", "Description"):
        table.add_column(column, overflow="fold")
    for r in rows:
        value = "" if r["value"] is None else str(r["value"])
        source = "[bold]env[/]" if r["source"] == "env" else "default"
        table.add_row(escape(r["variable"]), escape(value), source, escape(r["description"]))
    console.print(table)


# ---- ferry migrate -------------------------------------------------------------------------
def status_line(e: Any) -> str:
    """One status event as a plain line (``ferry migrate`` off a terminal)."""
    if e.status == "progress" and e.detail.get("percent") is not None:
        d = e.detail
        return (f"  migrate_vm  pass {d.get('passes')}  {d.get('percent')}%  "
                f"{d.get('remaining_bytes', 0) / MIB:.0f} MiB remaining{_dirty(d)}{_ladder(d)}")
    if e.status == "progress":
        return f"  {e.step}"
    return f"{e.status}{': ' + e.reason if e.reason else ''}"


def _ladder(d: dict[str, Any]) -> str:
    """The convergence ladder's rung once it matters, and post-copy once it started."""
    rung = f"  downtime {d['downtime_limit_ms']} ms (rung {d.get('rung', 0)})" if d.get("downtime_limit_ms") else ""
    return rung + ("  post-copy" if d.get("postcopy") else "")


def _dirty(d: dict[str, Any]) -> str:
    rate = d.get("dirty_pages_rate") or 0
    return f"  dirty {rate * PAGE / MIB:.1f} MiB/s" if rate else ""


class MigrateProgress:
    """``ferry migrate``'s view of the statuses it follows: on a terminal a live bar (step,
    percent, MiB remaining, dirty rate) with each finished step printed above it; otherwise
    the plain lines of :func:`status_line`, one per status."""

    def __init__(self, console: Console, *, live: bool | None = None) -> None:
        self.console = console
        self.live = console.is_terminal if live is None else live
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._step: str | None = None

    def __enter__(self) -> MigrateProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description:<18}"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[remaining]}"), TextColumn("{task.fields[dirty]}"),
                TextColumn("{task.fields[passes]}"), TimeElapsedColumn(),
                console=self.console, transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("starting", total=100, remaining="", dirty="", passes="")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, e: Any) -> None:
        if self._progress is None or self._task is None:
            self.console.print(status_line(e), markup=False, highlight=False, soft_wrap=True)
            return
        if e.status == "progress" and e.detail.get("percent") is not None:
            d = e.detail
            if self._step is None:  # step statuses are paced: the first may be this sample
                self._step = e.step or "migrate_vm"
                self._progress.update(self._task, description=self._step)
            self._progress.update(
                self._task, completed=float(d.get("percent") or 0.0),
                remaining=f"{d.get('remaining_bytes', 0) / MIB:.0f} MiB left", dirty=_dirty(d).strip(),
                passes=(f"pass {d.get('passes')}" if d.get("passes") else "") + _ladder(d))
        elif e.status == "progress":
            done, self._step = self._step, e.step
            self._progress.update(self._task, description=e.step or "")
            if done and done != e.step:
                self._progress.console.print(f"  [dim]done[/] {escape(done)}")
        else:
            if e.status == "completed":
                self._progress.update(self._task, completed=100, description="completed")
            style = _STYLE.get(e.status, "")
            reason = f": {escape(e.reason)}" if e.reason else ""
            self._progress.console.print(f"[{style or 'bold'}]{escape(e.status)}[/]{reason}")
