"""What the integration tests share: a two-host cluster on the test's bus, and the spans
the process's tracer finished (one in-memory exporter added to its provider once)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ferry_common.tracing import installed, setup_tracing
from tests.harness import SETTINGS, Cluster, make_cluster

_EXPORTER: InMemorySpanExporter | None = None


def span_exporter() -> InMemorySpanExporter:
    """The process-wide in-memory exporter (added on first use); skips when tracing is off."""
    global _EXPORTER
    if _EXPORTER is None:
        tracing = installed() or setup_tracing("ferry-tests", env=SETTINGS.tracing_env())
        if tracing.provider is None:
            pytest.skip("tracing is off in this process (FERRY_TRACE_COLLECT=0 / OTEL_SDK_DISABLED)")
        _EXPORTER = InMemorySpanExporter()
        tracing.provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    return _EXPORTER


@pytest.fixture
async def cluster(bus_kind: str) -> AsyncIterator[Cluster]:
    """host-a and host-b with the default options; a module may define its own."""
    c = await make_cluster(bus_kind)
    yield c
    await c.close()


@pytest.fixture
def spans(cluster: Cluster) -> InMemorySpanExporter:
    """The spans finished since this test's cluster started."""
    exporter = span_exporter()
    exporter.clear()
    return exporter
