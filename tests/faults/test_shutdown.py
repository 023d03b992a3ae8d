"""A service told to stop stops, also while the broker is away (a pod being replaced during a
broker outage must not wait for the kubelet's SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.procs import FERRY, free_port
from tests.harness import amqp_url, drop_vhost, make_vhost

pytestmark = [pytest.mark.rabbitmq, pytest.mark.usefixtures("rabbitmq_available")]


def test_a_service_stops_on_sigterm_while_the_broker_is_away(tmp_path: Path) -> None:
    vhost = make_vhost()
    env = {**os.environ, "AMQP_URL": amqp_url(vhost), "FERRY_STATE_DIR": str(tmp_path),
           "FERRY_HEALTH_PORT": str(free_port()), "FERRY_TRACE_COLLECT": "0"}
    proc = subprocess.Popen([FERRY, "service", "sensor", "--host", "hx"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while "sensor up on hx" not in (line := proc.stdout.readline()):
            assert line and time.monotonic() < deadline, "the sensor did not start"
        drop_vhost(vhost)  # the broker closes its connection and refuses it from now on
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=25) == 0
        assert time.monotonic() - started < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        drop_vhost(vhost)
