"""Receiving QEMU processes started ahead of time, one pool per VM shape.

Starting the QEMU process that receives a migration takes 50-250 ms on a loaded host, and
with the plane exported beside the VM's migration it is the longest wait before pre-copy
begins. A process started with ``-incoming defer`` runs no vCPU and touches none of its RAM
until a stream arrives, so keeping one ready per flavour a host receives costs a process
slot and nothing else. The driver takes a ready one whose shape (memory, vCPUs) matches the
incoming VM and starts another in the background.

Shapes are configured as ``MEMORY_MIB[:VCPUS][=COUNT]`` items separated by commas, for
example ``"128"`` or ``"512:2=2,2048:4"`` (``FERRY_QEMU_STANDBY`` for ``ferry up``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ITEM = re.compile(r"^\s*(\d+)(?::(\d+))?(?:=(\d+))?\s*$")
MAX_PER_SHAPE = 8


@dataclass(frozen=True, order=True)
class Shape:
    """What a receiving process must match: QEMU refuses a stream from a different machine."""

    memory_mib: int
    vcpus: int = 1


def parse_shapes(raw: str | None) -> dict[Shape, int]:
    """``"128,512:2=2"`` -> ``{Shape(128, 1): 1, Shape(512, 2): 2}``; empty means no pool."""
    out: dict[Shape, int] = {}
    for item in (raw or "").split(","):
        if not item.strip():
            continue
        m = _ITEM.match(item)
        if m is None:
            raise ValueError(f"standby shape {item.strip()!r}: expected MEMORY_MIB[:VCPUS][=COUNT]")
        memory, vcpus, count = int(m[1]), int(m[2] or 1), int(m[3] or 1)
        if memory < 1 or vcpus < 1 or not 1 <= count <= MAX_PER_SHAPE:
            raise ValueError(f"standby shape {item.strip()!r}: memory and vCPUs >= 1, count 1-{MAX_PER_SHAPE}")
        out[Shape(memory, vcpus)] = count
    return out


@dataclass
class StandbyPool:
    """Which standby processes (by directory name) are ready, per shape."""

    wanted: dict[Shape, int]
    ready: dict[Shape, list[str]] = field(default_factory=dict)

    def take(self, shape: Shape) -> str | None:
        """A ready standby of ``shape``, removed from the pool; None if there is none."""
        names = self.ready.get(shape)
        return names.pop(0) if names else None

    def add(self, shape: Shape, name: str) -> None:
        self.ready.setdefault(shape, []).append(name)

    def missing(self) -> list[Shape]:
        """One entry per standby still to start, the emptiest shapes first."""
        gaps = {s: n - len(self.ready.get(s, [])) for s, n in self.wanted.items()}
        out: list[Shape] = []
        while any(g > 0 for g in gaps.values()):
            for s in sorted(gaps, key=lambda s: (-gaps[s], s)):
                if gaps[s] > 0:
                    out.append(s)
                    gaps[s] -= 1
        return out

    def names(self) -> list[str]:
        return [n for names in self.ready.values() for n in names]
