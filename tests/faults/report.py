"""The fault suite's table: faults injected by kind and step, outcomes, invariant violations."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ferry_coordinator.saga import STEPS

LAST_RUN = Path(__file__).with_name("last-run.txt")
STEP_ORDER = (*STEPS, "compensate", "ended", "-")


@dataclass
class Case:
    """One migration with one fault: what was done, where, and how it ended."""

    kind: str  # kill:sensor@source, broker-restart, drop:request, ...
    step: str  # the saga step the fault hit (as observed)
    outcome: str  # completed | rolled_back | <anything else is a failure>
    violations: list[str] = field(default_factory=list)
    detail: str = ""


@dataclass
class Recorder:
    cases: list[Case] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, case: Case) -> None:
        self.cases.append(case)

    def violations(self) -> int:
        return sum(1 for c in self.cases if c.violations or c.outcome not in ("completed", "rolled_back"))

    def render(self) -> str:
        if not self.cases:
            return "fault suite: no cases ran\n"
        rows: dict[tuple[str, str], list[Case]] = defaultdict(list)
        for c in self.cases:
            rows[(c.kind, c.step)].append(c)

        def order(key: tuple[str, str]) -> tuple[str, int]:
            kind, step = key
            return (kind, STEP_ORDER.index(step) if step in STEP_ORDER else len(STEP_ORDER))

        head = ("fault", "step", "injected", "completed", "rolled_back", "other", "violations")
        body = []
        for key in sorted(rows, key=order):
            cs = rows[key]
            body.append((key[0], key[1], str(len(cs)),
                         str(sum(c.outcome == "completed" for c in cs)),
                         str(sum(c.outcome == "rolled_back" for c in cs)),
                         str(sum(c.outcome not in ("completed", "rolled_back") for c in cs)),
                         str(sum(1 for c in cs if c.violations))))
        total = ("TOTAL", "", str(len(self.cases)),
                 str(sum(c.outcome == "completed" for c in self.cases)),
                 str(sum(c.outcome == "rolled_back" for c in self.cases)),
                 str(sum(c.outcome not in ("completed", "rolled_back") for c in self.cases)),
                 str(sum(1 for c in self.cases if c.violations)))
        widths = [max(len(r[i]) for r in (head, total, *body)) for i in range(len(head))]

        def line(r: tuple[str, ...]) -> str:
            return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))

        rule = "-" * len(line(head))
        out = [f"fault-injection suite: {len(self.cases)} migrations with faults, "
               f"{time.monotonic() - self.started:.0f}s", rule, line(head), rule, *map(line, body), rule, line(total)]
        bad = [c for c in self.cases if c.violations or c.outcome not in ("completed", "rolled_back")]
        if bad:
            out += ["", "violations:"]
            out += [f"  {c.kind} at {c.step} -> {c.outcome}: {'; '.join(c.violations)} {c.detail}" for c in bad]
        return "\n".join(out) + "\n"

    def write(self) -> None:
        LAST_RUN.write_text(self.render())


RESULTS = Recorder()
