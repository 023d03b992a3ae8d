"""Health and metrics endpoints: a tiny dependency-free asyncio HTTP server, and its client.

Every Ferry service runs one :class:`HealthServer` (port ``FERRY_HEALTH_PORT``, default 8080):

``GET /healthz``
    Liveness: 200 whenever the event loop answers. Kubernetes restarts a pod that stops
    answering.
``GET /readyz``
    Readiness: 200 when :meth:`HealthServer.set_ready` was given ``True`` and every check
    passes, else 503. The JSON body says which checks failed and why. Kubernetes stops
    routing to (and rollouts wait for) a pod that is not ready.
``GET /metrics``
    The Prometheus text exposition of :data:`ferry_common.metrics.REGISTRY`.

A check is ``async def check() -> bool | str``: return ``True`` when healthy, and ``False`` or
a string saying why when not. A check that raises or exceeds ``check_timeout`` fails::

    health = HealthServer.from_env()
    health.add_check("amqp", bus_connected)
    await health.start()
    ...                      # connect, declare queues, recover state
    health.set_ready(True)
    ...
    await health.close()

:func:`probe` is the client side, used by ``ferry health`` for exec probes and compose
healthchecks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import REGISTRY, Registry

__all__ = ["Check", "HealthServer", "probe", "DEFAULT_PORT", "DEFAULT_READY_URL"]

#: The port services listen on when ``FERRY_HEALTH_PORT`` is unset.
DEFAULT_PORT = 8080
#: What ``ferry health`` probes by default.
DEFAULT_READY_URL = f"http://127.0.0.1:{DEFAULT_PORT}/readyz"

#: A readiness check: ``True`` when healthy; ``False`` or a reason string when not.
Check = Callable[[], Awaitable[bool | str]]

_MAX_REQUEST_HEAD = 8192
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    503: "Service Unavailable",
}


class HealthServer:
    """Serves ``/healthz``, ``/readyz`` and ``/metrics`` over plain HTTP/1.1.

    Args:
        port: TCP port; ``0`` picks a free one (read it back from :attr:`port`).
        host: address to bind; ``0.0.0.0`` so that kubelet and Prometheus can reach it.
        registry: the metrics to serve (default: the process-wide registry).
        check_timeout: seconds each readiness check may take before it counts as failed.
        request_timeout: seconds a client has to send its request head.
    """

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        host: str = "0.0.0.0",
        *,
        registry: Registry | None = None,
        check_timeout: float = 2.0,
        request_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self._port = port
        self.registry = registry if registry is not None else REGISTRY
        self.check_timeout = check_timeout
        self.request_timeout = request_timeout
        self._checks: dict[str, Check] = {}
        self._ready = False
        self._server: asyncio.Server | None = None

    @classmethod
    def from_env(cls, **kwargs: Any) -> HealthServer:
        """A server on ``FERRY_HEALTH_PORT`` (default 8080)."""
        port = int(os.environ.get("FERRY_HEALTH_PORT", "") or DEFAULT_PORT)
        return cls(port, **kwargs)

    @property
    def port(self) -> int:
        """The bound port (the real one once started with port 0)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def ready(self) -> bool:
        """The flag last given to :meth:`set_ready` (``False`` until then)."""
        return self._ready

    def add_check(self, name: str, check: Check) -> None:
        """Register (or replace) a readiness check under ``name``."""
        self._checks[name] = check

    def remove_check(self, name: str) -> None:
        """Forget the check ``name`` (no error if absent)."""
        self._checks.pop(name, None)

    def set_ready(self, ready: bool) -> None:
        """Declare start-up finished (``True``) or the service draining (``False``)."""
        self._ready = ready

    async def start(self) -> None:
        """Bind and start serving in the background."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._handle, self.host, self._port)

    async def close(self) -> None:
        """Stop serving and wait for the listener to close."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Run every check concurrently; return (ready, report) as ``/readyz`` serves it."""
        names = list(self._checks)
        results = await asyncio.gather(*(self._run_check(self._checks[n]) for n in names))
        checks: dict[str, dict[str, Any]] = {}
        failed: list[str] = []
        for name, (ok, reason) in zip(names, results, strict=True):
            entry: dict[str, Any] = {"ok": ok}
            if not ok:
                entry["reason"] = reason
                failed.append(name)
            checks[name] = entry
        if not self._ready:
            failed.insert(0, "started")
            checks = {"started": {"ok": False, "reason": "service still starting"}, **checks}
        ok = not failed
        report = {"status": "ready" if ok else "not ready", "failed": failed, "checks": checks}
        return ok, report

    async def _run_check(self, check: Check) -> tuple[bool, str]:
        try:
            result = await asyncio.wait_for(check(), self.check_timeout)
        except TimeoutError:
            return False, f"timed out after {self.check_timeout:g}s"
        except Exception as exc:  # a broken check must not take the endpoint down
            return False, f"{type(exc).__name__}: {exc}"
        if result is True:
            return True, ""
        if isinstance(result, str):
            return False, result or "check failed"
        return False, "check failed"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.request_timeout)
            except TimeoutError:
                await self._respond(writer, 408, b"request timeout\n", "text/plain")
                return
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                await self._respond(writer, 400, b"bad request\n", "text/plain")
                return
            if len(head) > _MAX_REQUEST_HEAD:
                await self._respond(writer, 400, b"request head too large\n", "text/plain")
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._respond(writer, 400, b"bad request\n", "text/plain")
                return
            method, target = parts[0], parts[1]
            path = urlsplit(target).path
            head_only = method == "HEAD"
            if method not in ("GET", "HEAD"):
                await self._respond(
                    writer, 405, b"method not allowed\n", "text/plain", allow="GET, HEAD"
                )
                return
            if path in ("/healthz", "/livez"):
                await self._respond(
                    writer, 200, b'{"status":"ok"}\n', "application/json", head_only
                )
            elif path == "/readyz":
                ok, report = await self.readiness()
                body = (json.dumps(report, sort_keys=True) + "\n").encode()
                await self._respond(writer, 200 if ok else 503, body, "application/json", head_only)
            elif path == "/metrics":
                body = self.registry.render().encode()
                await self._respond(writer, 200, body, METRICS_CONTENT_TYPE, head_only)
            else:
                await self._respond(writer, 404, b"not found\n", "text/plain", head_only)
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str,
        head_only: bool = False,
        allow: str | None = None,
    ) -> None:
        headers = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if allow:
            headers.append(f"Allow: {allow}")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(body)
        await writer.drain()


async def probe(url: str = DEFAULT_READY_URL, timeout_s: float = 3.0) -> tuple[bool, str]:
    """GET ``url``; return ``(True, body)`` on a 2xx answer, else ``(False, why)``.

    Plain ``http://`` only (the health port is never TLS). Never raises for network
    errors: an unreachable server, or one silent for ``timeout_s`` seconds, is simply
    unhealthy. ``ferry health`` exits 0
    exactly when the first element is ``True``.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False, f"unsupported URL {url!r}: only http://HOST[:PORT]/PATH"
    host = parts.hostname
    port = parts.port or 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    host_header = f"[{host}]" if ":" in host else host
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                request = (
                    f"GET {target} HTTP/1.1\r\nHost: {host_header}:{port}\r\n"
                    "User-Agent: ferry-health\r\nAccept: */*\r\nConnection: close\r\n\r\n"
                )
                writer.write(request.encode("latin-1"))
                await writer.drain()
                raw = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except TimeoutError:
        return False, f"{url}: no answer within {timeout_s:g}s"
    except OSError as exc:
        return False, f"{url}: {exc.strerror or exc}"
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        return False, f"{url}: not an HTTP answer: {status_line[:80]!r}"
    status = int(fields[1])
    text = body.decode("utf-8", "replace").strip()
    if 200 <= status < 300:
        return True, text
    return False, f"{url}: HTTP {status}: {text}" if text else f"{url}: HTTP {status}"
