"""Health and metrics endpoints, served by ``aiohttp.web``, and their client.

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

    health = HealthServer.from_settings(settings)
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
import json
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import HttpVersion11, StreamReader, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage
from aiohttp.web_protocol import RequestHandler

from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import REGISTRY, Registry
from .settings import Settings

__all__ = ["Check", "HealthServer", "probe", "DEFAULT_PORT", "DEFAULT_READY_URL"]

#: The port services listen on when ``FERRY_HEALTH_PORT`` is unset.
DEFAULT_PORT = 8080
#: What ``ferry health`` probes by default.
DEFAULT_READY_URL = f"http://127.0.0.1:{DEFAULT_PORT}/readyz"

#: A readiness check: ``True`` when healthy; ``False`` or a reason string when not.
Check = Callable[[], Awaitable[bool | str]]

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
        self._runner: web.ServerRunner | None = None
        self._site: web.TCPSite | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> HealthServer:
        """A server on the settings' ``health_port`` (``FERRY_HEALTH_PORT``, default 8080)."""
        return cls(settings.health_port, **kwargs)

    @property
    def port(self) -> int:
        """The bound port (the real one once started with port 0)."""
        server = self._site._server if self._site is not None else None
        sockets = getattr(server, "sockets", None)
        if sockets:
            return int(sockets[0].getsockname()[1])
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
        if self._runner is not None:
            return
        # aiohttp's low-level server: four fixed paths need no router, and its request factory
        # lets every answer, a 400 to an unparsable request too, say HTTP/1.1
        server = web.Server(
            self._serve,
            request_factory=_http11_request,
            access_log=None,
            keepalive_timeout=self.request_timeout,  # an idle or silent connection is closed
        )
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._site = runner, site

    async def close(self) -> None:
        """Stop serving and wait for the listener to close."""
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()

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

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        # probes and scrapes are one request each: every answer closes its connection
        if request.method not in ("GET", "HEAD"):
            response = _text(405, b"method not allowed\n", Allow="GET, HEAD")
        elif request.path in ("/healthz", "/livez"):
            response = _answer(200, b'{"status":"ok"}\n', "application/json")
        elif request.path == "/readyz":
            ok, report = await self.readiness()
            body = (json.dumps(report, sort_keys=True) + "\n").encode()
            response = _answer(200 if ok else 503, body, "application/json")
        elif request.path == "/metrics":
            response = _answer(200, self.registry.render().encode(), METRICS_CONTENT_TYPE)
        else:
            response = _text(404, b"not found\n")
        response.force_close()
        return response


def _answer(status: int, body: bytes, content_type: str, **headers: str) -> web.Response:
    fields = {"Content-Type": content_type, "Cache-Control": "no-store", **headers}
    return web.Response(status=status, body=body, headers=fields)


def _text(status: int, body: bytes, **headers: str) -> web.Response:
    return _answer(status, body, "text/plain", **headers)


def _http11_request(
    message: RawRequestMessage,
    payload: StreamReader,
    protocol: RequestHandler,
    writer: AbstractStreamWriter,
    task: asyncio.Task[None],
) -> web.BaseRequest:
    # aiohttp echoes the request's version and takes 1.0 for one it could not parse; a server
    # answers with the highest version it speaks (RFC 9110, 6.2)
    message = message._replace(version=HttpVersion11)
    return web.BaseRequest(message, payload, protocol, writer, task, asyncio.get_running_loop())


async def probe(url: str = DEFAULT_READY_URL, timeout_s: float = 3.0) -> tuple[bool, str]:
    """GET ``url``; return ``(True, body)`` on a 2xx answer, else ``(False, why)``.

    Plain ``http://`` only (the health port is never TLS). Never raises for network
    errors: an unreachable server, or one silent for ``timeout_s`` seconds, is simply
    unhealthy. ``ferry health`` exits 0 exactly when the first element is ``True``.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False, f"unsupported URL {url!r}: only http://HOST[:PORT]/PATH"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    headers = {"User-Agent": "ferry-health", "Connection": "close"}
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, headers=headers, allow_redirects=False) as response,
        ):
            status = response.status
            text = (await response.text(errors="replace")).strip()
    except TimeoutError:
        return False, f"{url}: no answer within {timeout_s:g}s"
    except aiohttp.ClientResponseError as exc:
        return False, f"{url}: not an HTTP answer: {exc.message[:80]!r}"
    except (aiohttp.ClientError, OSError) as exc:
        return False, f"{url}: {getattr(exc, 'strerror', None) or exc}"
    if 200 <= status < 300:
        return True, text
    return False, f"{url}: HTTP {status}: {text}" if text else f"{url}: HTTP {status}"
