"""A management plane as a person writes it (``ferry plane apply -f FILE``): one VM's
modules, elements and embots, in the form of the file. Not a message of its own: the
plane commands carry it, and :mod:`ferry_common.planes` turns it into the domain models.

The file's form differs from the wire's :class:`~.domain.ManagementGraph` in three ways,
all so a person need not write what can be derived: elements name no VM (the plane's), a
module's dependencies and an element's module are ``name@version`` (the digest is worked
out), and an embot's policy may be the name of a policy its module (or one it depends on)
defines. The manifest is the modules the elements and embots use.
"""

from __future__ import annotations

from pydantic import Field

from .base import Wire
from .domain import Policy
from .limits import (
    MAX_DEPENDS,
    MAX_ELEMENTS,
    MAX_EMBOTS,
    MAX_MODULES,
    MAX_POLICIES,
    JsonObject,
    Name,
)


class PlaneModule(Wire):
    """A module: the element types it defines and its policy templates."""

    name: Name
    version: Name
    depends: list[Name] = Field(default_factory=list, max_length=MAX_DEPENDS,
                                description="modules this one needs, as name@version")
    element_types: list[Name] = Field(default_factory=list, max_length=256)
    policies: list[Policy] = Field(default_factory=list, max_length=MAX_POLICIES)


class PlaneElement(Wire):
    """A managed element of the plane's VM; the VM itself is the element named as the VM."""

    id: Name
    type: Name
    module: Name = Field(description="name@version of the module that defines the type")
    depends_on: list[Name] = Field(default_factory=list, max_length=MAX_DEPENDS)
    attributes: JsonObject = Field(default_factory=dict)


class PlaneEmbot(Wire):
    """An embot: the elements it manages and its policies, each a policy of its module (or of
    one the module depends on) by name, or written out in full."""

    id: Name
    module: Name = Field(description="name@version of the module the embot belongs to")
    elements: list[Name] = Field(min_length=1, max_length=MAX_DEPENDS)
    policies: list[Name | Policy] = Field(default_factory=list, max_length=MAX_POLICIES)
    state: JsonObject = Field(default_factory=dict,
                              description="initial state of a new embot; a running embot keeps its own")


class PlaneDocument(Wire):
    """The management plane of one VM, as a file."""

    vm: Name
    modules: list[PlaneModule] = Field(default_factory=list, max_length=MAX_MODULES)
    elements: list[PlaneElement] = Field(default_factory=list, max_length=MAX_ELEMENTS)
    embots: list[PlaneEmbot] = Field(default_factory=list, max_length=MAX_EMBOTS)
