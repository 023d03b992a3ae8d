"""Several broker addresses for one robust connection.

``AMQP_URL`` may list the nodes of a RabbitMQ cluster, comma-separated. aio-pika's robust
connection reconnects to the one URL it was given, so a node that died would be retried
forever; this connection instead takes the next address in turn on every attempt after the
first (a lost connection or a failed attempt), and the robust machinery restores channels,
queues and consumers on whichever node answers. Quorum queues are replicated across the
cluster, so any node serves them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import aiormq
from aio_pika import RobustConnection
from aio_pika.abc import AbstractRobustConnection
from yarl import URL


def split_urls(url: str) -> list[str]:
    """``amqp://a/vh,amqp://b/vh`` -> both; a clear error for an empty or mixed list."""
    urls = [u.strip() for u in url.split(",") if u.strip()]
    if not urls:
        raise ValueError("AMQP_URL is empty")
    schemes = {u.split("://", 1)[0] for u in urls}
    if len(schemes) > 1:
        raise ValueError(f"AMQP_URL mixes schemes {sorted(schemes)}: use amqp:// or amqps:// for every node")
    return urls


class FailoverConnection(RobustConnection):
    """A robust connection over several addresses, tried in turn."""

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, *,
                 urls: list[str] | None = None, **kwargs: Any) -> None:
        self._urls = [URL(u) for u in (urls or [str(url)])]
        self._attempts = 0
        super().__init__(url=self._urls[0], loop=loop, **kwargs)
        self._attempts = 0  # the base class cleared ``transport`` once already: not an attempt

    # aio-pika clears ``transport`` at the start of every connection attempt (a name-mangled
    # method we cannot override): that is where the next address is chosen
    @property  # type: ignore[override]
    def transport(self) -> Any:
        return self.__dict__.get("_ferry_transport")

    @transport.setter
    def transport(self, value: Any) -> None:
        if value is None and "_urls" in self.__dict__:
            self.url = self._urls[self._attempts % len(self._urls)]
            self._attempts += 1
        self.__dict__["_ferry_transport"] = value

    @property
    def addresses(self) -> list[URL]:
        return list(self._urls)


async def connect_first(urls: list[str], kwargs: dict[str, Any]) -> AbstractRobustConnection:
    """The first node of ``urls`` that answers (each in turn), as a failover connection that
    later goes on round the list from there."""
    for i in range(len(urls)):
        order = urls[i:] + urls[:i]
        try:
            return await aio_pika.connect_robust(order[0], connection_class=FailoverConnection, urls=order, **kwargs)
        except (aiormq.exceptions.AMQPError, OSError):
            if i == len(urls) - 1:
                raise
    raise AssertionError("unreachable")
