"""HealthServer endpoints, the probe client, and the metrics registry's text exposition."""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
from collections.abc import AsyncIterator

import pytest

from ferry_common import metrics
from ferry_common.health import HealthServer, probe
from ferry_common.metrics import Registry

# --- a tiny parser of the Prometheus text format (0.0.4), strict enough to catch mistakes ---

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>.*)\})?"
    r" (?P<value>[-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|Inf|NaN))$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')

Sample = tuple[str, dict[str, str], float]


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def parse_exposition(text: str) -> tuple[dict[str, str], list[Sample]]:
    """Parse exposition text into ({family: type}, [(name, labels, value)]); fail on anything odd."""
    assert text.endswith("\n"), "exposition must end with a newline"
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: list[Sample] = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"duplicate HELP for {name}"
            helps.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"}
            assert name not in types, f"duplicate TYPE for {name}"
            types[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"unparsable sample line: {line!r}"
            labels: dict[str, str] = {}
            raw = match.group("labels") or ""
            pos = 0
            while pos < len(raw):
                lm = _LABEL.match(raw, pos)
                assert lm, f"bad labels in {line!r}"
                assert lm.group(1) not in labels
                labels[lm.group(1)] = _unescape(lm.group(2))
                pos = lm.end()
            family = match.group("name")
            for suffix in ("_bucket", "_sum", "_count"):
                base = family.removesuffix(suffix)
                if base != family and types.get(base) == "histogram":
                    family = base
            assert family in types, f"sample {match.group('name')} before its TYPE line"
            samples.append((match.group("name"), labels, float(match.group("value"))))
    return types, samples


def value_of(samples: list[Sample], name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples if n == name and lab == labels]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


# --- fixtures ---


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    srv = HealthServer(0, host="127.0.0.1", check_timeout=0.5)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    if method == "HEAD":
        assert body == b""
    else:
        assert int(headers["Content-Length"]) == len(body)
    return int(lines[0].split()[1]), headers, body.decode()


# --- endpoints ---


async def test_healthz_answers_while_not_ready(server: HealthServer) -> None:
    status, headers, body = await http_get(server.port, "/healthz")
    assert status == 200
    assert json.loads(body) == {"status": "ok"}
    assert headers["Content-Type"] == "application/json"


async def test_readyz_not_ready_until_started(server: HealthServer) -> None:
    status, _, body = await http_get(server.port, "/readyz")
    assert status == 503
    report = json.loads(body)
    assert report["status"] == "not ready"
    assert report["failed"] == ["started"]
    server.set_ready(True)
    status, _, body = await http_get(server.port, "/readyz")
    assert status == 200
    assert json.loads(body) == {"status": "ready", "failed": [], "checks": {}}


async def test_readyz_reports_failing_checks(server: HealthServer) -> None:
    state = {"amqp": True}

    async def amqp() -> bool:
        return state["amqp"]

    async def store() -> bool | str:
        return True

    async def disk() -> bool | str:
        return "state dir not writable"

    async def broken() -> bool:
        raise RuntimeError("boom")

    async def slow() -> bool:
        await asyncio.sleep(5)
        return True

    server.set_ready(True)
    server.add_check("amqp", amqp)
    server.add_check("store", store)
    status, _, body = await http_get(server.port, "/readyz")
    assert status == 200, body
    assert json.loads(body)["checks"] == {"amqp": {"ok": True}, "store": {"ok": True}}

    state["amqp"] = False
    server.add_check("disk", disk)
    server.add_check("broken", broken)
    server.add_check("slow", slow)
    status, headers, body = await http_get(server.port, "/readyz")
    assert status == 503
    assert headers["Content-Type"] == "application/json"
    report = json.loads(body)
    assert report["status"] == "not ready"
    assert sorted(report["failed"]) == ["amqp", "broken", "disk", "slow"]
    assert report["checks"]["store"] == {"ok": True}
    assert report["checks"]["amqp"] == {"ok": False, "reason": "check failed"}
    assert report["checks"]["disk"]["reason"] == "state dir not writable"
    assert report["checks"]["broken"]["reason"] == "RuntimeError: boom"
    assert "timed out" in report["checks"]["slow"]["reason"]

    for name in ("disk", "broken", "slow"):
        server.remove_check(name)
    state["amqp"] = True
    status, _, _ = await http_get(server.port, "/readyz")
    assert status == 200
    server.set_ready(False)  # draining
    status, _, _ = await http_get(server.port, "/readyz")
    assert status == 503


async def test_metrics_endpoint_parses() -> None:
    registry = Registry()
    jobs = registry.counter("test_jobs_total", "Jobs done.", ["outcome"])
    temp = registry.gauge("test_temperature", "A gauge\nwith a newline \\ in help.")
    lat = registry.histogram("test_latency_seconds", "Latency.", ["step"], buckets=(0.1, 1, 10))
    jobs.labels(outcome="completed").inc()
    jobs.labels(outcome="completed").inc(2)
    jobs.labels('fail"ed\n\\x').inc()
    temp.set(-1.5)
    for v in (0.05, 0.1, 0.5, 5, 50):
        lat.labels(step="precopy").observe(v)
    async with HealthServer(0, host="127.0.0.1", registry=registry) as srv:
        status, headers, body = await http_get(srv.port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    types, samples = parse_exposition(body)
    assert types == {
        "test_jobs_total": "counter",
        "test_temperature": "gauge",
        "test_latency_seconds": "histogram",
    }
    assert value_of(samples, "test_jobs_total", outcome="completed") == 3
    assert value_of(samples, "test_jobs_total", outcome='fail"ed\n\\x') == 1
    assert value_of(samples, "test_temperature") == -1.5
    buckets = {lab["le"]: v for n, lab, v in samples if n == "test_latency_seconds_bucket"}
    assert {float(k): v for k, v in buckets.items()} == {0.1: 2, 1.0: 3, 10.0: 4, math.inf: 5}
    assert value_of(samples, "test_latency_seconds_count", step="precopy") == 5
    assert value_of(samples, "test_latency_seconds_sum", step="precopy") == pytest.approx(55.65)


async def test_default_registry_has_the_fleet_metrics(server: HealthServer) -> None:
    metrics.MIGRATIONS_TOTAL.labels(outcome="rolled_back").inc()
    metrics.MESSAGES_DEAD_LETTERED_TOTAL.labels(service="sensor", code="bad_signature").inc()
    metrics.QUEUED_EVENTS.labels(host="host-a").set(7)
    with metrics.MIGRATION_DURATION_SECONDS.time():
        pass
    status, _, body = await http_get(server.port, "/metrics")
    assert status == 200
    types, samples = parse_exposition(body)
    assert {
        "ferry_migrations_total": "counter",
        "ferry_migration_step_seconds": "histogram",
        "ferry_migration_duration_seconds": "histogram",
        "ferry_queued_events": "gauge",
        "ferry_vm_downtime_seconds": "histogram",
        "ferry_messages_dead_lettered_total": "counter",
        "ferry_messages_handled_total": "counter",
    }.items() <= types.items()
    assert value_of(samples, "ferry_migrations_total", outcome="rolled_back") >= 1
    assert value_of(samples, "ferry_queued_events", host="host-a") == 7
    assert value_of(samples, "ferry_migration_duration_seconds_count") >= 1
    assert (
        value_of(
            samples, "ferry_messages_dead_lettered_total", service="sensor", code="bad_signature"
        )
        >= 1
    )


async def test_unknown_paths_and_methods(server: HealthServer) -> None:
    assert (await http_get(server.port, "/nope"))[0] == 404
    assert (await http_get(server.port, "/healthz", method="POST"))[0] == 405
    status, _, body = await http_get(server.port, "/healthz", method="HEAD")
    assert (status, body) == (200, "")
    assert (await http_get(server.port, "/readyz?verbose=1"))[0] == 503
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"garbage\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 400")


# --- probe ---


async def test_probe(server: HealthServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    ok, text = await probe(f"{base}/healthz")
    assert ok and json.loads(text) == {"status": "ok"}
    ok, text = await probe(f"{base}/readyz")
    assert not ok and "503" in text and "started" in text
    server.set_ready(True)
    assert (await probe(f"{base}/readyz"))[0]
    ok, text = await probe("https://127.0.0.1/readyz")
    assert not ok and "unsupported" in text


async def test_probe_unreachable_and_silent() -> None:
    # A port nobody listens on: find one by binding and closing.
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    ok, text = await probe(f"http://127.0.0.1:{port}/readyz", timeout_s=2)
    assert not ok and text

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3)
        writer.close()

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        ok, text = await probe(f"http://127.0.0.1:{port}/readyz", timeout_s=0.2)
        assert not ok and "no answer" in text
    finally:
        srv.close()


# --- registry unit checks ---


def test_registry_rejects_misuse() -> None:
    registry = Registry()
    c = registry.counter("x_total", "x", ["a"])
    with pytest.raises(ValueError):
        registry.counter("x_total", "again")
    with pytest.raises(ValueError):
        c.inc()  # labelled: needs .labels()
    with pytest.raises(ValueError):
        c.labels(b="1")
    with pytest.raises(ValueError):
        c.labels(a="1").inc(-1)
    with pytest.raises(ValueError):
        registry.gauge("bad name", "x")
    with pytest.raises(ValueError):
        registry.histogram("h", "x", ["le"])
    assert registry.get("x_total") is c


def test_counter_is_thread_safe() -> None:
    registry = Registry()
    c = registry.counter("n_total", "n")

    def work() -> None:
        for _ in range(10_000):
            c.inc()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, samples = parse_exposition(registry.render())
    assert value_of(samples, "n_total") == 40_000
