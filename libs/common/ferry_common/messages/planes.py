"""Commands that set and read a VM's management plane as a document (the ``ferry plane``
commands), answered by the managed object of the host where the VM runs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Wire
from .limits import MAX_ELEMENTS, MAX_MODULES, Name
from .plane import PlaneDocument


class ApplyPlane(Wire):
    """Create the VM's plane, or make the running one what the document says. Idempotent:
    the same document again changes nothing. Refused (``plane_migrating``) while the VM's
    plane is part of a migration."""

    plane: PlaneDocument


class PlaneApplied(Wire):
    vm_id: Name
    result: Literal["created", "updated", "unchanged"]
    # ids of elements and embots, and modules newly installed on the host
    added: list[Name] = Field(default_factory=list, max_length=2 * MAX_ELEMENTS)
    removed: list[Name] = Field(default_factory=list, max_length=2 * MAX_ELEMENTS)
    changed: list[Name] = Field(default_factory=list, max_length=2 * MAX_ELEMENTS)
    modules_installed: list[Name] = Field(default_factory=list, max_length=MAX_MODULES)


class GetPlane(Wire):
    """The VM's plane as a document (what :class:`ApplyPlane` takes)."""

    query = True
    vm_id: Name


class PlaneFound(Wire):
    plane: PlaneDocument
