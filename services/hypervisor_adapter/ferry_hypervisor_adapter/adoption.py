"""The adapter's commands for guests a host already runs: adopt, release, and the check its
migration policy asks for at admission (docs/operations.md, "Adopting guests").

Only drivers that manage existing guests (libvirt) offer ``adopt``/``release``/``adoptable``/
``check_incoming``; on the others adopting is refused and every incoming guest passes the check.
"""

from __future__ import annotations

import logging
from typing import Any

from ferry_common.endpoint import Context
from ferry_common.errors import Conflict, InvalidMessage
from ferry_common.messages.commands import (
    AdoptVm,
    CheckIncoming,
    Done,
    IncomingCheck,
    Refusal,
    ReleaseVm,
    VmAdopted,
)
from ferry_common.messages.public import AdoptableVm

log = logging.getLogger(__name__)


class AdoptionCommands:
    """Mixed into the hypervisor-adapter service."""

    driver: Any
    host: str
    router: Any
    outgoing: dict[str, Any]
    incoming: dict[str, str]

    def add_adoption_routes(self) -> None:
        self.router.add(AdoptVm, self.on_adopt)
        self.router.add(ReleaseVm, self.on_release)
        self.router.add(CheckIncoming, self.on_check_incoming)

    async def publish_inventory(self) -> None:
        raise NotImplementedError

    def _driver_can(self, what: str) -> Any:
        fn = getattr(self.driver, what, None)
        if fn is None:
            raise InvalidMessage(f"the {self.driver.name} driver of {self.host} does not manage existing guests")
        return fn

    async def on_adopt(self, msg: AdoptVm, ctx: Context) -> VmAdopted:
        adopt = self._driver_can("adopt")
        try:
            spec, already = await adopt(msg.domain, msg.storage)
        except LookupError as exc:
            raise InvalidMessage(str(exc)) from None
        except Exception as exc:  # the driver's AdoptionError, or libvirt's own
            raise InvalidMessage(f"cannot adopt {msg.domain!r} on {self.host}: {exc}") from None
        await self.publish_inventory()
        return VmAdopted(vm=spec, already=already)

    async def on_release(self, msg: ReleaseVm, ctx: Context) -> Done:
        release = self._driver_can("release")
        moving = [o.migration_id for o in self.outgoing.values() if o.vm_id == msg.vm_id and o.result is None]
        moving += [mid for mid, vm in self.incoming.items() if vm == msg.vm_id]
        if moving:
            raise Conflict(f"vm {msg.vm_id!r} is migrating ({', '.join(moving)}); release it afterwards")
        try:
            released = await release(msg.vm_id)
        except Exception as exc:
            raise InvalidMessage(f"cannot release {msg.vm_id!r} on {self.host}: {exc}") from None
        await self.publish_inventory()
        return Done(detail={"released": released})

    async def on_check_incoming(self, msg: CheckIncoming, ctx: Context) -> IncomingCheck:
        check = getattr(self.driver, "check_incoming", None)
        refusals: list[Refusal] = await check(msg.vm) if check is not None else []
        return IncomingCheck(refusals=refusals)

    async def adoptable(self) -> list[AdoptableVm]:
        """For the inventory: defined guests the driver could adopt (none if it cannot)."""
        fn = getattr(self.driver, "adoptable", None)
        if fn is None:
            return []
        try:
            found: list[AdoptableVm] = await fn()
        except Exception:
            log.exception("adoptable guests of %s not listed", self.host)
            return []
        return found
