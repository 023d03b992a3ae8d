"""The libvirt bindings as the driver uses them: imported lazily, every blocking call on
threads of its own, libvirt's constants the driver needs, and the URI a target hands out."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

MIB = 1024 * 1024
URI_SCHEME = "ferry-libvirt"
# libvirt's default bandwidth for QEMU is effectively unlimited; a cap of 0 keeps that
_UNLIMITED = 0

# libvirt constants, copied so that this module imports without libvirt installed
_RUNNING, _PAUSED, _SHUTDOWN, _SHUTOFF, _CRASHED, _PMSUSPENDED = 1, 3, 4, 5, 6, 7
_PAUSED_MIGRATION, _PAUSED_STARTING_UP, _PAUSED_POSTCOPY, _PAUSED_POSTCOPY_FAILED = 2, 11, 12, 13
_JOB_NONE = 0
_OP_MIGRATION_IN = 4
# how long a poll of the migration job may take before it counts as no answer
_QUERY_TIMEOUT_S = 1.0

T = TypeVar("T")


def _lv() -> Any:
    import libvirt  # lazy: only this driver needs the bindings

    return libvirt


# libvirt calls block a thread each; a stuck one (an abort under load, a query waiting for the
# domain's monitor) keeps its thread until libvirt lets go. They get threads of their own, so a
# few stuck calls cannot use up the process's default executor and stall everything else
_THREADS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="ferry-libvirt")


async def _blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run the blocking libvirt call ``fn(*args)`` on the driver's threads."""
    return await asyncio.get_running_loop().run_in_executor(_THREADS, functools.partial(fn, *args))


def encode_uri(dconnuri: str, miguri: str) -> str:
    """The URI :meth:`LibvirtDriver.prepare_incoming` hands to the source."""
    return f"{URI_SCHEME}:?dconnuri={quote(dconnuri, safe='')}&miguri={quote(miguri, safe='')}"


def decode_uri(uri: str) -> tuple[str, str]:
    """``(dconnuri, miguri)`` from :func:`encode_uri`'s output."""
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    if parts.scheme != URI_SCHEME or "dconnuri" not in query or "miguri" not in query:
        raise ValueError(f"not a {URI_SCHEME} URI: {uri!r}")
    return query["dconnuri"][0], query["miguri"][0]


def domain_name(vm_id: str) -> str:
    """libvirt forbids '/' in names; other characters of a Ferry name are fine."""
    return vm_id.replace("/", "_")
