"""The management modules a host knows, by name@version, checked by content digest."""

from __future__ import annotations

from dataclasses import dataclass, field

from ferry_common.messages.domain import Module, ModuleRef


class ModuleError(Exception):
    """A module that cannot be trusted: its content does not match the digest that named it."""


@dataclass
class Resolution:
    missing: list[ModuleRef] = field(default_factory=list)
    resolved: dict[str, Module] = field(default_factory=dict)


class ModuleRegistry:
    def __init__(self) -> None:
        self._modules: dict[str, tuple[Module, str]] = {}

    def install(self, module: Module, expected: ModuleRef | None = None) -> ModuleRef:
        """Install ``module``; if ``expected`` is given its digest must match the content."""
        ref = module.ref()
        if expected is not None and (expected.key != ref.key or expected.digest != ref.digest):
            raise ModuleError(f"module {ref.key} does not match digest {expected.digest[:12]}… that named it")
        have = self._modules.get(ref.key)
        if have is not None and have[1] != ref.digest:
            raise ModuleError(f"module {ref.key} is already installed with other content")
        self._modules[ref.key] = (module, ref.digest)
        return ref

    def get(self, key: str) -> Module | None:
        found = self._modules.get(key)
        return found[0] if found else None

    def find(self, ref: ModuleRef) -> Module | None:
        found = self._modules.get(ref.key)
        return found[0] if found and found[1] == ref.digest else None

    def resolve(self, refs: list[ModuleRef]) -> Resolution:
        """Follow ``refs`` and their dependencies; report what is missing, fail on a digest clash."""
        out = Resolution()
        todo = list(refs)
        seen: set[str] = set()
        while todo:
            ref = todo.pop()
            if ref.key in seen:
                continue
            seen.add(ref.key)
            found = self._modules.get(ref.key)
            if found is None:
                out.missing.append(ref)
                continue
            module, digest = found
            if digest != ref.digest:
                raise ModuleError(f"module {ref.key}: digest {ref.digest[:12]}… named, {digest[:12]}… installed")
            out.resolved[ref.key] = module
            todo.extend(module.depends)
        return out

    def refs(self) -> list[ModuleRef]:
        return [m.ref() for m, _ in self._modules.values()]
