"""The coordinator's side of the drain messages: DrainRequest, DrainCancel, HostUncordon and
GetDrain, answered by the drain manager (a reply for a client that asked, nothing otherwise)."""

from __future__ import annotations

from ferry_common.bus.topology import HOST_DRAIN_CANCEL, HOST_DRAIN_REQUEST, HOST_UNCORDON
from ferry_common.endpoint import Context, Router
from ferry_common.ids import new_id
from ferry_common.messages.base import Wire
from ferry_common.messages.drains import (
    DrainCancel,
    DrainRequest,
    DrainStatusEvent,
    GetDrain,
    HostUncordon,
)

from .drain_manager import DrainManager

#: what the coordinators' shared queue takes for drains
KEYS = (HOST_DRAIN_REQUEST, HOST_DRAIN_CANCEL, HOST_UNCORDON)


class DrainEndpoint:
    def __init__(self, manager: DrainManager) -> None:
        self.manager = manager

    def install(self, router: Router) -> None:
        router.route_key(HOST_DRAIN_REQUEST, DrainRequest)
        router.route_key(HOST_DRAIN_CANCEL, DrainCancel)
        router.route_key(HOST_UNCORDON, HostUncordon)
        router.add(DrainRequest, self.on_drain)
        router.add(DrainCancel, self.on_cancel)
        router.add(HostUncordon, self.on_uncordon)
        router.add(GetDrain, self.on_get)

    async def on_drain(self, msg: DrainRequest, ctx: Context) -> Wire:
        # without a client-chosen id, the message's: a redelivery is the same drain
        drain_id = msg.drain_id or _safe(ctx.message.message_id) or new_id()
        return await self.manager.request(msg, drain_id, ctx.sender)

    async def on_cancel(self, msg: DrainCancel, ctx: Context) -> DrainStatusEvent:
        return await self.manager.cancel(msg.host, abort=msg.abort)

    async def on_uncordon(self, msg: HostUncordon, ctx: Context) -> DrainStatusEvent:
        return await self.manager.uncordon(msg.host, return_vms=msg.return_vms)

    async def on_get(self, msg: GetDrain, ctx: Context) -> DrainStatusEvent:
        return await self.manager.status(msg.host)


def _safe(message_id: str | None) -> str | None:
    # a drain id goes into migration ids: letters, digits, '-' only, and short
    if message_id and len(message_id) <= 64 and all(c.isalnum() or c == "-" for c in message_id):
        return message_id
    return None
