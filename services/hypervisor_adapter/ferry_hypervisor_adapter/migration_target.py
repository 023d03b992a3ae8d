"""Migration, target side (step 5): the incoming guest prepared, adopted, or destroyed on
rollback.

An adopted incoming guest is remembered (the newest ``ADOPTED_KEPT``) while its migration
may still roll back: the saga may not have seen the answer, and a clean-up must destroy it
too, never leaving the guest running on both hosts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ferry_common.endpoint import Context
from ferry_common.errors import FerryError
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import (
    CleanupTarget,
    Done,
    FinishIncoming,
    IncomingPrepared,
    PrepareIncoming,
)

from .drivers import MigrationParams

if TYPE_CHECKING:
    from .service import HypervisorAdapterService

log = logging.getLogger(__name__)
ADOPTED_KEPT = 256  # adopted incoming guests remembered for a late CleanupTarget


class MigrationTarget:
    """The target-side migration steps of one hypervisor adapter; its prepared guests are the
    service's ``incoming``."""

    def __init__(self, svc: HypervisorAdapterService) -> None:
        self.svc = svc
        # incoming guests adopted by FinishIncoming whose migration may still roll back (the
        # saga did not see the answer): CleanupTarget must destroy them too
        self.adopted: dict[str, str] = {}

    async def restore(self) -> None:
        self.svc.incoming = dict(await self.svc.state.items("incoming"))
        self.adopted = dict(await self.svc.state.items("adopted"))

    async def on_prepare(self, msg: PrepareIncoming, ctx: Context) -> Wire:
        params = MigrationParams.from_dict(dict(msg.params))
        try:
            if msg.ready_only:
                uri = await self.svc.driver.take_ready_incoming(msg.vm)
            else:
                uri = await self.svc.driver.prepare_incoming(msg.vm, params)
        except Exception as exc:
            raise FerryError(f"cannot prepare incoming vm {msg.vm_id!r}: {exc}", code="incoming_failed") from exc
        if uri is None:
            return IncomingPrepared(uri="", source_resumable=self.svc.source_resumable)
        self.svc.incoming[msg.migration_id] = msg.vm_id
        await self.svc.state.put("incoming", msg.migration_id, msg.vm_id)
        return IncomingPrepared(uri=uri, source_resumable=self.svc.source_resumable)

    async def on_finish_incoming(self, msg: FinishIncoming, ctx: Context) -> Done:
        if not await self.svc.driver.finish_incoming(msg.vm_id):
            raise FerryError(f"vm {msg.vm_id!r} does not run on {self.svc.host!r} after migration", code="not_running")
        self.adopted[msg.migration_id] = msg.vm_id
        await self.svc.state.put("adopted", msg.migration_id, msg.vm_id)
        while len(self.adopted) > ADOPTED_KEPT:
            oldest = next(iter(self.adopted))
            del self.adopted[oldest]
            await self.svc.state.delete("adopted", oldest)
        self.svc.incoming.pop(msg.migration_id, None)
        await self.svc.state.delete("incoming", msg.migration_id)
        self.svc.announce()
        return Done()

    async def on_cleanup_target(self, msg: CleanupTarget, ctx: Context) -> Done:
        adopted = msg.migration_id in self.adopted
        ours = adopted or msg.migration_id in self.svc.incoming
        if ours or await self.svc.driver.state(msg.vm_id) == "inmigrate":
            if not self.svc.source_resumable and await self.svc.driver.state(msg.vm_id) == "running":
                # the hypervisor completed and ended the source (libvirt peer-to-peer): this is
                # the only copy left. The saga goes forward in that case; never destroy it here
                log.warning("cleanup of %s: vm %s runs here and its source is gone; kept",
                            msg.migration_id, msg.vm_id)
                return Done(detail={"kept": "running"})
            await self.svc.driver.abort_incoming(msg.vm_id)
            if ours and await self.svc.driver.state(msg.vm_id) != "absent":
                # the hypervisor finished just as the saga rolled back: whether FinishIncoming
                # adopted this copy or not, the saga never saw it confirmed and the source
                # resumes its paused original, so this one must go (never both running)
                await self.svc.driver.destroy(msg.vm_id)
            if self.adopted.pop(msg.migration_id, None) is not None:
                await self.svc.state.delete("adopted", msg.migration_id)
                await self.svc.publish_inventory()
            self.svc.incoming.pop(msg.migration_id, None)
            await self.svc.state.delete("incoming", msg.migration_id)
        return Done()
