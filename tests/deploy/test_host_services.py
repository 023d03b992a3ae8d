"""The host services as deployed: four workloads per node, each with its own RabbitMQ user and
key, and the users that scripts/rabbitmq-users.sh makes for them (offline: DRY_RUN)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from ferry_common.bus.interfaces import Message
from ferry_common.bus.topology import HOST_SERVICES, host_queue
from ferry_common.errors import Unauthenticated
from ferry_common.security import Authenticator
from ferry_common.signing import auth_factory_from_env, generate_keypair

ROOT = Path(__file__).resolve().parents[2]
USERS = ROOT / "scripts" / "rabbitmq-users.sh"
DEFINITIONS = ROOT / "deploy" / "compose" / "gen_rabbitmq_definitions.py"


def dry_run(hosts: str) -> dict[str, list[str]]:
    """user -> [configure, write, read] regexes the script would set."""
    env = {**os.environ, "DRY_RUN": "1", "FERRY_HOSTS": hosts, "RABBITMQCTL": "rabbitmqctl"}
    out = subprocess.run(["bash", str(USERS)], env=env, capture_output=True, text=True, check=True).stdout
    perms = {}
    for line in out.splitlines():
        words = shlex.split(line)
        if words[1] == "set_permissions":
            perms[words[4]] = words[5:8]
    return perms


def test_fleet_users_are_one_per_service_and_reach_only_their_own_queues() -> None:
    perms = dry_run("*")
    assert {f"ferry-{s}" for s in HOST_SERVICES} <= set(perms)
    for service in HOST_SERVICES:
        configure, _, read = (re.compile(r) for r in perms[f"ferry-{service}"])
        for host in ("host-a", "node-7.rack-2.example.com"):  # node names may hold dots
            own = host_queue(host, service)
            assert configure.fullmatch(own) and read.fullmatch(own), (service, own)
            assert read.fullmatch(f"reply.host.{host}.{service}.0123abcd")
            for other in set(HOST_SERVICES) - {service}:
                assert not read.fullmatch(host_queue(host, other)), (service, other)
                assert not read.fullmatch(f"reply.host.{host}.{other}.0123abcd")
        assert not read.fullmatch("ferry.dead-letter") and not read.fullmatch("ferry.coordinator")


def test_compose_users_are_the_scripts_and_current() -> None:
    proc = subprocess.run([sys.executable, str(DEFINITIONS), "--check"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    defs = json.loads((DEFINITIONS.parent / "rabbitmq" / "definitions.json").read_text())
    users = {u["name"] for u in defs["users"]}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    connects = {name: svc["environment"]["AMQP_URL"] for name, svc in compose.items()
                if "AMQP_URL" in (svc.get("environment") or {})}
    for name, url in connects.items():
        assert url.split("//", 1)[1].split(":", 1)[0] in users, name
    for host in ("host-a", "host-b"):
        for service in HOST_SERVICES:
            name = f"{host}-{service.replace('_', '-')}"
            assert compose[name]["command"] == ["service", service, "--host", host]
            assert connects[name].startswith(f"amqp://ferry-{host}-{service}:")
            assert dry_run(host)[f"ferry-{host}-{service}"] == next(
                [p["configure"], p["write"], p["read"]] for p in defs["permissions"] if p["user"] == f"ferry-{host}-{service}"
            )


def _mounted_keys(tmp: Path, service: str) -> Path:
    """A host service pod's /etc/ferry/keys: the ferry-trust ConfigMap's trust.json (as the base
    ships it) with real public keys, and the service's own private key from its Secret."""
    config = next(d for d in yaml.safe_load_all((ROOT / "deploy/k8s/base/config.yaml").read_text())
                  if d["metadata"]["name"] == "ferry-trust")
    keys = tmp / "all"
    if not keys.is_dir():
        for name in ("coordinator", *HOST_SERVICES, "ops"):
            generate_keypair(keys, name)
    mount = tmp / service
    mount.mkdir()
    (mount / "trust.json").write_text(config["data"]["trust.json"])
    for pub in keys.glob("*.pub"):
        (mount / pub.name).write_bytes(pub.read_bytes())
    (mount / f"{service}.key").write_bytes((keys / f"{service}.key").read_bytes())
    return mount


def test_each_service_signs_with_its_own_key_and_only_as_itself(tmp_path: Path) -> None:
    def auth(service: str) -> Callable[[str], Authenticator]:
        env = {"FERRY_AUTH": "ed25519", "FERRY_KEYS_DIR": str(_mounted_keys(tmp_path, service))}
        return auth_factory_from_env(environ=env)

    sensor, adapter = auth("sensor"), auth("hypervisor_adapter")
    message = Message(routing_key="host.node-1.managed_object", body=b"{}", type="DispatchEvents",
                      message_id="m-1", headers={}, timestamp=time.time())
    as_itself = sensor("host/node-1.example/sensor").sign(message)
    assert adapter("host/node-2/hypervisor_adapter").verify(as_itself) == "host/node-1.example/sensor"
    # the sensor's key, claiming to be the node's hypervisor adapter, is refused by every service
    impostor = sensor("host/node-1.example/hypervisor_adapter").sign(message)
    with pytest.raises(Unauthenticated, match="may sign only as host/\\*/sensor"):
        adapter("host/node-2/hypervisor_adapter").verify(impostor)
