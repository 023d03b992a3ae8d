"""Text renderings for people: a trace as a tree with durations."""

from __future__ import annotations

from typing import Any


def render_trace(spans: list[dict[str, Any]]) -> str:
    """Spans (as the services recorded them) as an indented tree, children in start order."""
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in spans:
        parent = s.get("parent_id")
        children.setdefault(parent if parent in by_id else None, []).append(s)
    for kids in children.values():
        kids.sort(key=lambda s: s.get("start", 0))
    lines: list[str] = []

    def walk(span: dict[str, Any], depth: int) -> None:
        ms = (span.get("end", 0) - span.get("start", 0)) * 1000
        status = " ERROR" if span.get("status") == "ERROR" else ""
        who = span.get("service", "")
        lines.append(f"{'  ' * depth}{span['name']}  {ms:.1f} ms  [{who}]{status}")
        for ev in span.get("events", []):
            lines.append(f"{'  ' * (depth + 1)}! {ev}")
        for kid in children.get(span["span_id"], []):
            walk(kid, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    return "\n".join(lines)
