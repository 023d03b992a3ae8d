"""Finished spans shipped over the bus, so ``ferry trace`` works without a tracing backend.

Every service process batches the finished spans that belong to a migration's trace and
publishes them on ``telemetry.spans``; the coordinator keeps them by migration id. A span
is what the service recorded, start and end included: nothing is recomputed downstream.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .base import Wire
from .limits import JsonObject, Name

MAX_SPANS_PER_BATCH = 1024
MAX_EVENTS_PER_SPAN = 128

HexId16 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
HexId32 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
SpanName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
EventText = Annotated[str, StringConstraints(max_length=1024)]


class SpanRecord(Wire):
    """One finished span, in the shape ``ferry_cli.render.render_trace`` reads."""

    migration_id: Name
    trace_id: HexId32
    span_id: HexId16
    parent_id: HexId16 | None = None
    name: SpanName
    kind: str = Field(default="INTERNAL", max_length=16)
    start: float  # epoch seconds, as the recording service's clock said
    end: float
    status: Literal["OK", "ERROR", "UNSET"] = "UNSET"
    status_message: str = Field(default="", max_length=1024)
    service: str = Field(default="", max_length=256)
    attributes: JsonObject = Field(default_factory=dict)
    events: list[EventText] = Field(default_factory=list, max_length=MAX_EVENTS_PER_SPAN)


class SpanBatch(Wire):
    """Spans one process finished since its last batch (possibly of several migrations)."""

    spans: list[SpanRecord] = Field(max_length=MAX_SPANS_PER_BATCH)
