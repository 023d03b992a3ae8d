"""Moved to :mod:`ferry_testing.sample`; this name re-exports it for older imports."""

from ferry_testing.sample import (
    CORE,
    DISK_ERRORS,
    HIGH_LOAD,
    LOAD,
    LOAD_ALARM,
    METRICS,
    MODULES,
    TRACK_LAST,
    event,
    graph,
    vm_spec,
)

__all__ = ["CORE", "DISK_ERRORS", "HIGH_LOAD", "LOAD", "LOAD_ALARM", "METRICS", "MODULES", "TRACK_LAST",
           "event", "graph", "vm_spec"]
