"""Timeout bookkeeping shared by the real drivers' pre-copy polling loops."""

from __future__ import annotations

import time
from collections.abc import Callable

from .base import MigrationParams


class PrecopyWatch:
    """Tracks one migration against its completion and stall timeouts.

    Completion: ``params.completion_timeout_s(memory_mib)`` after the watch starts.
    Stall: the remaining bytes have not reached a new low for ``params.stall_timeout_s``
    (pre-copy that dirties as fast as it sends never makes a new low).
    """

    def __init__(
        self, params: MigrationParams, memory_mib: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self.started = clock()
        self.deadline = self.started + params.completion_timeout_s(memory_mib)
        self.stall_timeout_s = params.stall_timeout_s
        self.best: int | None = None
        self.best_at = self.started
        self.phase = "memory"

    def observe(self, remaining_bytes: int, phase: str = "memory") -> None:
        """Record a sample of the bytes still to send; a new ``phase`` (a disk copy before
        the memory) starts the stall count afresh, since its bytes are another quantity."""
        if phase != self.phase:
            self.phase, self.best = phase, None
        if self.best is None or remaining_bytes < self.best:
            self.best, self.best_at = remaining_bytes, self._clock()

    def expired(self, *, stall: bool = True) -> str | None:
        """Why the migration must be cancelled now, or None; ``stall=False`` leaves stalls to
        the convergence ladder (:mod:`.convergence`), which raises the downtime first."""
        now = self._clock()
        if now > self.deadline:
            return f"completion timeout: pre-copy did not converge in {now - self.started:.1f} s"
        if stall and now - self.best_at > self.stall_timeout_s:
            return f"stall timeout: remaining bytes made no new low for {self.stall_timeout_s:g} s"
        return None

    @staticmethod
    def percent(total_bytes: int, remaining_bytes: int) -> float:
        """Honest progress: the share of memory not still to send (drops when pages are redirtied)."""
        if total_bytes <= 0:
            return 0.0
        return round(100.0 * (1 - min(remaining_bytes, total_bytes) / total_bytes), 2)
