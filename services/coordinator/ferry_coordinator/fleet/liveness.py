"""Host liveness: each host's inventory is its heartbeat; a host whose heartbeats stop is
marked not ready.

The bound: a host is not ready once ``missed`` of its periods (default 3 × 1 s) have passed
since its last heartbeat. Its period is the one its inventory states (``period_s``), else
the tracker's default. A heartbeat makes it ready again. The clock is injectable, so tests
move time instead of sleeping.

The saga can race a step against :meth:`LivenessTracker.wait_not_ready` to fail over at once
when the other end of a migration dies, instead of waiting out the step's timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from ferry_common.clock import Clock, sleep_or_set

Listener = Callable[[str, bool], None]  # (host, ready) on every change


@dataclass
class HostBeat:
    period_s: float
    last_beat: float  # the clock's monotonic time
    ready: bool = True
    # set and replaced on each heartbeat, so waiters re-read the deadline
    beat: asyncio.Event = field(default_factory=asyncio.Event)

    def due(self, missed: int) -> float:
        """When this host is marked not ready unless it beats again."""
        return self.last_beat + missed * self.period_s


class LivenessTracker:
    def __init__(
        self, clock: Clock, *, default_period_s: float = 1.0, missed: int = 3, on_change: Listener | None = None
    ) -> None:
        if default_period_s <= 0 or missed < 1:
            raise ValueError("the period must be positive and missed at least 1")
        self.clock = clock
        self.default_period_s = default_period_s
        self.missed = missed
        self._hosts: dict[str, HostBeat] = {}
        self._listeners: list[Listener] = [on_change] if on_change else []
        self._changed = asyncio.Event()

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def bound_s(self, host: str | None = None) -> float:
        """How long after its last heartbeat ``host`` (or a host at the default period) is marked not ready."""
        st = self._hosts.get(host) if host is not None else None
        return self.missed * (st.period_s if st else self.default_period_s)

    def beat(self, host: str, *, period_s: float | None = None) -> None:
        """A heartbeat from ``host`` (its inventory arrived)."""
        period = period_s if period_s and period_s > 0 else self.default_period_s
        now = self.clock.monotonic()
        st = self._hosts.get(host)
        if st is None:
            st = self._hosts[host] = HostBeat(period, now, ready=False)
        st.period_s, st.last_beat = period, now
        old, st.beat = st.beat, asyncio.Event()
        old.set()
        if not st.ready:
            self._set(host, st, True)
        self._changed.set()

    def forget(self, host: str) -> None:
        st = self._hosts.pop(host, None)
        if st is not None:
            st.beat.set()

    def deadline(self, host: str) -> float | None:
        st = self._hosts.get(host)
        return None if st is None else st.due(self.missed)

    def ready(self, host: str) -> bool:
        """Whether ``host`` beat within its bound (checked now, not at the last sweep)."""
        self.check(host)
        st = self._hosts.get(host)
        return st is not None and st.ready

    def states(self) -> dict[str, bool]:
        """Every known host: ready or not, as of now."""
        self.check()
        return {h: st.ready for h, st in self._hosts.items()}

    def check(self, host: str | None = None) -> list[str]:
        """Mark the hosts whose bound passed as not ready; returns those that changed."""
        now = self.clock.monotonic()
        names = [host] if host is not None else list(self._hosts)
        changed = []
        for name in names:
            st = self._hosts.get(name)
            if st is not None and st.ready and now >= st.due(self.missed):
                self._set(name, st, False)
                changed.append(name)
        return changed

    def _set(self, host: str, st: HostBeat, ready: bool) -> None:
        st.ready = ready
        for listener in self._listeners:
            listener(host, ready)

    async def wait_not_ready(self, host: str) -> None:
        """Return once ``host`` is not ready (at once if it is not, or was never heard of)."""
        while True:
            st = self._hosts.get(host)
            if st is None or not self.ready(host):
                return
            await sleep_or_set(self.clock, st.due(self.missed) - self.clock.monotonic(), st.beat)

    async def run(self) -> None:
        """Sweep until cancelled: every host is marked as soon as its bound passes, so
        listeners (metrics, placement's view) hear of it without anyone asking."""
        while True:
            self.check()
            now = self.clock.monotonic()
            deadlines = [st.due(self.missed) for st in self._hosts.values() if st.ready]
            wait = min(deadlines) - now if deadlines else self.default_period_s
            self._changed.clear()
            await sleep_or_set(self.clock, wait, self._changed)
