"""The base of every wire model."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Wire(BaseModel):
    """A message body: strict about unknown fields and non-finite numbers, immutable once built."""

    # NaN and infinities are not JSON: refused here as the JSON parser refuses them
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    #: A read-only question about a migration (its record, its trace) is not part of it:
    #: its handler's span is not filed under the migration, or reading a trace would grow it.
    query: ClassVar[bool] = False
