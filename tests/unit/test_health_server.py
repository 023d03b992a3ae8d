"""The aiohttp health server's own limits: a client that says nothing is let go."""

from __future__ import annotations

import asyncio

from ferry_common.health import HealthServer


async def test_a_silent_connection_is_closed_after_request_timeout() -> None:
    async with HealthServer(0, host="127.0.0.1", request_timeout=0.3) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert loop.time() - started < 3
        writer.close()


async def test_port_is_the_bound_one_and_close_frees_it() -> None:
    srv = HealthServer(0, host="127.0.0.1")
    await srv.start()
    port = srv.port
    assert port != 0
    await srv.close()
    again = HealthServer(port, host="127.0.0.1")
    await again.start()  # the port is free once closed
    await again.close()
