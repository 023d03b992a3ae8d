"""Tracing helpers: W3C trace context carried in AMQP headers, continued by every handler.

Besides ``traceparent`` the headers carry W3C baggage: a migration's saga puts
``ferry.migration_id`` there, so every service down the line knows which migration a
span belongs to even when the message body does not say (see :mod:`.tracing`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags

tracer = trace.get_tracer("ferry")

#: Span attribute and baggage key naming the migration a span belongs to.
MIGRATION_ID = "ferry.migration_id"
#: Span attribute naming the service (endpoint identity) that recorded a span.
SERVICE = "ferry.service"


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Add ``traceparent``/``tracestate``/``baggage`` for the current context to ``headers``."""
    inject(headers)
    return headers


def extract_context(headers: Mapping[str, str]) -> otel_context.Context:
    """The context a message's headers carry (an empty one if they carry none)."""
    return extract(dict(headers))


def trace_ids(span: trace.Span) -> tuple[str, str] | None:
    """``(trace_id, span_id)`` of ``span`` in hex, or None for a span that is not recorded."""
    sc = span.get_span_context()
    if not sc.is_valid:
        return None
    return format(sc.trace_id, "032x"), format(sc.span_id, "016x")


@contextmanager
def migration_span(
    migration_id: str,
    attributes: Mapping[str, Any],
    *,
    requested_by: tuple[str, str] | None = None,
    resume: Any = None,
) -> Iterator[trace.Span]:
    """The root span of one migration: a NEW trace, linked to the context that asked for it.

    A migration outlives the request that started it, so its spans do not hang under the
    ``MigrateRequest`` handler span; a link keeps the way back. ``resume`` is the
    ``(trace_id, span_id)`` a previous driver of the saga recorded: a replica that takes
    the saga over continues that trace under the original root, so one migration stays
    one trace across coordinator restarts. The migration id goes into the baggage, so it
    travels with every message the saga sends.
    """
    requester = trace.get_current_span().get_span_context()
    if not requester.is_valid and requested_by is not None:  # started later, from the queue
        with contextlib.suppress(TypeError, ValueError, IndexError):
            requester = SpanContext(int(requested_by[0], 16), int(requested_by[1], 16), is_remote=True,
                                    trace_flags=TraceFlags(TraceFlags.SAMPLED))
    links = [Link(requester)] if requester.is_valid else []
    ctx = baggage.set_baggage(MIGRATION_ID, migration_id, context=otel_context.Context())
    name = f"migration {migration_id}"
    if resume:
        try:
            trace_id, span_id = int(resume[0], 16), int(resume[1], 16)
            parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
            if parent.is_valid:
                ctx = trace.set_span_in_context(NonRecordingSpan(parent), ctx)
                name = f"migration {migration_id} (resumed)"
        except (TypeError, ValueError, IndexError):
            pass  # an unreadable record of the old trace: start a new one rather than fail
    token = otel_context.attach(ctx)
    try:
        with tracer.start_as_current_span(name, links=links, attributes=dict(attributes)) as span:
            yield span
    finally:
        otel_context.detach(token)


@contextmanager
def attached(ctx: otel_context.Context) -> Iterator[None]:
    """Make ``ctx`` (a message's extracted context) current for the block.

    A span started with ``context=`` takes its parent from it, but only the span becomes
    current; attaching the whole context first keeps its baggage (the migration id) going
    with every message the handler sends on.
    """
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)
