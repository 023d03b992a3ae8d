"""One trace per drain: a root span from the drain's start to its end, linked (OpenTelemetry
links) to the root span of each of its migrations' traces.

The drain's migrations are started by the dispatcher as their slots free, each in a trace of
its own; the drain span is recorded when the drain ends, from the spans the store kept for
them. Filed under the drain's id (``ferry trace DRAIN_ID``) like a migration's spans.
"""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, TraceFlags

from ferry_common.telemetry import MIGRATION_ID

from ..store.base import SagaStore
from .drain import Drain, migration_id


async def migration_roots(store: SagaStore, drain: Drain) -> list[str]:
    """``trace_id:span_id`` of the root span of each migration the drain asked for."""
    out: list[str] = []
    for vm in drain.vms.values():
        for attempt in range(1, vm.attempt + 1):
            spans = await store.spans(migration_id(drain.drain_id, vm.vm_id, attempt))
            roots = [s for s in spans if not s.get("parent_id")] or spans
            if roots:
                first = min(roots, key=lambda s: float(s.get("start") or 0.0))
                out.append(f"{first['trace_id']}:{first['span_id']}")
    return out


def record_drain_trace(drain: Drain) -> None:
    """Record the drain's root span, linked to its migrations' roots (``drain.trace_links``)."""
    otel_links = []
    for link in drain.trace_links:
        trace_id, span_id = link.split(":")
        ctx = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        otel_links.append(Link(ctx))
    span = trace.get_tracer("ferry.coordinator").start_span(
        f"drain {drain.host}",
        context=otel_context.Context(),  # a root: the drain's own trace
        links=otel_links,
        start_time=int(drain.created_at * 1e9),
        attributes={MIGRATION_ID: drain.drain_id, "ferry.drain.host": drain.host, "ferry.drain.state": drain.state.value,
                    "ferry.drain.vms": len(drain.vms)},
    )
    span.end(end_time=int(max(drain.updated_at, drain.ended_at or 0.0, drain.created_at) * 1e9))
