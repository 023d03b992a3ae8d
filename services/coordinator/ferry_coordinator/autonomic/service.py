"""The coordinator's autonomic module: the balancer loop, and what policies and faults ask for.

Every replica keeps the hosts' load samples (``host.*.load``, a private queue). One replica
at a time balances: the one holding the balancer's lease in the saga store
(:mod:`.ledger`), taken or renewed at the start of every round. A round runs every
``rules.interval_s``, and sooner on a load sample or a fault (at most one per
``interval_s / 3``: the hold counts evaluations, and a sample per host must not count as many).
What policies (``MigrationWanted``, ``EvacuationWanted``), faults (``HostFaultEvent``) and
operators (``ApplyRecommendation``, ``SetAutomationLevel``, ``ListRecommendations``, as
coordinator queries) send is taken by one replica each; every decision lands in the store
(queue entries, the ledger's row) by compare-and-set, so two replicas never act twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ferry_common.aio import cancel_and_wait, one_pass
from ferry_common.bus.interfaces import Consumer, QueueSpec
from ferry_common.bus.topology import (
    AUTONOMIC_QUEUE,
    AUTONOMIC_WANTED,
    HOST_EVENTS,
    HOST_LOADS,
    recommendation_status,
)
from ferry_common.clock import sleep_or_set
from ferry_common.endpoint import Context, Router
from ferry_common.errors import Conflict, FerryError, InvalidMessage
from ferry_common.messages.commands import Done
from ferry_common.messages.host_events import GuestLoad, HostFaultEvent, HostLoad
from ferry_common.messages.recommendations import (
    ApplyRecommendation,
    AutomationLevel,
    EvacuationWanted,
    ListRecommendations,
    MigrationWanted,
    MoveReason,
    Recommendation,
    RecommendationEvent,
    RecommendationList,
    SetAutomationLevel,
)

from ..balance import (
    AutomationPolicy,
    BalanceCycle,
    Balancer,
    BalancerState,
    BalanceRules,
    RecommendationBook,
    inventory_version,
)
from ..balance.recommendations import RecommendationError
from ..fleet.queue import Priority
from .ledger import Doc, Ledger, acquire
from .moves import derived_id, enqueue_move
from .snapshot import LEVEL_PARAM, FilteredPlacement, Snapshot, build
from .wanted import Wanted

if TYPE_CHECKING:
    from ..service import CoordinatorService

log = logging.getLogger(__name__)


@dataclass
class AutonomicOptions:
    rules: BalanceRules = field(default_factory=BalanceRules)
    #: the cluster's level until an operator changes it at run time (FERRY_AUTOMATION_LEVEL)
    level: AutomationLevel = "manual"
    #: the balancer's lease: how soon another replica takes over from one that died
    lease_s: float = 15.0
    enabled: bool = True


class AutonomicService:
    def __init__(self, coordinator: CoordinatorService, options: AutonomicOptions | None = None) -> None:
        self.c = coordinator
        self._options = options or AutonomicOptions()
        self._stir = asyncio.Event()  # a poke or new options: look again at when to run
        self._poked = False
        self.endpoint = coordinator.endpoint
        self.clock = coordinator.endpoint.clock
        self.ledger: Ledger = coordinator.store.balancer
        self.loads: dict[str, HostLoad] = {}
        self.guests: dict[str, GuestLoad] = {}  # each VM's last sample, wherever it was taken
        self.leading = False
        self.last_round: Any = None  # the last RoundResult (tests, ferry recommendations)
        self._last_at = -1e18
        self._task: asyncio.Task[None] | None = None
        self._renewal: asyncio.Task[None] | None = None
        # a round and a renewal of this replica's lease never interleave (each is a CAS)
        self._row = asyncio.Lock()
        self._consumers: list[Consumer] = []
        self.wanted = Wanted(self)
        self.router = Router()
        self.router.route_key(HOST_EVENTS, HostFaultEvent)
        self.router.add(HostFaultEvent, self.wanted.on_fault)
        self.router.add(MigrationWanted, self.wanted.on_migration_wanted)
        self.router.add(EvacuationWanted, self.wanted.on_evacuation_wanted)
        self.private = Router()
        self.private.route_key(HOST_LOADS, HostLoad)
        self.private.add(HostLoad, self.on_load)

    @property
    def options(self) -> AutonomicOptions:
        return self._options

    @options.setter
    def options(self, value: AutonomicOptions) -> None:
        """New rules take effect at once: the loop stops waiting out the old interval."""
        self._options = value
        self._stir.set()

    def route(self, queries: Router) -> None:
        """The operators' commands, on the coordinator's own queries (``coordinator.query``)."""
        queries.add(ListRecommendations, self.on_list)
        queries.add(ApplyRecommendation, self.on_apply)
        queries.add(SetAutomationLevel, self.on_set_level)

    async def start(self) -> None:
        if not self.options.enabled:
            return
        # named coordinator.*: the coordinator's RabbitMQ user may declare only those
        private = QueueSpec(f"{AUTONOMIC_QUEUE}.{self.c.owner}", (HOST_LOADS,), durable=False, prefetch=256)
        shared = QueueSpec(AUTONOMIC_QUEUE, (AUTONOMIC_WANTED, HOST_EVENTS), prefetch=32)
        self._consumers.append(await self.endpoint.serve(private, self.private))
        self._consumers.append(await self.endpoint.serve(shared, self.router))
        self._task = asyncio.create_task(self._loop(), name=f"balancer:{self.c.owner}")
        self._renewal = asyncio.create_task(self._renew(), name=f"balancer-lease:{self.c.owner}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task, self._renewal)
        for c in self._consumers:
            await c.cancel()
        self._consumers.clear()

    # ---- inputs ---------------------------------------------------------------------------
    async def on_load(self, msg: HostLoad, ctx: Context) -> None:
        self.loads[msg.host] = msg
        for g in msg.vms:
            self.guests[g.vm_id] = g
        self.poke()
        return None

    def poke(self) -> None:
        """Ask for a round soon (at most one per ``interval_s / 3``)."""
        self._poked = True
        self._stir.set()

    # ---- the loop -------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await self._next_round()
            self._last_at = self.clock.monotonic()
            await one_pass(self.round, log, "balancer round")

    async def _next_round(self) -> None:
        """Wait for the next round: ``interval_s`` after the last, or a poke once a third of
        it has passed. Re-read on new options, so a shorter interval applies at once."""
        while True:
            rules = self.options.rules
            since = self.clock.monotonic() - self._last_at
            if since >= rules.interval_s or (self._poked and since >= rules.interval_s / 3):
                self._poked = False
                return
            self._stir.clear()
            due = rules.interval_s / 3 if self._poked else rules.interval_s
            await sleep_or_set(self.clock, due - since, self._stir)

    async def _renew(self) -> None:
        """Keep the lease between rounds (a round comes every ``interval_s``, the lease is
        shorter so that a dead leader is replaced soon)."""
        while True:
            await self.clock.sleep(self.options.lease_s / 3)
            if not self.leading:
                continue
            try:
                async with self._row:
                    doc = await acquire(self.ledger, self.c.owner, now=self.clock.now(), lease_s=self.options.lease_s)
                self.leading = doc is not None
            except Exception:
                log.exception("balancer lease not renewed")

    async def read_snapshot(self, doc: Doc) -> Snapshot:
        """The fleet now, with the queue's entries and the drains' cordons."""
        return self.snapshot(doc, await self.c.store.queue.entries(), await self.c.drains.cordoned())

    def snapshot(self, doc: Doc, entries: list[Any], drained: set[str] | frozenset[str] = frozenset()) -> Snapshot:
        faulty = set(doc.body.get("faulty", {})) | drained
        known = {vm.vm_id for inv in self.c.hosts.hosts.values() for vm in inv.vms}
        for vm_id in [v for v in self.guests if v not in known]:  # gone from the fleet
            del self.guests[vm_id]
        return build(self.c.hosts, self.loads, entries, ready=self.c.liveness.states(), cordoned=faulty,
                     guests=self.guests)

    def policy(self, doc: Doc, snap: Snapshot) -> AutomationPolicy:
        per_vm: dict[str, AutomationLevel] = {}
        for vm_id, spec in snap.specs.items():
            level = spec.params.get(LEVEL_PARAM)
            if level in ("manual", "partial", "full"):
                per_vm[vm_id] = level  # type: ignore[assignment]
        return AutomationPolicy(doc.body.get("level", self.options.level), per_vm)

    def book(self, doc: Doc) -> RecommendationBook:
        book = RecommendationBook(self.clock)
        book.restore(Recommendation.model_validate(r) for r in doc.body.get("recommendations", []))
        return book

    async def round(self) -> None:
        """One evaluation, if this replica leads: the moves to start are queued, the
        recommendations published, the state kept (in that order of safety: the state with
        the moves' cooldowns is written first, so a crash after it repeats nothing)."""
        async with self._row:
            await self._round()

    async def _round(self) -> None:
        now = self.clock.now()
        doc = await acquire(self.ledger, self.c.owner, now=now, lease_s=self.options.lease_s)
        self.leading = doc is not None
        if doc is None or not self.loads:
            return
        entries = await self.c.store.queue.entries()
        snap = self.snapshot(doc, entries, await self.c.drains.cordoned())
        if len(snap.fleet.hosts) < 2:
            return
        state = BalancerState.from_dict(doc.body.get("balancer", {}))
        # cooldowns are also read back from the queue: a leader that queued a move and died
        # before it saved its state left the move there
        cooldown = self.options.rules.cooldown_s
        for e in entries:
            if e.priority == Priority.REBALANCE and now - e.enqueued_at < cooldown:
                state.moved_at[e.vm_id] = max(state.moved_at.get(e.vm_id, 0.0), e.enqueued_at)
        balancer = Balancer(FilteredPlacement(snap.view, snap.specs), self.options.rules, self.clock, state)
        cycle = BalanceCycle(balancer, self.policy(doc, snap), self.book(doc))
        result = cycle.run(snap.fleet, snap.work)
        self.last_round = result
        doc.body["balancer"] = balancer.state.to_dict()
        doc.body["recommendations"] = [r.model_dump(mode="json") for r in cycle.book.current()]
        doc.body["imbalance"] = result.evaluation.imbalance
        doc.body["version"] = result.evaluation.version
        if not await self.ledger.write(doc, expect=doc.version):
            self.leading = False  # another replica took over meanwhile: it decides
            return
        for action in result.actions:
            m = action.proposal.move
            mid = derived_id("auto", result.evaluation.version, m.vm_id, m.source, m.target, now)
            await enqueue_move(self.c.store, mid, m.vm_id, m.source, (m.target,), priority=Priority.REBALANCE,
                               group="rebalance", why=action.reason, now=now)
        await self.publish(result.events)

    async def publish(self, events: Any) -> None:
        for ev in events:
            with contextlib.suppress(FerryError):
                await self.endpoint.send(recommendation_status(ev.status), ev, mandatory=False)

    # ---- the ledger, from any replica ---------------------------------------------------
    async def change(self, fn: Any, attempts: int = 20) -> Any:
        """Apply ``fn(doc) -> result`` to the row by compare-and-set, retried on a conflict."""
        for _ in range(attempts):
            doc = await self.ledger.read()
            result = fn(doc)
            if await self.ledger.write(doc, expect=doc.version):
                return result
            await asyncio.sleep(0.01)
        raise Conflict("the balancer's state kept changing; try again")

    # ---- operators ------------------------------------------------------------------------
    async def on_list(self, msg: ListRecommendations, ctx: Context) -> RecommendationList:
        doc = await self.ledger.read()
        recs = [Recommendation.model_validate(r) for r in doc.body.get("recommendations", [])]
        return RecommendationList(recommendations=recs, level=doc.body.get("level", self.options.level),
                                  leader=doc.owner if doc.lease_until > self.clock.now() else None,
                                  imbalance=doc.body.get("imbalance"))

    async def on_set_level(self, msg: SetAutomationLevel, ctx: Context) -> Done:
        def set_level(doc: Doc) -> None:
            doc.body["level"] = msg.level
        await self.change(set_level)
        self.poke()
        return Done(detail={"level": msg.level})

    async def on_apply(self, msg: ApplyRecommendation, ctx: Context) -> Done:
        """Run a recommendation: refused when unknown or computed on another inventory."""
        current = inventory_version((await self.read_snapshot(await self.ledger.read())).fleet)
        taken: list[tuple[Recommendation, RecommendationEvent]] = []

        def take(doc: Doc) -> None:
            taken.clear()
            book = self.book(doc)
            try:
                taken.append(book.apply(msg.recommendation_id, current))
            except RecommendationError as exc:
                raise InvalidMessage(str(exc)) from None
            doc.body["recommendations"] = [r.model_dump(mode="json") for r in book.current()]
        await self.change(take)
        rec, event = taken[0]
        why = MoveReason(kind=rec.reason.kind, policy=rec.reason.policy, level=rec.reason.level,
                         figures=rec.reason.figures, detail=f"applied by {msg.requested_by or ctx.sender}")
        mid = derived_id("rec", rec.id)
        await enqueue_move(self.c.store, mid, rec.vm_id, rec.source_host, (rec.target_host,),
                           priority=Priority.OPERATOR, group=f"operator:{rec.source_host}", why=why,
                           now=self.clock.now())
        await self.publish([event])
        return Done(detail={"migration_id": mid, "vm_id": rec.vm_id, "target_host": rec.target_host})
