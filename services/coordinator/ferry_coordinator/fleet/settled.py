"""Whether the coordinator's picture of the hosts is whole, so that "no host reports this VM"
means the VM does not exist rather than "its host's inventory is not in yet".

The picture is settled once every host liveness knows is ready and has sent a full inventory
(a heartbeat alone says nothing of its VMs), and ``missed`` of its inventory periods have
passed both since this coordinator started and since the last host became ready again. Right
after a (re)start, or a broker outage that silenced every host, it is not: a request for a
VM or host it does not know then waits in the fleet queue (``Reason.AWAITING_INVENTORY``)
instead of being rejected at once.
"""

from __future__ import annotations

from ferry_common.clock import Clock

from ..hosts import HostRegistry
from .liveness import LivenessTracker


class Settled:
    def __init__(self, clock: Clock, liveness: LivenessTracker, hosts: HostRegistry) -> None:
        self.clock = clock
        self.liveness = liveness
        self.hosts = hosts
        self.since = clock.monotonic()  # the start, or the last host's return
        liveness.subscribe(self._changed)

    def restart(self) -> None:
        """The coordinator (re)starts consuming: what it knows may be out of date."""
        self.since = self.clock.monotonic()

    def _changed(self, host: str, ready: bool) -> None:
        if ready:
            self.since = self.clock.monotonic()

    def window_s(self) -> float:
        """How long the picture must hold still: ``missed`` periods of the slowest host."""
        states = self.liveness.states()
        return max([self.liveness.bound_s(h) for h in states] or [self.liveness.bound_s()])

    def settled(self) -> bool:
        states = self.liveness.states()
        if not states or not all(states.values()) or not all(self.hosts.known(h) for h in states):
            return False
        return self.clock.monotonic() - self.since >= self.window_s()
