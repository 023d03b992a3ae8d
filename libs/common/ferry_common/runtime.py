"""Process-wide settings every Ferry service process applies at start.

CPython's cyclic garbage collector runs a collection every 700 net allocations of
container objects and, every 100 of those, walks the older generations too. A host
service holds its VMs' queued events and management graphs as hundreds of thousands of
long-lived objects, and a migration allocates as many again (100k events decoded at the
target): at the default thresholds the collector then spends a quarter to a third of a 10k-element,
100k-event migration re-walking objects that are not garbage. Raised thresholds collect
the same cycles, less often; ``FERRY_GC_THRESHOLD=default`` keeps Python's own.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # settings imports this module (gc_threshold checks the variable)
    from .settings import Settings

#: gen0 allocations, gen1 and gen2 collection ratios (Python's default is 700, 10, 10)
GC_THRESHOLD = (20_000, 20, 50)


def gc_threshold(spec: str | None) -> tuple[int, int, int] | None:
    """Parse ``FERRY_GC_THRESHOLD`` ("20000,20,50"); None for Python's default."""
    if spec is None or spec.strip() == "":
        return GC_THRESHOLD
    if spec.strip().lower() == "default":
        return None
    parts = spec.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"FERRY_GC_THRESHOLD={spec!r}: expected three integers, e.g. 20000,20,50") from None
    if len(values) != 3 or any(v < 1 for v in values):
        raise ValueError(f"FERRY_GC_THRESHOLD={spec!r}: expected three integers >= 1, e.g. 20000,20,50")
    return values[0], values[1], values[2]


def tune_gc(source: Mapping[str, str] | Settings) -> tuple[int, int, int]:
    """Apply the collector thresholds of ``FERRY_GC_THRESHOLD`` (the settings' ``gc_threshold``,
    or that variable of a mapping); returns those in force."""
    spec = source.get("FERRY_GC_THRESHOLD") if isinstance(source, Mapping) else source.gc_threshold
    wanted = gc_threshold(spec)
    if wanted is not None:
        gc.set_threshold(*wanted)
    first, second, third = gc.get_threshold()
    return first, second, third
