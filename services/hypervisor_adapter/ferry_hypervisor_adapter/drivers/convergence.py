"""Convergence: a ladder of allowed downtimes raised when pre-copy stalls, then post-copy or abort.

Shared by the real drivers (see docs/hypervisors.md, "Convergence"). The ladder is a value
(:class:`Ladder`, built from a VM's :class:`~.base.MigrationParams`); :class:`Convergence` is the
decision function over progress samples and a clock, so it is tested without a hypervisor.

A *stall* is pre-copy not getting closer: the remaining bytes have made no new low for
``stall_passes`` passes over memory (QEMU's ``dirty-sync-count``, libvirt's
``memory_iteration``) or for ``stall_timeout_s`` seconds, whichever comes first, counted
from the last new low or the last change of rung. Each stall raises the allowed downtime one
rung; a stall on the top rung switches to post-copy where the VM's policy allows it, and
otherwise aborts the migration (the source keeps the guest).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from .base import MigrationParams, MigrationProgress
from .precopy import PrecopyWatch

Action = Literal["wait", "raise", "postcopy", "abort"]


@dataclass(frozen=True)
class Ladder:
    """The downtimes a migration may use, lowest first, and what follows the top rung."""

    downtimes_ms: tuple[int, ...]
    stall_passes: int
    stall_s: float
    postcopy: bool

    @classmethod
    def of(cls, params: MigrationParams) -> Ladder:
        # the first rung is downtime_limit_ms; rungs of the ladder at or below it are skipped
        raises = tuple(r for r in params.downtime_ladder_ms if r > params.downtime_limit_ms)
        return cls((params.downtime_limit_ms, *raises), params.stall_passes, params.stall_timeout_s,
                   params.postcopy == "allow")

    @property
    def top(self) -> int:
        return len(self.downtimes_ms) - 1


@dataclass(frozen=True)
class Decision:
    """What a driver does after a sample: ``raise`` sets ``downtime_ms`` (rung ``rung``),
    ``postcopy`` switches to post-copy, ``abort`` cancels with ``reason``."""

    action: Action
    rung: int
    downtime_ms: int
    reason: str = ""


class FigureKeys(NamedTuple):
    """Where a hypervisor's job figures keep a sample's numbers (their names differ)."""

    total: str
    transferred: str
    remaining: str
    dirty_rate: str
    passes: str


class Convergence:
    """Follows one migration's samples up the ladder; one instance per migration."""

    def __init__(self, ladder: Ladder, clock: Callable[[], float] = time.monotonic) -> None:
        self.ladder = ladder
        self._clock = clock
        self.rung = 0
        self.postcopy_requested = False  # asked of the hypervisor: no more decisions, no cancel
        self.postcopy_started = False  # seen to have started (the driver sets it)
        self.aborted = False
        self.reason = ""  # why it aborted
        self._low: int | None = None
        self._low_at = clock()
        self._low_passes: int | None = None

    @property
    def downtime_ms(self) -> int:
        return self.ladder.downtimes_ms[self.rung]

    def sample(
        self, status: str, figures: Mapping[str, Any], keys: FigureKeys, *, done: bool = False, **extra: int
    ) -> MigrationProgress:
        """A progress sample from a hypervisor's job ``figures`` (names in ``keys``), with this
        ladder's rung, downtime and post-copy state; ``done``: nothing remains."""
        total = int(figures.get(keys.total, 0))
        remaining = 0 if done else int(figures.get(keys.remaining, 0))
        return MigrationProgress(
            status=status,
            total_bytes=total,
            transferred_bytes=int(figures.get(keys.transferred, 0)),
            remaining_bytes=remaining,
            dirty_pages_rate=int(figures.get(keys.dirty_rate, 0)),
            passes=int(figures.get(keys.passes, 0)),
            percent=PrecopyWatch.percent(total, remaining),
            rung=self.rung,
            downtime_limit_ms=self.downtime_ms,
            postcopy=self.postcopy_started,
            **extra,
        )

    def observe(self, remaining_bytes: int, passes: int) -> Decision:
        """Take one sample of pre-copy and say what to do now."""
        now = self._clock()
        if self.postcopy_requested or self.postcopy_started or self.aborted:
            return self._decision("wait")
        if self._low is None or remaining_bytes < self._low:
            self._low, self._low_at, self._low_passes = remaining_bytes, now, passes
            return self._decision("wait")
        if self._low_passes is None:
            self._low_passes = passes
        stalled_passes = passes - self._low_passes >= self.ladder.stall_passes
        stalled_time = now - self._low_at >= self.ladder.stall_s
        if not (stalled_passes or stalled_time):
            return self._decision("wait")
        why = (f"remaining bytes made no new low for {passes - self._low_passes} passes"
               if stalled_passes else f"remaining bytes made no new low for {self.ladder.stall_s:g} s")
        if self.rung < self.ladder.top:
            self.rung += 1
            # a new rung starts its own count: the next sample is its first low
            self._low, self._low_at, self._low_passes = None, now, None
            return self._decision("raise", f"{why}; downtime raised to {self.downtime_ms} ms")
        if self.ladder.postcopy:
            self.postcopy_requested = True
            return self._decision("postcopy", f"{why} at the top rung ({self.downtime_ms} ms); post-copy")
        self.aborted = True
        self.reason = (f"stall timeout: {why} at the top rung ({self.downtime_ms} ms)"
                       " and the VM's policy forbids post-copy")
        return self._decision("abort", self.reason)

    def refuse_postcopy(self, reason: str) -> None:
        """Post-copy was asked for and the hypervisor refused it: abort instead."""
        self.postcopy_requested, self.aborted, self.reason = False, True, reason

    @property
    def past_cancel(self) -> bool:
        """Post-copy was asked for or started: the migration must not be cancelled any more."""
        return self.postcopy_requested or self.postcopy_started

    def _decision(self, action: Action, reason: str = "") -> Decision:
        return Decision(action, self.rung, self.downtime_ms, reason)
