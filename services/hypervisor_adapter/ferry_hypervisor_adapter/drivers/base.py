"""What every hypervisor driver provides to the adapter service.

The adapter owns the saga-facing protocol (idempotency, progress events, timeouts);
a driver only talks to its hypervisor. Every method is safe to call again with the
same arguments (the saga replays steps after crashes).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from ferry_common.errors import InvalidMessage
from ferry_common.messages.domain import VmSpec

VmState = Literal["running", "paused", "inmigrate", "postmigrate", "shutoff", "absent"]


@dataclass(frozen=True)
class MigrationParams:
    """Per-migration knobs, from the VM's migration policy (documented in docs/migration-parameters.md).

    ``completion_timeout_s`` is ``completion_timeout_per_gib_s`` times the memory size in GiB,
    at least ``completion_timeout_min_s``. Convergence (:mod:`.convergence`): the migration
    starts with ``downtime_limit_ms``; a stall (no new low of the remaining bytes for
    ``stall_passes`` passes or ``stall_timeout_s`` seconds) raises it to the next rung of
    ``downtime_ladder_ms``; a stall on the top rung switches to post-copy if ``postcopy`` is
    ``"allow"``, else cancels the migration.
    """

    downtime_limit_ms: int = 100
    downtime_ladder_ms: tuple[int, ...] = (150, 200, 300, 400, 500)
    stall_passes: int = 3
    postcopy: Literal["allow", "forbid"] = "forbid"
    bandwidth_mibps: int = 0  # 0: the hypervisor's default
    postcopy_bandwidth_mibps: int = 0  # the stream's cap once post-copy started; 0: none
    auto_converge: bool = False
    completion_timeout_per_gib_s: float = 120.0
    completion_timeout_min_s: float = 30.0
    stall_timeout_s: float = 30.0
    poll_interval_s: float = 0.05

    def completion_timeout_s(self, memory_mib: int) -> float:
        return max(self.completion_timeout_min_s, self.completion_timeout_per_gib_s * memory_mib / 1024)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MigrationParams:
        """The knobs in ``raw`` (other keys are ignored); ``InvalidMessage`` for a bad value.

        The values come from a public MigrateRequest: a zero poll interval or an endless
        timeout would keep a driver spinning, a string would fail deep in a migration task.
        """
        known: dict[str, Any] = {}
        if "downtime_ladder_ms" in raw:
            known["downtime_ladder_ms"] = _ladder(raw["downtime_ladder_ms"])
        if "postcopy" in raw:
            if raw["postcopy"] not in ("allow", "forbid"):
                raise InvalidMessage(f"migration parameter postcopy={raw['postcopy']!r}: expected 'allow' or 'forbid'")
            known["postcopy"] = raw["postcopy"]
        for key, (kind, lo, hi) in _PARAM_BOUNDS.items():
            if key not in raw:
                continue
            value = raw[key]
            if kind is bool:
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and lo <= value <= hi
                ok = ok and (kind is float or float(value).is_integer())
            if not ok:
                raise InvalidMessage(f"migration parameter {key}={value!r}: expected {kind.__name__} in [{lo:g}, {hi:g}]")
            known[key] = kind(value)
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ladder(value: Any) -> tuple[int, ...]:
    """A downtime ladder from the wire: up to 16 whole milliseconds, strictly increasing."""
    ok = isinstance(value, list | tuple) and len(value) <= MAX_RUNGS and all(
        isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 3_600_000 for v in value
    )
    if not ok or any(b <= a for a, b in zip(value, value[1:], strict=False)):
        raise InvalidMessage(
            f"migration parameter downtime_ladder_ms={value!r}: expected up to {MAX_RUNGS} whole "
            "milliseconds in [1, 3600000], strictly increasing"
        )
    return tuple(value)


MAX_RUNGS = 16
DAY_S = 86400.0
# what from_dict accepts: (type, lowest, highest)
_PARAM_BOUNDS: dict[str, tuple[type, float, float]] = {
    "downtime_limit_ms": (int, 0, 3_600_000),
    "bandwidth_mibps": (int, 0, 10_000_000),
    "postcopy_bandwidth_mibps": (int, 0, 10_000_000),
    "auto_converge": (bool, 0, 1),
    "completion_timeout_per_gib_s": (float, 0.0, DAY_S),
    "completion_timeout_min_s": (float, 0.001, 7 * DAY_S),
    "stall_timeout_s": (float, 0.001, DAY_S),
    "stall_passes": (int, 1, 100_000),
    "poll_interval_s": (float, 0.001, 60.0),
}


@dataclass(frozen=True)
class MigrationProgress:
    """One sample of a running migration, as published on ``migration.progress``."""

    status: str
    total_bytes: int = 0
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    dirty_pages_rate: int = 0  # pages per second, 0 until the hypervisor reports it
    passes: int = 0
    # honest: the share of memory not still to send, so it goes backwards when pre-copy does
    percent: float = 0.0
    # disks copied with the memory (libvirt's non-shared-disk migration); 0 when none are
    disk_total_bytes: int = 0
    disk_transferred_bytes: int = 0
    disk_remaining_bytes: int = 0
    rung: int = 0  # the convergence ladder's rung in use (0: the first downtime)
    downtime_limit_ms: int = 0  # the allowed downtime of that rung
    postcopy: bool = False  # post-copy started: the guest runs on the target from then on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MigrationResult:
    """How the hypervisor's migration ended, with its final figures."""

    outcome: Literal["completed", "failed", "cancelled"]
    reason: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # total_time_ms, downtime_ms, setup_time_ms, transferred_bytes
    # post-copy started: the source no longer holds a runnable guest, whatever the outcome
    postcopy_started: bool = False


ProgressCallback = Callable[[MigrationProgress], Awaitable[None]]


class Driver(Protocol):
    name: str
    host: str
    # True when a completed migration leaves the source paused with the guest's whole state, so
    # a rollback after the hypervisor finished can still resume it there (QEMU, sim). False when
    # completion ends the source (libvirt peer-to-peer): from then on recovery goes forward only.
    can_resume_source_after_completion: bool

    async def start(self) -> None:
        """Connect to the hypervisor (called once when the adapter starts)."""

    async def close(self) -> None:
        """Release connections; running guests keep running."""

    async def create(self, spec: VmSpec) -> None:
        """Start a guest on this host."""

    async def destroy(self, vm_id: str) -> None:
        """Stop and forget a guest; absent is fine."""

    async def list(self) -> list[VmSpec]:
        """Guests that run on this host (not incoming ones)."""

    async def state(self, vm_id: str) -> VmState: ...

    async def prepare_incoming(self, spec: VmSpec, params: MigrationParams) -> str:
        """Start a receiving guest and return the URI the source must migrate to."""

    async def take_ready_incoming(self, spec: VmSpec) -> str | None:
        """Like :meth:`prepare_incoming`, but only with a receiving process that already runs
        (one kept ready, or one prepared before for ``spec``): its URI, or None, and nothing
        is started. Asked before the migration is allowed, so it must cost nothing to undo."""

    def ready_shapes(self) -> tuple[str, ...]:
        """``"MEMORY_MIB:VCPUS"`` of the VM shapes :meth:`take_ready_incoming` can serve now."""

    async def migrate(
        self, vm_id: str, uri: str, params: MigrationParams, on_progress: ProgressCallback
    ) -> MigrationResult:
        """Live-migrate to ``uri`` and return when the hypervisor is done.

        Enforces ``params``' completion and stall timeouts by cancelling the migration.
        The source guest keeps running unless the outcome is ``completed``.
        """

    async def cancel_migration(self, vm_id: str) -> None:
        """Cancel an outgoing migration; the source guest keeps running."""

    async def finish_incoming(self, vm_id: str) -> bool:
        """After a completed migration: True once the guest runs here."""

    async def abort_incoming(self, vm_id: str) -> None:
        """Tear down whatever :meth:`prepare_incoming` started; absent is fine."""

    async def confirm_source(self, vm_id: str) -> None:
        """After the guest runs on the target: end it here."""
