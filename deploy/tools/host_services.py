"""Deployment rules for the host services (used by validate_deploy.py).

Each of a host's services runs as its own container (``ferry service NAME``, never the
four-in-one ``ferry service host``), with a RabbitMQ user and a signing key of its own:

* Kubernetes: every render that runs one host service runs all four, each in a workload of
  its own, and no two of them share an AMQP Secret or a key Secret;
* Compose: every host that runs one host service runs all four, each a compose service of its
  own, and no two services (coordinator and clients included) connect as the same user.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "libs" / "common"))
from ferry_common.bus.topology import HOST_SERVICES  # noqa: E402  (pure names, no dependencies)

Error = Callable[[str, str], None]
ALL_IN_ONE = "host"


def _service_of(args: list[Any]) -> str | None:
    """NAME of ``service NAME ...`` (container args or compose command), else None."""
    words = [str(a) for a in args or []]
    if len(words) >= 2 and words[0] == "service":
        return words[1]
    return None


def _containers(obj: dict[str, Any], pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("containers") or []


def _secrets_of(container: dict[str, Any], pod: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(Secrets it takes its environment from, Secrets in the volumes it mounts)."""
    env = {s["secretRef"]["name"] for s in container.get("envFrom") or [] if "secretRef" in s}
    mounted = {m["name"] for m in container.get("volumeMounts") or []}
    files: set[str] = set()
    for vol in pod.get("volumes") or []:
        if vol.get("name") not in mounted:
            continue
        if "secret" in vol:
            files.add(vol["secret"]["secretName"])
        for src in (vol.get("projected") or {}).get("sources") or []:
            if "secret" in src:
                files.add(src["secret"]["name"])
    return env, files


def check_k8s(
    objs: list[dict[str, Any]], where: str, error: Error, pod_spec: Callable[[dict[str, Any]], Any]
) -> None:
    """The rules above over one rendered set of objects."""
    runs: dict[str, list[str]] = defaultdict(list)  # host service -> workloads running it
    amqp: dict[str, set[str]] = defaultdict(set)  # Secret -> host services taking it
    keys: dict[str, set[str]] = defaultdict(set)
    for obj in objs:
        pod = pod_spec(obj)
        if pod is None:
            continue
        label = f"{where}: {obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        in_this = [s for c in _containers(obj, pod) if (s := _service_of(c.get("args") or c.get("command")))]
        if ALL_IN_ONE in in_this:
            error(label, "runs `ferry service host` (four services in one process): run each host "
                         "service as its own workload (docs/operations.md, Host services)")
        hosted = [s for s in in_this if s in HOST_SERVICES]
        if len(hosted) > 1:
            error(label, f"runs {', '.join(hosted)} together: one host service per workload")
        for c in _containers(obj, pod):
            service = _service_of(c.get("args") or c.get("command"))
            if service not in HOST_SERVICES:
                continue
            runs[service].append(label)
            env, files = _secrets_of(c, pod)
            for name in env:
                amqp[name].add(service)
            for name in files:
                keys[name].add(service)
            if not env:
                error(label, f"{service} takes no Secret for its RabbitMQ connection (envFrom secretRef)")
            if not files:
                error(label, f"{service} mounts no Secret with its signing key")
    if runs:
        for service in HOST_SERVICES:
            if not runs.get(service):
                error(where, f"runs {', '.join(sorted(runs))} but not {service}")
            elif len(runs[service]) > 1:
                error(where, f"{service} runs in several workloads: {', '.join(runs[service])}")
    for kind, table in (("RabbitMQ (AMQP) Secret", amqp), ("key Secret", keys)):
        for name, services in sorted(table.items()):
            if len(services) > 1:
                error(where, f"{', '.join(sorted(services))} share the {kind} {name}: each needs its own")


def check_compose(services: dict[str, Any], where: str, error: Error) -> None:
    """The rules above over a compose file's services."""
    per_host: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    users: dict[str, list[str]] = defaultdict(list)
    for name, svc in services.items():
        command = svc.get("command")
        words = command.split() if isinstance(command, str) else list(command or [])
        service = _service_of(words)
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env if "=" in e)
        if service == ALL_IN_ONE:
            error(where, f"{name} runs `ferry service host` (four services in one process): "
                         "one compose service per host service")
        if service in HOST_SERVICES:
            host = words[words.index("--host") + 1] if "--host" in words[:-1] else env.get("FERRY_HOST", "?")
            per_host[host][service].append(name)
        url = env.get("AMQP_URL")
        if url:
            users[urlsplit(str(url)).username or ""].append(name)
        elif service:
            error(where, f"{name} has no AMQP_URL: it must connect as its own RabbitMQ user")
    for host, running in sorted(per_host.items()):
        for service in HOST_SERVICES:
            if not running.get(service):
                error(where, f"host {host} runs {', '.join(sorted(running))} but not {service}")
            elif len(running[service]) > 1:
                error(where, f"host {host}'s {service} runs in several services: {', '.join(running[service])}")
    for user, names in sorted(users.items()):
        if len(names) > 1:
            error(where, f"{', '.join(names)} connect as the same RabbitMQ user {user!r}: each needs its own")
