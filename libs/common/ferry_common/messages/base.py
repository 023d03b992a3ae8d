"""The base of every wire model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Wire(BaseModel):
    """A message body: strict about unknown fields, immutable once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)
