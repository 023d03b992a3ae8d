"""The drain messages: who may send them, how untyped ones are typed, what is refused."""

from __future__ import annotations

import pytest

from ferry_common.bus.interfaces import Message
from ferry_common.bus.topology import (
    HOST_DRAIN_CANCEL,
    HOST_DRAIN_REQUEST,
    HOST_UNCORDON,
    drain_status,
)
from ferry_common.errors import InvalidMessage
from ferry_common.messages.drains import DrainRequest
from ferry_common.messages.registry import REGISTRY, decode
from ferry_common.signing.permissions import DEFAULT_PERMISSIONS, Permissions


def test_only_clients_drain_cancel_or_uncordon_hosts() -> None:
    perms = Permissions(DEFAULT_PERMISSIONS)
    for type_name in ("DrainRequest", "DrainCancel", "HostUncordon"):
        assert type_name in REGISTRY
        assert perms.allows("client/ops", type_name)
        assert not perms.allows("host/host-a/sensor", type_name)
    for key, type_name in ((HOST_DRAIN_REQUEST, "DrainRequest"), (HOST_DRAIN_CANCEL, "DrainCancel"),
                           (HOST_UNCORDON, "HostUncordon")):
        assert perms.effective_type(Message(routing_key=key, body=b"{}")) == type_name


def test_status_keys() -> None:
    assert drain_status("host-a", "drained") == "host.host-a.drain.drained"


@pytest.mark.parametrize("body", [
    b'{"host": "host-a", "deadline_s": -1}',
    b'{"host": "host-a", "on_unmovable": "ignore"}',
    b'{"host": "host-a", "max_attempts": 0}',
    b'{"host": "host a"}',
    b'{"host": "host-a", "force": true}',
])
def test_bad_requests_are_refused(body: bytes) -> None:
    with pytest.raises(InvalidMessage):
        decode(body, DrainRequest)


def test_defaults() -> None:
    req = decode(b'{"host": "host-a"}', DrainRequest)
    assert (req.dry_run, req.on_unmovable, req.max_attempts, req.deadline_s) == (False, "block", 3, None)
