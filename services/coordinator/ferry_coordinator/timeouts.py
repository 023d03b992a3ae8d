"""How long the saga waits at each point, and how hard it tries again."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SagaTimeouts:
    reply_s: float = 10.0  # any request/reply step
    attempts: int = 2  # a lost message is re-sent once (steps are idempotent)
    vm_migration_s: float = 600.0  # upper bound; the driver enforces the per-VM limits
    dirty_round_s: float = 0.05  # how often a dirty round runs while the VM pre-copies
    max_dirty_rounds: int = 1000
    status_poll_s: float = 2.0  # re-ask the source adapter in case a notification was lost
    forward_retry_s: float = 1.0  # after switch-over: back-off between forward retries
    forward_retry_max_s: float = 15.0
    lease_s: float = 15.0  # a replica's hold on a saga
    max_module_rounds: int = 16
    ownership_lease_s: float = 10.0  # how long a host may dispatch a VM's events unrenewed
    # a request for a VM (or host) no inventory shows yet waits at most this long in the queue
    # while the hosts' inventories are not all in (fleet/settled.py), then is rejected
    inventory_wait_s: float = 60.0
    # a migration's progress statuses go out at most once per this (the newest waits, an
    # outcome supersedes it; 0: at the start of every step). Followers are people and
    # dashboards, and every status is a broker publish: one per step cost a sixth of the
    # control plane's rate with hundreds of VMs migrating at once
    progress_interval_s: float = 1.0
