"""Process-wide tracing setup: OTLP export when ``OTEL_*`` says so, and span shipping over the bus.

Two ways out for finished spans, both optional:

* **OTLP** (Jaeger, Tempo, any collector) when the standard variables ask for it:
  ``OTEL_TRACES_EXPORTER=otlp`` or an ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``
  (``OTEL_TRACES_EXPORTER=none`` wins over an endpoint; ``OTEL_SDK_DISABLED=true`` turns
  everything off). Needs the ``otlp`` extra (``opentelemetry-exporter-otlp-proto-http``).
* **The bus** (:class:`BusSpanExporter`): spans that belong to a migration's trace are
  batched and published on ``telemetry.spans``; the coordinator stores them by migration
  id and ``ferry trace`` renders them, so a trace is there without any backend. On by
  default where a caller passes one; ``FERRY_TRACE_COLLECT=0`` turns it off.

When neither is on, no SDK provider is installed at all: the API's no-op tracer passes
the incoming ``traceparent`` through unchanged and costs next to nothing.

OpenTelemetry allows one global provider per process (``ferry up``, the demo and the
tests run many services in one process): the first :func:`setup_tracing` installs it,
later calls return the same :class:`Tracing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import SpanKind

from .aio import cancel_and_wait
from .bus.topology import TELEMETRY_SPANS
from .errors import FerryError
from .messages.telemetry import MAX_EVENTS_PER_SPAN, SpanBatch, SpanRecord
from .telemetry import MIGRATION_ID, SERVICE

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Link
    from opentelemetry.util.types import Attributes

    from .endpoint import Endpoint

log = logging.getLogger(__name__)

ROUTING_KEY_ATTR = "messaging.rabbitmq.destination.routing_key"
_MAX_ATTR_STRING = 1024


@dataclass
class Tracing:
    """What :func:`setup_tracing` installed; ``provider`` is None when tracing is off."""

    provider: TracerProvider | None
    bus_exporter: BusSpanExporter | None
    otlp: bool


_INSTALLED: Tracing | None = None
_INSTALL_LOCK = threading.Lock()


def setup_tracing(
    service_name: str,
    *,
    bus_exporter: BusSpanExporter | None = None,
    env: Mapping[str, str],
) -> Tracing:
    """Install this process's ``TracerProvider`` (once) as ``OTEL_*`` and ``FERRY_TRACE_COLLECT`` say
    in ``env`` (``Settings.tracing_env()``, or a mapping of those variables).

    ``bus_exporter`` ships migration spans over the bus once an endpoint is attached to it
    (:meth:`BusSpanExporter.attach`); it is dropped when ``FERRY_TRACE_COLLECT=0``. Later
    calls in the same process return the first call's result unchanged.
    """
    global _INSTALLED
    with _INSTALL_LOCK:
        if _INSTALLED is not None:
            return _INSTALLED
        tracing = build_tracing(service_name, bus_exporter=bus_exporter, env=env)
        if tracing.provider is not None:
            trace.set_tracer_provider(tracing.provider)
        _INSTALLED = tracing
        return tracing


def installed() -> Tracing | None:
    """What :func:`setup_tracing` installed in this process, if it ran."""
    return _INSTALLED


def build_tracing(
    service_name: str,
    *,
    bus_exporter: BusSpanExporter | None = None,
    env: Mapping[str, str],
) -> Tracing:
    """Build (without installing) the provider :func:`setup_tracing` would install. The
    variables come from ``env`` (``Settings.tracing_env()``); the process environment is not
    read here (the OpenTelemetry SDK reads its own ``OTEL_*`` when it builds the exporter)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Tracing(None, None, False)
    otlp = otlp_requested(env)
    if env.get("FERRY_TRACE_COLLECT", "1").strip().lower() in ("0", "false", "no", "off"):
        bus_exporter = None
    if not otlp and bus_exporter is None:
        return Tracing(None, None, False)
    attrs = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attrs), sampler=FerrySampler())
    if otlp:
        exporter = _otlp_exporter()
        if exporter is None:
            otlp = False
        else:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    if bus_exporter is not None:
        provider.add_span_processor(bus_exporter)
    return Tracing(provider, bus_exporter, otlp)


def otlp_requested(env: Mapping[str, str]) -> bool:
    """Whether the standard variables ask for OTLP export of traces."""
    chosen = env.get("OTEL_TRACES_EXPORTER")
    if chosen is not None and chosen.strip():
        return "otlp" in {p.strip().lower() for p in chosen.split(",")}
    # unlike the SDK's own default, an unconfigured process exports nothing
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _otlp_exporter() -> SpanExporter | None:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("OTLP export requested but opentelemetry-exporter-otlp-proto-http is not "
                    "installed (pip install 'ferry[otlp]'): traces are not exported")
        return None
    return OTLPSpanExporter()  # endpoint, headers, timeout: from the OTEL_EXPORTER_OTLP_* variables


class FerrySampler(Sampler):
    """The configured sampler (``OTEL_TRACES_SAMPLER``, parent-based always-on by default),
    except that the handling of shipped spans is never traced: tracing it would ship spans
    about shipping spans, forever."""

    def __init__(self) -> None:
        from opentelemetry.sdk.trace import sampling

        self._inner: Sampler = sampling._get_from_env_or_default()

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if attributes and attributes.get(ROUTING_KEY_ATTR) == TELEMETRY_SPANS:
            return SamplingResult(Decision.DROP)
        return self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"FerrySampler({self._inner.get_description()})"


class BusSpanExporter(SpanProcessor):
    """Batches finished spans of migration traces and publishes them on ``telemetry.spans``.

    A span belongs to a migration if it carries ``ferry.migration_id`` (as an attribute, or
    as baggage in its parent context: the saga puts it there), or if this process saw
    another span of the same trace that did. Everything else (event dispatch, inventory,
    queries) is left out, so the coordinator's store only holds what ``ferry trace`` shows.

    ``on_end`` only appends to a bounded buffer; publishing happens on the attached
    endpoint's event loop every ``interval_s`` or when a batch is full. Nothing is
    published before :meth:`attach`; spans that overflow the buffer are dropped and counted.
    """

    def __init__(self, *, max_batch: int = 256, interval_s: float = 0.2, max_buffer: int = 20_000,
                 max_traces: int = 10_000, exclude_services: tuple[str, ...] = ("client/",)) -> None:
        self.max_batch = max_batch
        self.interval_s = interval_s
        self.max_buffer = max_buffer
        self.max_traces = max_traces
        # a CLI following a migration is not part of it (and ships nothing in production)
        self.exclude_services = exclude_services
        self.dropped = 0
        self.shipped = 0
        self._lock = threading.Lock()
        self._buffer: deque[SpanRecord] = deque()
        self._traces: OrderedDict[int, str] = OrderedDict()  # trace id -> migration id, LRU
        self._endpoint: Endpoint | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._send_lock: asyncio.Lock | None = None

    # ---- SpanProcessor ------------------------------------------------------------------
    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        mid = _migration_of(span, parent_context)
        if mid is None:
            return
        if not (span.attributes or {}).get(MIGRATION_ID):
            # from baggage or the parent: on the span too, so backends can filter by it
            span.set_attribute(MIGRATION_ID, mid)
        if SERVICE not in (span.attributes or {}):
            parent = trace.get_current_span(parent_context)
            service = (getattr(parent, "attributes", None) or {}).get(SERVICE)
            if service:
                span.set_attribute(SERVICE, service)  # an in-process child: same service
        self._remember(span.context.trace_id, mid)

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is None:
            return
        mid = (span.attributes or {}).get(MIGRATION_ID)
        with self._lock:
            if isinstance(mid, str) and mid:
                self._remember_locked(ctx.trace_id, mid)
            else:
                mid = self._traces.get(ctx.trace_id)
            if mid is None:
                return
            service = (span.attributes or {}).get(SERVICE)
            if isinstance(service, str) and service.startswith(self.exclude_services):
                return
            if len(self._buffer) >= self.max_buffer:
                self.dropped += 1
                return
            self._buffer.append(span_record(span, mid))
            full = len(self._buffer) >= self.max_batch
        if full:
            self._kick()

    def shutdown(self) -> None:
        self._endpoint = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._kick()
        return True

    # ---- the bus side -------------------------------------------------------------------
    def attach(self, endpoint: Endpoint) -> None:
        """Publish through ``endpoint`` from now on; call from its running event loop."""
        self._endpoint = endpoint
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        if self._task is None or self._task.done():
            # a fresh context: the shipping task must not run inside whatever span attached it
            self._task = self._loop.create_task(self._run(), name="ferry-span-shipper",
                                                context=_empty_context())

    async def detach(self, endpoint: Endpoint | None = None) -> None:
        """Publish what is buffered, then stop (if ``endpoint`` is the attached one, or always)."""
        if endpoint is not None and endpoint is not self._endpoint:
            return
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self.flush()
        self._endpoint = None

    async def flush(self) -> None:
        """Publish everything buffered now (tests call this before reading the store)."""
        if self._endpoint is None or self._send_lock is None:
            return
        async with self._send_lock:
            while True:
                with self._lock:
                    batch = [self._buffer.popleft() for _ in range(min(self.max_batch, len(self._buffer)))]
                if not batch:
                    return
                await self._publish(batch)

    def _kick(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(wake.set)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # shipping is best effort: never take the service down
                log.exception("shipping spans failed")

    async def _publish(self, batch: list[SpanRecord]) -> None:
        endpoint = self._endpoint
        if endpoint is None:
            return
        # no trace context on the batch: its handling is not traced (see FerrySampler)
        token = otel_context.attach(otel_context.Context())
        try:
            await endpoint.send(TELEMETRY_SPANS, SpanBatch(spans=batch))
            self.shipped += len(batch)
        except FerryError as exc:
            # no coordinator bound (unroutable) or the bus is down: these spans are lost,
            # the migration's record and history still tell what happened
            self.dropped += len(batch)
            log.debug("%d spans not shipped: %s", len(batch), exc.reason)
        finally:
            otel_context.detach(token)

    def _remember(self, trace_id: int, mid: str) -> None:
        with self._lock:
            self._remember_locked(trace_id, mid)

    def _remember_locked(self, trace_id: int, mid: str) -> None:
        self._traces[trace_id] = mid
        self._traces.move_to_end(trace_id)
        while len(self._traces) > self.max_traces:
            self._traces.popitem(last=False)


def _empty_context() -> Any:
    import contextvars

    return contextvars.Context()


def _migration_of(span: Any, parent_context: Context | None) -> str | None:
    own = (span.attributes or {}).get(MIGRATION_ID)
    if isinstance(own, str) and own:
        return own
    carried = baggage.get_baggage(MIGRATION_ID, parent_context)
    if isinstance(carried, str) and carried:
        return carried
    parent = trace.get_current_span(parent_context)
    inherited = (getattr(parent, "attributes", None) or {}).get(MIGRATION_ID)
    return inherited if isinstance(inherited, str) and inherited else None


def span_record(span: ReadableSpan, migration_id: str) -> SpanRecord:
    """A finished SDK span as shipped and stored: times as recorded, ids in hex."""
    ctx = span.context
    assert ctx is not None
    attrs = dict(span.attributes or {})
    service = attrs.get(SERVICE) or (span.resource.attributes.get("service.name") if span.resource else "")
    status = span.status
    return SpanRecord(
        migration_id=migration_id,
        trace_id=format(ctx.trace_id, "032x"),
        span_id=format(ctx.span_id, "016x"),
        parent_id=format(span.parent.span_id, "016x") if span.parent is not None else None,
        name=span.name[:256] or "?",
        kind=span.kind.name if span.kind else "INTERNAL",
        start=(span.start_time or 0) / 1e9,
        end=(span.end_time or span.start_time or 0) / 1e9,
        status=status.status_code.name if status is not None else "UNSET",  # type: ignore[arg-type]
        status_message=(status.description or "")[:1024] if status is not None else "",
        service=str(service or "")[:256],
        attributes={k[:128]: _json_value(v) for k, v in list(attrs.items())[:200]},
        events=[_event_text(e) for e in list(span.events)[:MAX_EVENTS_PER_SPAN]],
    )


def _json_value(value: Any) -> Any:
    if isinstance(value, str):
        return value[:_MAX_ATTR_STRING]
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, Sequence):
        return [_json_value(v) for v in list(value)[:64]]
    return str(value)[:_MAX_ATTR_STRING]


def _event_text(event: Any) -> str:
    attrs = dict(event.attributes or {})
    detail = ", ".join(f"{k}={v}" for k, v in attrs.items())
    text = f"{event.name}: {detail}" if detail else str(event.name)
    return text[:1024]
