"""Shared fixtures: which bus, a cluster on it, and the real-service checks."""

from __future__ import annotations

import os
import socket

import pytest


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbitmq_available() -> None:
    from tests.harness import AMQP_PORT

    if not _reachable("127.0.0.1", AMQP_PORT):
        pytest.fail(f"RabbitMQ is not reachable on 127.0.0.1:{AMQP_PORT} (make test starts it; see README)")


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def bus_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "rabbitmq":
        if os.environ.get("FERRY_ONLY_MEMORY") == "1":
            pytest.skip("FERRY_ONLY_MEMORY=1")
        request.getfixturevalue("rabbitmq_available")
    return str(request.param)
