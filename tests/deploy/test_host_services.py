"""The host services as deployed: four workloads per node, each with its own RabbitMQ user and
key, and the users that scripts/rabbitmq-users.sh makes for them (offline: DRY_RUN)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from ferry_common.bus.topology import HOST_SERVICES, host_queue

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
