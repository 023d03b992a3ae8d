"""Tracing helpers: W3C trace context carried in AMQP headers, continued by every handler."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject

tracer = trace.get_tracer("ferry")


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Add ``traceparent``/``tracestate`` for the current span to ``headers``."""
    inject(headers)
    return headers


def extract_context(headers: Mapping[str, str]) -> otel_context.Context:
    return extract(dict(headers))
