"""Identities, identity patterns and who may send which message type."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import translate
from pathlib import Path

from ..bus.interfaces import Message
from ..bus.topology import (
    ALARMS,
    HOST_DRAIN_CANCEL,
    HOST_DRAIN_REQUEST,
    HOST_EVENTS,
    HOST_LOADS,
    HOST_UNCORDON,
    INVENTORIES,
    MIGRATION_CANCEL,
    MIGRATION_REQUESTED,
    VM_EVENTS,
)

# Letters, digits, ``.``, ``_``, ``-`` in ``/``-separated segments. Keeping ``*?[]`` out of
# identities means a sender can never smuggle a pattern, and logs stay one line.
_IDENTITY = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,7}"
)

_EVERYONE = ["client/*", "host/*", "coordinator"]

#: The policy used when a key directory has no ``permissions.json``.
DEFAULT_PERMISSIONS: dict[str, list[str]] = {
    # the public contract: only configured clients start or stop migrations
    "MigrateRequest": ["client/*", "coordinator"],
    "MigrationCancel": ["client/*"],
    # host maintenance moves every VM of a host: operators only, as MigrateRequest
    "DrainRequest": ["client/*"],
    "DrainCancel": ["client/*"],
    "HostUncordon": ["client/*"],
    "GetDrain": ["client/*"],
    # read-only queries the CLI makes
    "ListMigrations": ["client/*"],
    "GetTrace": ["client/*"],
    "ListHosts": ["client/*"],
    # reads the limits, or (with a value) changes them: an operator's command
    "GetLimits": ["client/*"],
    "Inspect": _EVERYONE,
    "HealthCheck": _EVERYONE,
    # provisioning and event injection the CLI does (ferry_cli.client): every client is an
    # operator by default; narrow these to e.g. "client/ops-*" in permissions.json
    "CreateVm": _EVERYONE,
    "RegisterManagementGraph": _EVERYONE,
    "ActivateVmEvents": _EVERYONE,
    "AdoptVm": _EVERYONE,
    "ReleaseVm": _EVERYONE,
    "SetAttributes": _EVERYONE,
    # a VM's plane as a file (ferry plane apply/get): only operators write or read it
    "ApplyPlane": ["client/*"],
    "GetPlane": ["client/*"],
    "VmEvent": _EVERYONE,
    "VmEventBatch": _EVERYONE,
    # the balancer (docs/balancing.md): a host fault may come from any monitoring agent;
    # recommendations and the automation level are the operators'
    "HostFaultEvent": _EVERYONE,
    "ListRecommendations": ["client/*"],
    "ApplyRecommendation": ["client/*"],
    "SetAutomationLevel": ["client/*"],
    # everything else is service-to-service traffic
    "*": ["host/*", "coordinator"],
}

#: Public messages may arrive without an AMQP ``type``; the router then types them by
#: routing key. Permissions must judge the type the handler will see, not the empty one.
DEFAULT_ROUTE_TYPES: dict[str, str] = {
    MIGRATION_REQUESTED: "MigrateRequest",
    MIGRATION_CANCEL: "MigrationCancel",
    HOST_DRAIN_REQUEST: "DrainRequest",
    HOST_DRAIN_CANCEL: "DrainCancel",
    HOST_UNCORDON: "HostUncordon",
    VM_EVENTS: "VmEvent",
    INVENTORIES: "HostInventory",
    ALARMS: "Alarm",
    HOST_EVENTS: "HostFaultEvent",
    HOST_LOADS: "HostLoad",
}



def valid_identity(identity: str) -> bool:
    """Whether ``identity`` is well formed (``coordinator``, ``host/host-a/sensor``, ...)."""
    return _IDENTITY.fullmatch(identity) is not None


def _compile(pattern: str) -> re.Pattern[str]:
    # fnmatchcase semantics (``*`` also crosses ``/``), compiled once instead of per message
    return re.compile(translate(pattern))


class Patterns:
    """A set of fnmatch patterns, matched case-sensitively."""

    __slots__ = ("patterns", "_compiled")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._compiled = tuple(_compile(p) for p in self.patterns)

    def match(self, name: str) -> bool:
        return any(c.match(name) for c in self._compiled)





class Permissions:
    """Which identities may send which message types.

    Built from a mapping of message type to identity patterns (``fnmatch`` syntax)::

        {"MigrateRequest": ["client/*", "coordinator"],
         "MigrationCancel": ["client/*"],
    # host maintenance moves every VM of a host: operators only, as MigrateRequest
    "DrainRequest": ["client/*"],
    "DrainCancel": ["client/*"],
    "HostUncordon": ["client/*"],
    "GetDrain": ["client/*"],
         "*": ["host/*", "coordinator"]}

    A type with its own entry is governed by that entry only (so ``*`` does not let hosts
    send ``MigrationCancel``); other types fall back to ``*``; without ``*`` they are
    denied. A message without an AMQP type takes the type its routing key implies
    (``route_types``, fnmatch on the routing key), as the router does; an untyped message
    on any other routing key is denied.
    """

    def __init__(
        self,
        rules: Mapping[str, Sequence[str]],
        *,
        route_types: Mapping[str, str] | None = None,
    ) -> None:
        for type_name, patterns in rules.items():
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(
                    f"permissions for {type_name!r} must be a list of identity patterns"
                )
        self._rules = {t: Patterns(p) for t, p in rules.items() if t != "*"}
        self._default = Patterns(rules["*"]) if "*" in rules else None
        routes = DEFAULT_ROUTE_TYPES if route_types is None else route_types
        self._routes = tuple((_compile(k), v) for k, v in routes.items())
        # decisions are asked about authenticated senders only, so this stays small
        self._cache: dict[tuple[str, str], bool] = {}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Sequence[str]]) -> Permissions:
        """Build from a plain mapping, as read from ``permissions.json``."""
        return cls(mapping)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Permissions:
        """Read a JSON object of message type to list of identity patterns."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of type -> [identity patterns]")
        return cls(data)

    def effective_type(self, message: Message) -> str:
        """The type the handler will see: the AMQP type, else the one the routing key implies."""
        if message.type:
            return message.type
        for pattern, type_name in self._routes:
            if pattern.match(message.routing_key):
                return type_name
        return ""

    def allows(self, identity: str, type_name: str) -> bool:
        """Whether ``identity`` may send messages of ``type_name``."""
        key = (identity, type_name)
        decision = self._cache.get(key)
        if decision is None:
            rule = self._rules.get(type_name, self._default) if type_name else None
            decision = rule is not None and rule.match(identity)
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[key] = decision
        return decision

