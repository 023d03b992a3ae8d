"""The cluster balancer: proposes moves that lower the fleet's imbalance, within its rules.

One :class:`Balancer` per cluster, in the coordinator's active replica. Each evaluation takes
a snapshot of the fleet and what is in flight, and returns an :class:`Evaluation`: the
imbalance, and the load moves it proposes now (none while the rules say wait). Whether a
proposal is acted on or only recommended is the automation level's call (:mod:`.levels`);
the caller reports the moves it started with :meth:`Balancer.started`, which starts their
cooldown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ferry_common.clock import Clock, SystemClock
from ferry_common.messages.recommendations import ReasonKind

from .metric import Spread, host_utilisation, utilisation
from .model import Fleet, HostLoad, Move, VmLoad, inventory_version
from .placement import Placement
from .rules import BalanceRules

#: the policy name load moves carry in their reason
LOAD_POLICY = "balance.load"

#: why an evaluation proposes nothing
Idle = Literal["balanced", "holding", "yielding", "in_flight_limit", "no_gain"]


@dataclass(frozen=True)
class WorkInFlight:
    """What is moving, as the coordinator's queue knows it."""

    #: VMs in an automatic (balancer) migration now
    automatic: frozenset[str] = frozenset()
    #: VMs in a migration for a drain, an evacuation or an operator
    other: frozenset[str] = frozenset()
    #: a drain, an evacuation or operator requests are running or queued: automatic work
    #: yields to them entirely, even at a moment when none of their migrations is in flight
    busy: bool = False


@dataclass(frozen=True)
class Proposal:
    """One move and the figures that justify it."""

    move: Move
    before: float  # imbalance before the move
    after: float  # imbalance the move is expected to leave
    source_utilisation: float
    target_utilisation: float
    kind: ReasonKind = "load"
    policy: str = LOAD_POLICY

    @property
    def gain(self) -> float:
        return self.before - self.after

    def figures(self) -> dict[str, float]:
        return {
            "imbalance_before": round(self.before, 6),
            "imbalance_after": round(self.after, 6),
            "gain": round(self.gain, 6),
            "source_utilisation": round(self.source_utilisation, 6),
            "target_utilisation": round(self.target_utilisation, 6),
        }


@dataclass(frozen=True)
class Evaluation:
    imbalance: float
    rounds_above: int
    version: str  # :func:`.model.inventory_version` of the snapshot
    proposals: tuple[Proposal, ...] = ()
    idle: Idle | None = None


@dataclass
class BalancerState:
    """What the balancer carries from one evaluation to the next (kept across restarts by the
    caller: a replica taking over restores it and neither repeats nor forgets a cooldown)."""

    rounds_above: int = 0
    #: the threshold was held and the balancer is bringing the imbalance down to the target
    active: bool = False
    #: vm id -> clock.now() when the balancer's last move of it started
    moved_at: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, for the saga store."""
        return {"rounds_above": self.rounds_above, "active": self.active, "moved_at": dict(self.moved_at)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> BalancerState:
        try:
            moved = {str(k): float(v) for k, v in dict(raw.get("moved_at", {})).items()}
            return cls(int(raw.get("rounds_above", 0)), bool(raw.get("active", False)), moved)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"balancer state is malformed: {exc}") from None


class Balancer:
    def __init__(
        self,
        placement: Placement,
        rules: BalanceRules | None = None,
        clock: Clock | None = None,
        state: BalancerState | None = None,
    ) -> None:
        self.placement = placement
        self.rules = rules or BalanceRules()
        # wall-clock time: a cooldown must survive a restart on another replica
        self.clock: Clock = clock or SystemClock()
        self.state = state or BalancerState()

    def started(self, vm_id: str) -> None:
        """An automatic move of ``vm_id`` started: its cooldown runs from now."""
        self.state.moved_at[vm_id] = self.clock.now()

    def cooling(self, vm_id: str) -> bool:
        at = self.state.moved_at.get(vm_id)
        return at is not None and self.clock.now() - at < self.rules.cooldown_s

    def evaluate(self, fleet: Fleet, work: WorkInFlight | None = None) -> Evaluation:
        work = work or WorkInFlight()
        rules = self.rules
        self._forget_cooled()
        utils = [host_utilisation(h) for h in fleet.hosts]
        spread = Spread.of(utils)
        current = spread.value
        version = inventory_version(fleet)
        state = self.state
        if current <= rules.target or (current <= rules.threshold and not state.active):
            state.rounds_above, state.active = 0, False
            return Evaluation(current, 0, version, idle="balanced")
        if current > rules.threshold:
            state.rounds_above += 1
        held = state.rounds_above
        if not state.active and held < rules.hold_rounds:
            return Evaluation(current, held, version, idle="holding")
        state.active = True
        if work.busy or work.other:
            return Evaluation(current, held, version, idle="yielding")
        slots = rules.max_in_flight - len(work.automatic)
        if slots <= 0:
            return Evaluation(current, held, version, idle="in_flight_limit")
        proposals: list[Proposal] = []
        busy = set(work.automatic) | set(work.other)
        for _ in range(slots):
            best = self._best_move(fleet, busy)
            if best is None:
                break
            proposals.append(best)
            busy.add(best.move.vm_id)
            fleet = fleet.with_move(best.move)
        return Evaluation(current, held, version, tuple(proposals), None if proposals else "no_gain")

    def _best_move(self, fleet: Fleet, busy: set[str]) -> Proposal | None:
        utils = {h.host: host_utilisation(h) for h in fleet.hosts}
        spread = Spread.of(list(utils.values()))
        before = spread.value
        mean = spread.total / spread.n
        hot = sorted((h for h in fleet.hosts if utils[h.host] > mean), key=lambda h: -utils[h.host])
        best: Proposal | None = None
        best_key = (before, 0)
        for source in hot[: self.rules.source_hosts]:
            for vm in source.vms:
                if vm.vm_id in busy or self.cooling(vm.vm_id):
                    continue
                for name in self.placement.targets(vm, source.host, fleet):
                    target = fleet.host(name)
                    src_after = _without(source, vm)
                    tgt_after = _with(target, vm)
                    after = spread.after(utils[source.host], src_after, utils[name], tgt_after)
                    if before - after < self.rules.min_gain:
                        continue
                    # ties go to the smaller VM: the same gain for less memory copied
                    if best is None or (after, vm.memory_mib) < best_key:
                        best_key = (after, vm.memory_mib)
                        best = Proposal(Move(vm.vm_id, source.host, name), before, after,
                                        utils[source.host], utils[name])
        return best

    def _forget_cooled(self) -> None:
        now = self.clock.now()
        for vm_id in [v for v, at in self.state.moved_at.items() if now - at >= self.rules.cooldown_s]:
            del self.state.moved_at[vm_id]


def _without(h: HostLoad, vm: VmLoad) -> float:
    return utilisation(h.cpu_used - vm.cpu, h.memory_used - vm.memory_used_mib, h.cpus, h.memory_mib)


def _with(h: HostLoad, vm: VmLoad) -> float:
    return utilisation(h.cpu_used + vm.cpu, h.memory_used + vm.memory_used_mib, h.cpus, h.memory_mib)
