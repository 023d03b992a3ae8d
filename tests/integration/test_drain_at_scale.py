"""Issue 15 at scale: two hosts drained at once (50 and 20 VMs) under the limits cluster 5,
outbound 2, inbound 2, on real RabbitMQ with the sim driver moving each VM in about half a
second. Sampled every 100 ms and replayed from the store's history afterwards, no limit is
ever exceeded; every VM ends on a host not drained, moved once, with one active plane and its
events acted on once. (With coordinator kills and a broker restart: tests/faults.)"""

from __future__ import annotations

import time

import pytest

from tests.harness import make_cluster

from .drain_scale_support import HOSTS, drain_two_hosts

pytestmark = [pytest.mark.rabbitmq]


async def test_two_drains_at_once_never_exceed_the_limits(rabbitmq_available: None) -> None:
    c = await make_cluster("rabbitmq", HOSTS)
    try:
        began = time.monotonic()
        await drain_two_hosts(c)
        print(f"70 VMs drained off two hosts in {time.monotonic() - began:.1f} s")
    finally:
        await c.close()
