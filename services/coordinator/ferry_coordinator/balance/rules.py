"""The balancer's rules against migration storms and ping-pong, as values with their defaults.

Anchors: Proxmox's automatic rebalancing (threshold 0.3 held for 3 rounds, a minimum
improvement, one migration at a time), DRS's migration threshold, Watcher's workload-balance
threshold. Users of all of them complain about storms, VMs moved back and forth, and automatic
moves delaying drains: each rule below answers one of those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class BalanceRules:
    #: imbalance (coefficient of variation of host utilisation, :mod:`.metric`) above which the
    #: fleet is out of balance; Proxmox's default
    threshold: float = 0.3
    #: once it has started, the balancer goes on until the imbalance is at or under this, then
    #: waits for the threshold to be held again: it does not stop just under the threshold for
    #: the next drift to take the fleet back over it (DRS also balances to a target, not to
    #: the edge)
    target: float = 0.2
    #: consecutive evaluations the imbalance must stay above the threshold before a move:
    #: a spike that passes by itself moves nothing (Proxmox: 3 rounds)
    hold_rounds: int = 3
    #: a move must lower the imbalance by at least this much (absolute, in the metric's units);
    #: a move that buys nothing is a migration's cost for nothing. On 100 hosts, a VM holding a
    #: twentieth of a host moved from the hottest to the coolest gains about 0.003
    min_gain: float = 0.001
    #: a VM moved by the balancer is not moved again by it for this long: no ping-pong
    cooldown_s: float = 3600.0
    #: automatic migrations in flight at once, cluster-wide (Proxmox: one)
    max_in_flight: int = 1
    #: seconds between periodic evaluations (events can ask for one sooner)
    interval_s: float = 60.0
    #: only the hottest hosts are sources of a round's moves: the search stays small on a
    #: large fleet, and moving off the hottest host is what lowers the spread most
    source_hosts: int = 3

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value)) or value < 0:
                raise ValueError(f"balance rule {f.name} must be a finite number >= 0, not {value!r}")
        if self.hold_rounds < 1 or self.source_hosts < 1:
            raise ValueError("balance rules hold_rounds and source_hosts must be at least 1")
        if self.target > self.threshold:
            raise ValueError(f"balance rule target ({self.target}) must not exceed threshold ({self.threshold})")
        if self.interval_s <= 0:
            raise ValueError("balance rule interval_s must be positive")
