"""The three-node RabbitMQ cluster of scripts/rabbitmq-cluster.sh, driven from tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rabbitmq-cluster.sh"
NODES = (1, 2, 3)
PORT0 = 5680


def available() -> str | None:
    """Why the cluster cannot run here, or None."""
    if shutil.which("rabbitmq-server") is None and not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists():
        return "rabbitmq-server is not installed (apt-get install rabbitmq-server): no 3-node cluster"
    return None


def run(*args: str, timeout: float = 180.0) -> str:
    r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"rabbitmq-cluster.sh {' '.join(args)}: {r.stderr.strip()[-2000:]}")
    return r.stdout


@dataclass
class RmqCluster:
    """The running cluster; a private vhost per test keeps runs apart."""

    def start(self) -> None:
        # three Erlang VMs booting at once on a busy machine take a while; a start that failed
        # (a node that did not come up in time) is tried once more from a clean slate
        try:
            run("start", timeout=400.0)
        except (RuntimeError, subprocess.TimeoutExpired):
            run("stop")
            run("start", timeout=400.0)

    def stop(self) -> None:
        run("stop")

    def kill(self, node: int) -> None:
        run("kill", str(node))

    def restart(self, node: int) -> None:
        run("restart", str(node))

    def ctl(self, node: int, *args: str) -> str:
        return run("ctl", str(node), *args)

    def new_vhost(self) -> str:
        name = f"ferry-test-{uuid.uuid4().hex[:8]}"
        self.ctl(1, "add_vhost", name)
        self.ctl(1, "set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return name

    def urls(self, vhost: str, *, reconnect_s: float = 0.5) -> list[str]:
        return [f"amqp://guest:guest@127.0.0.1:{PORT0 + i}/{vhost}?reconnect_interval={reconnect_s}" for i in NODES]

    @staticmethod
    def node_of_port(port: int) -> int:
        return port - PORT0

    def quorum_members(self, vhost: str) -> dict[str, int]:
        """How many nodes hold each quorum queue of ``vhost``."""
        out = self.ctl(1, "list_queues", "-p", vhost, "name", "type", "members", "--formatter", "json")
        return {q["name"]: len(q.get("members") or []) for q in json.loads(out) if q.get("type") == "quorum"}
