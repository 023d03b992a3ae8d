"""An asyncio TCP proxy between one service process and RabbitMQ, for network faults.

Each direction (``up``: client to broker, ``down``: broker to client) can be told to
*pass* bytes, to *stall* (hold everything it reads for a while, then deliver it in
order: delayed messages, missed heartbeats) or to be *cut* (every connection closed
at once: the client's robust connection reconnects, unacknowledged deliveries go
back to their queues and come again, replies to a gone reply queue are lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

Direction = Literal["up", "down"]
DIRECTIONS: tuple[Direction, ...] = ("up", "down")


@dataclass
class _Pipe:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    direction: Direction


@dataclass
class FaultProxy:
    """``listen_port`` (0: any free port) forwards to ``upstream_host:upstream_port``."""

    upstream_host: str = "127.0.0.1"
    upstream_port: int = 5672
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    connections: int = 0  # accepted so far
    cuts: int = 0
    _server: asyncio.Server | None = None
    _open: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # a cleared event holds that direction; set means bytes flow
    _flow: dict[Direction, asyncio.Event] = field(default_factory=dict)

    async def start(self) -> int:
        """Listen; returns the port to point ``AMQP_URL`` at."""
        for d in DIRECTIONS:
            self._flow[d] = asyncio.Event()
            self._flow[d].set()
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port)
        self.listen_port = int(self._server.sockets[0].getsockname()[1])
        return self.listen_port

    def url(self, vhost: str, user: str = "guest", password: str = "guest") -> str:
        """An AMQP URL for ``vhost`` through this proxy."""
        return f"amqp://{user}:{password}@{self.listen_host}:{self.listen_port}/{vhost}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        self.cut()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # ---- faults --------------------------------------------------------------------
    def hold(self, *directions: Direction) -> None:
        """Stop forwarding in ``directions`` (both if none given) until :meth:`release`."""
        for d in directions or DIRECTIONS:
            self._flow[d].clear()

    def release(self, *directions: Direction) -> None:
        for d in directions or DIRECTIONS:
            self._flow[d].set()

    async def stall(self, seconds: float, *directions: Direction) -> None:
        """Hold ``directions`` for ``seconds``, then deliver what was held, in order."""
        self.hold(*directions)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.release(*directions)

    def cut(self) -> int:
        """Close every proxied connection now; returns how many were open."""
        n = len(self._open)
        for w in list(self._open):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._open.clear()
        if n:
            self.cuts += 1
        return n

    # ---- plumbing ------------------------------------------------------------------
    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            client_w.transport.abort()
            return
        self.connections += 1
        self._open.update((client_w, broker_w))
        pipes = (_Pipe(client_r, broker_w, "up"), _Pipe(broker_r, client_w, "down"))
        tasks = [asyncio.create_task(self._pump(p)) for p in pipes]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in (client_w, broker_w):
                self._open.discard(w)
                with contextlib.suppress(Exception):
                    w.transport.abort()
            for t in tasks:
                t.cancel()
                self._tasks.discard(t)

    async def _pump(self, pipe: _Pipe) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while True:
                data = await pipe.reader.read(65536)
                if not data:
                    return
                await self._flow[pipe.direction].wait()  # a stall holds what was read
                if pipe.writer.is_closing():
                    return
                pipe.writer.write(data)
                await pipe.writer.drain()


class ProxyThread:
    """Named :class:`FaultProxy` instances on an event loop of their own thread, so they
    outlive each test's loop (the service processes behind them live for the whole run).
    The fault methods are thread-safe and may be called from any loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.proxies: dict[str, FaultProxy] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self.loop.run_forever, name="fault-proxies", daemon=True)
            self._thread.start()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def add(self, name: str, upstream_port: int = 5672) -> int:
        """A new proxy to the broker; returns its port."""
        proxy = FaultProxy(upstream_port=upstream_port)
        port = int(self._run(proxy.start()))
        self.proxies[name] = proxy
        return port

    def _call(self, fn: Any, *args: Any) -> Any:
        async def call() -> Any:
            return fn(*args)
        return self._run(call())

    def hold(self, name: str, *directions: Direction) -> None:
        self._call(self.proxies[name].hold, *directions)

    def release(self, name: str, *directions: Direction) -> None:
        self._call(self.proxies[name].release, *directions)

    def cut(self, name: str) -> int:
        return int(self._call(self.proxies[name].cut))

    async def stall(self, name: str, seconds: float, *directions: Direction) -> None:
        """Hold ``name``'s traffic for ``seconds`` (awaitable from any loop)."""
        self.hold(name, *directions)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.release(name, *directions)

    def stop(self) -> None:
        for p in self.proxies.values():
            with contextlib.suppress(Exception):
                self._run(p.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(5)
