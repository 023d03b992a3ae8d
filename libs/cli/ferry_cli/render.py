"""Text renderings for people: a trace as a tree with durations."""

from __future__ import annotations

from typing import Any

#: Span attributes worth a glance in the tree (the rest are in ``ferry trace --json``-like dumps).
_SHOWN = (("ferry.outcome", "outcome"), ("ferry.retry_count", "retries"))


def render_trace(spans: list[dict[str, Any]]) -> str:
    """Spans (as the services recorded them) as an indented tree, children in start order.

    Durations and offsets are the recorded ``start``/``end`` of each span, nothing is
    recomputed; offsets are from the earliest span (different hosts' clocks may disagree
    by their skew). A span whose parent is not among ``spans`` is shown as a root; a span
    shipped twice (a redelivered batch) is shown once.
    """
    by_id: dict[str, dict[str, Any]] = {}
    for s in spans:
        by_id[s["span_id"]] = s
    if not by_id:
        return ""
    t0 = min(float(s.get("start", 0)) for s in by_id.values())
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in by_id.values():
        parent = s.get("parent_id")
        children.setdefault(parent if parent in by_id else None, []).append(s)
    for kids in children.values():
        kids.sort(key=lambda s: (s.get("start", 0), s.get("name", "")))
    lines: list[str] = []

    def walk(span: dict[str, Any], depth: int) -> None:
        start, end = float(span.get("start", 0)), float(span.get("end", 0))
        ms = (end - start) * 1000
        status = ""
        if span.get("status") == "ERROR":
            why = span.get("status_message") or ""
            status = f"  ERROR{': ' + why if why else ''}"
        attrs = span.get("attributes") or {}
        extra = " ".join(f"{label}={attrs[key]}" for key, label in _SHOWN if attrs.get(key) not in (None, "", 0))
        who = span.get("service", "")
        lines.append(
            f"{'  ' * depth}{span['name']}  {ms:.1f} ms  @+{(start - t0) * 1000:.1f} ms  [{who}]"
            f"{'  ' + extra if extra else ''}{status}"
        )
        events = [str(e) for e in span.get("events", [])]
        progress = [e for e in events if e.startswith("progress")]
        for ev in events:
            if not ev.startswith("progress"):
                lines.append(f"{'  ' * (depth + 1)}! {ev}")
        if progress:
            lines.append(f"{'  ' * (depth + 1)}! {len(progress)} progress samples")
        for kid in children.get(span["span_id"], []):
            walk(kid, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    return "\n".join(lines)
