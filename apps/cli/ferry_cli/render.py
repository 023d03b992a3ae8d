"""Text renderings for people: a trace as a tree with durations."""

from __future__ import annotations

from typing import Any

#: Span attributes worth a glance in the tree (the rest are in ``ferry trace --json``-like dumps).
_SHOWN = (("ferry.outcome", "outcome"), ("ferry.retry_count", "retries"))
#: This many leaf siblings in a row with the same name, service and status share one line.
_COLLAPSE = 4


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
        kids = children.get(span["span_id"], [])
        i = 0
        while i < len(kids):
            run = _repeats(kids, i, children)
            if len(run) >= _COLLAPSE:
                # a poll repeated every round (dirty objects): one line, recorded durations kept
                durations = [(float(k.get("end", 0)) - float(k.get("start", 0))) * 1000 for k in run]
                first = float(run[0].get("start", 0))
                lines.append(
                    f"{'  ' * (depth + 1)}{run[0]['name']}  x{len(run)}  {min(durations):.1f}-{max(durations):.1f} ms each"
                    f"  @+{(first - t0) * 1000:.1f} ms  [{run[0].get('service', '')}]"
                )
                i += len(run)
                continue
            walk(kids[i], depth + 1)
            i += 1

    for root in children.get(None, []):
        walk(root, 0)
    return "\n".join(lines)


def _repeats(kids: list[dict[str, Any]], i: int, children: dict[str | None, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The run of leaf spans starting at ``kids[i]`` that look alike (no children, no events)."""

    def key(s: dict[str, Any]) -> tuple[Any, ...] | None:
        if children.get(s["span_id"]) or s.get("events"):
            return None
        return (s.get("name"), s.get("service"), s.get("status"))

    first = key(kids[i])
    if first is None:
        return [kids[i]]
    j = i + 1
    while j < len(kids) and key(kids[j]) == first:
        j += 1
    return kids[i:j]
