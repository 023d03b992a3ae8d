"""The public contract as data: its channels and their messages, and the AsyncAPI document.

``docs/asyncapi.yaml`` is generated from this declaration and the models of the message
registry (``scripts/gen_asyncapi.py``); ``make lint`` and ``tests/deploy/test_asyncapi.py``
fail when the committed document is not what this module generates. Channel addresses come
from :mod:`ferry_common.bus.topology`, payload schemas from the pydantic models, so neither
is written twice.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal, get_args

from ..bus import topology
from .limits import Name
from .public import Status
from .registry import model_for

Operation = Literal["publish", "subscribe"]


@dataclass(frozen=True)
class Channel:
    """One routing key (or key template) on the ``ferry`` exchange and what travels on it.

    ``operation`` is the client's side, as AsyncAPI 2 has it: ``publish`` the client sends,
    ``subscribe`` the client receives.
    """

    address: str
    operation: Operation
    operation_id: str
    messages: tuple[str, ...]
    description: str
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)


_ID = {"schema": {"type": "string"}}

CHANNELS: tuple[Channel, ...] = (
    Channel(
        topology.MIGRATION_REQUESTED, "publish", "requestMigration", ("MigrateRequest",),
        "Start a migration. Publishing the same `migration_id` twice starts one migration.",
    ),
    Channel(
        topology.MIGRATION_CANCEL, "publish", "cancelMigration", ("MigrationCancel",),
        "Cancel a migration at any step before the VM switches over to the target; it ends\n"
        "`rolled_back` with code `cancelled`. After the switch-over it completes.\n",
    ),
    Channel(
        topology.migration_status("{status}"), "subscribe", "followMigrations", ("MigrationStatusEvent",),
        "Progress and outcome of every migration. `accepted` once the request was taken;\n"
        "`progress` at the start of each saga step (`step` set) and while the hypervisor\n"
        "migrates (`detail`: RAM transferred/remaining, dirty-page rate, passes, percent).\n"
        "A progress status is a sample: the coordinator sends a migration's step statuses at\n"
        "most once per `FERRY_PROGRESS_INTERVAL_S` (1 s by default; 0: every step), and while\n"
        "one is on its way or the interval runs, a newer one replaces one still waiting, so a\n"
        "fast step may not be announced (the record's history, `ferry migrations`, has every\n"
        "step);\n"
        "`failed` when a step failed and compensation begins (`code`, `reason`); then exactly\n"
        "one of the outcomes `completed`, `rolled_back` or `rejected`.\n",
        {"status": {"schema": {"type": "string", "enum": list(get_args(Status))}}},
    ),
    Channel(
        topology.vm_events("{vm_id}"), "publish", "sendEvent", ("VmEvent", "VmEventBatch"),
        "A service-plane event for one VM. The host whose management plane owns the VM takes\n"
        "it; while the VM migrates both source and target take it and the saga makes sure each\n"
        "event acts exactly once, in time order, on whichever host the VM ends on.\n"
        "A collector may send up to 1,000 events of the VM in one message instead\n"
        "(AMQP `type` property `VmEventBatch`; without a type the body is one `VmEvent`):\n"
        "the sensor takes them as it would take them one by one, and the broker carries one\n"
        "message instead of a thousand.\n",
        {"vm_id": _ID},
    ),
    Channel(
        topology.alarm("{vm_id}"), "subscribe", "followAlarms", ("Alarm",),
        "An alarm raised by one of the VM's policies (raised once, until cleared).",
        {"vm_id": _ID},
    ),
    Channel(
        topology.HOST_DRAIN_REQUEST, "publish", "drainHost", ("DrainRequest",),
        "Drain a host for maintenance: it is cordoned (placement skips it) and every VM on it\n"
        "gets a migration at drain priority. Publishing the same `drain_id` twice starts one\n"
        "drain; a host has at most one drain running. With a reply-to the coordinator answers\n"
        "a `DrainStatusEvent`, or with `dry_run` the `DrainPlan` (each VM, its target, the\n"
        "order, an estimate, and the VMs that cannot move with the reason), changing nothing.\n",
    ),
    Channel(
        topology.HOST_DRAIN_CANCEL, "publish", "cancelDrain", ("DrainCancel",),
        "Cancel a host's drain: its queued migrations never start; with `abort` those in\n"
        "flight roll back too. The host stays cordoned.\n",
    ),
    Channel(
        topology.HOST_UNCORDON, "publish", "uncordonHost", ("HostUncordon",),
        "Let placement choose the host again; with `return_vms` the VMs its last drain moved\n"
        "away are queued to move back.\n",
    ),
    Channel(
        topology.drain_status("{host}", "{status}"), "subscribe", "followDrains", ("DrainStatusEvent",),
        "A drain's state and progress (total, done, failed, in flight, queued, unmovable and\n"
        "the estimated time left from measured migration times): `draining` whenever the\n"
        "counts change, then one of `drained`, `failed` (naming the VMs that failed or cannot\n"
        "move) or `cancelled`.\n",
        {"host": _ID, "status": {"schema": {"type": "string", "enum": ["draining", "drained", "failed", "cancelled"]}}},
    ),
)

#: Examples shown with a message (AsyncAPI ``examples``).
EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "MigrateRequest": [{"vm_id": "web-01", "target_host": "host-b", "migration_id": "m-2026-11-25-001"}],
    "DrainRequest": [{"host": "host-a", "drain_id": "maint-2026-12-01", "on_unmovable": "block"}],
}

DESCRIPTION = """\
How a client starts, follows and cancels a migration, and how service-plane events
reach a VM's management plane. Everything goes through the durable topic exchange
`ferry` on RabbitMQ. Bodies are JSON (UTF-8), unknown fields are refused.

Publish with the `mandatory` flag and publisher confirms: a message that no queue
takes is returned to you (for example a `vm.<id>.event` for a VM no host owns).

With message signing on (`FERRY_AUTH=ed25519`, see docs/security.md) every message
carries `x-ferry-sender`, `x-ferry-key-id` and `x-ferry-signature` headers, and only
identities listed in the permissions may publish `MigrateRequest` / `MigrationCancel`.
Trace context travels in the W3C `traceparent` / `tracestate` headers.
"""

_EXCHANGE = {"name": topology.EXCHANGE, "type": "topic", "durable": True, "autoDelete": False, "vhost": "/"}


def _name_schema() -> dict[str, Any]:
    from pydantic import TypeAdapter

    schema = TypeAdapter(Name).json_schema()
    schema.pop("title", None)
    return schema


def _tidy(node: Any, name_schema: dict[str, Any]) -> Any:
    """Drop pydantic's titles, point ``$defs`` at ``components/schemas`` and every inline
    ``Name`` at the one shared schema."""
    if isinstance(node, list):
        return [_tidy(n, name_schema) for n in node]
    if not isinstance(node, dict):
        return node
    if {k: v for k, v in node.items() if k != "title"} == name_schema:
        return {"$ref": "#/components/schemas/Name"}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" and not isinstance(value, dict):
            continue  # a keyword, not a property called "title"
        if key == "$ref" and isinstance(value, str):
            out[key] = value.replace("#/$defs/", "#/components/schemas/")
        elif key == "properties":
            out[key] = {prop: _tidy(s, name_schema) for prop, s in value.items()}
        else:
            out[key] = _tidy(value, name_schema)
    return out


def _message(type_name: str, schemas: dict[str, Any], name_schema: dict[str, Any]) -> dict[str, Any]:
    payload = copy.deepcopy(model_for(type_name).model_json_schema())
    for def_name, schema in payload.pop("$defs", {}).items():
        schemas[def_name] = _tidy(schema, name_schema)
    description = payload.pop("description", None)
    message: dict[str, Any] = {"name": type_name}
    if description:
        message["description"] = description
    message["payload"] = _tidy(payload, name_schema)
    if type_name in EXAMPLES:
        message["examples"] = [{"payload": e} for e in EXAMPLES[type_name]]
    return message


def _channel(ch: Channel) -> dict[str, Any]:
    refs = [{"$ref": f"#/components/messages/{m}"} for m in ch.messages]
    out: dict[str, Any] = {"description": ch.description}
    if ch.parameters:
        out["parameters"] = ch.parameters
    out["bindings"] = {"amqp": {"is": "routingKey", "exchange": dict(_EXCHANGE)}}
    out[ch.operation] = {
        "operationId": ch.operation_id,
        "message": refs[0] if len(refs) == 1 else {"oneOf": refs},
    }
    return out


def _version() -> str:
    try:
        return metadata.version("ferry")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 2.6 document of the public contract, as a plain mapping."""
    name_schema = _name_schema()
    schemas: dict[str, Any] = {"Name": name_schema}
    messages: dict[str, Any] = {}
    for ch in CHANNELS:
        for type_name in ch.messages:
            messages.setdefault(type_name, _message(type_name, schemas, name_schema))
    return {
        "asyncapi": "2.6.0",
        "info": {"title": "Ferry public contract", "version": _version(), "description": DESCRIPTION},
        "servers": {
            "rabbitmq": {"url": "amqp://127.0.0.1:5672/", "protocol": "amqp", "protocolVersion": "0.9.1"}
        },
        "defaultContentType": "application/json",
        "channels": {ch.address: _channel(ch) for ch in CHANNELS},
        "components": {"schemas": schemas, "messages": messages},
    }
