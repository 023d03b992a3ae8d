"""Fixtures of the fault suite: the process cluster in a private vhost, the soak switch,
broker-restart tests last, and the table at the end of the run."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import rmq_cluster as rmq_cluster_mod
from tests.faults.procs import ProcCluster
from tests.faults.report import RESULTS
from tests.faults.rmq_cluster import RmqCluster
from tests.harness import drop_vhost, make_vhost, rabbitmqctl

SOAK = os.environ.get("FERRY_SOAK") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "broker_restart: restarts the whole RabbitMQ app; runs last")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Broker restarts disturb every connection: run them after everything else."""
    items.sort(key=lambda item: item.get_closest_marker("broker_restart") is not None)


def broker_running() -> bool:
    r = subprocess.run(rabbitmqctl("await_startup", "--timeout", "5"), capture_output=True, check=False)
    return r.returncode == 0


def ensure_broker() -> None:
    """Whatever a test did, leave RabbitMQ's app running."""
    if not broker_running():
        subprocess.run(rabbitmqctl("start_app"), capture_output=True, check=False)
        subprocess.run(rabbitmqctl("await_startup", "--timeout", "60"), capture_output=True, check=False)


@pytest.fixture(scope="session")
def procs(rabbitmq_available: None) -> Iterator[ProcCluster]:
    """Coordinator and the services of two hosts as processes, each behind a fault proxy."""
    vhost = make_vhost()
    root = Path(tempfile.mkdtemp(prefix="ferry-faults-"))
    cluster = ProcCluster(root, vhost)
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()
        ensure_broker()
        drop_vhost(vhost)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS.cases:
        return
    RESULTS.write()
    terminalreporter.write_sep("=", "fault injection")
    terminalreporter.write(RESULTS.render())
    terminalreporter.write_line(f"(also in {Path(__file__).with_name('last-run.txt')})")


@pytest.fixture(scope="session")
def rmq_cluster() -> Iterator[RmqCluster]:
    """Three RabbitMQ nodes of the session's own (scripts/rabbitmq-cluster.sh), torn down after."""
    why = rmq_cluster_mod.available()
    if why:
        pytest.skip(why)
    c = RmqCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()
