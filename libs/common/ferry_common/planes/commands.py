"""What ``ferry plane apply`` and ``ferry plane get`` do, apart from the CLI's wiring: read
and check the file, talk to the VM's host, say what happened. Each returns an exit code."""

from __future__ import annotations

import sys
from typing import TextIO

from pydantic import ValidationError

from ..endpoint import Endpoint
from ..errors import FerryError
from ..messages.plane import PlaneDocument
from .convert import retarget
from .loader import PlaneFileError, load_plane
from .remote import apply_plane, get_plane, host_of
from .render import Format, render_plane


def read_plane(path: str, vm: str | None = None, *, err: TextIO = sys.stderr) -> PlaneDocument | None:
    """The file's plane (for ``vm`` if given), or None after saying what is wrong with it."""
    try:
        doc = load_plane(path)
        return retarget(doc, vm) if vm else doc
    except PlaneFileError as exc:
        print(exc, file=err)
    except ValidationError as exc:  # the VM's name makes an id too long
        print(f"{path}: --vm {vm}: {exc.errors()[0]['msg']}", file=err)
    return None


async def apply_command(endpoint: Endpoint, doc: PlaneDocument, *, host: str | None = None,
                        out: TextIO = sys.stdout, err: TextIO = sys.stderr, timeout: float = 10.0) -> int:
    try:
        host = host or await host_of(endpoint, doc.vm, timeout=timeout)
        ans = await apply_plane(endpoint, host, doc, timeout=timeout)
    except FerryError as exc:
        print(f"plane of {doc.vm} not applied: {exc.code}: {exc.reason}", file=err)
        return 1
    detail = "".join(f"; {what} {', '.join(ids)}" for what, ids in
                     (("added", ans.added), ("removed", ans.removed), ("changed", ans.changed),
                      ("installed modules", ans.modules_installed)) if ids)
    print(f"plane of {ans.vm_id} on {host}: {ans.result}{detail}", file=out)
    return 0


async def get_command(endpoint: Endpoint, vm: str, *, fmt: Format = "yaml", host: str | None = None,
                      out: TextIO = sys.stdout, err: TextIO = sys.stderr, timeout: float = 10.0) -> int:
    try:
        host = host or await host_of(endpoint, vm, timeout=timeout)
        doc = await get_plane(endpoint, host, vm, timeout=timeout)
    except FerryError as exc:
        print(f"plane of {vm} not read: {exc.code}: {exc.reason}", file=err)
        return 1
    out.write(render_plane(doc, fmt))
    return 0
