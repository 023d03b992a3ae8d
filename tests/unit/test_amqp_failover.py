"""AMQP_URL with several nodes: parsing, and the next address on every attempt after the first."""

from __future__ import annotations

import pytest

from ferry_common.bus.amqp import AmqpBus
from ferry_common.bus.failover import FailoverConnection, split_urls

A, B, C = (f"amqp://guest:guest@127.0.0.1:{p}/vh" for p in (5681, 5682, 5683))


def test_split_urls() -> None:
    assert split_urls(f"{A}, {B},{C}") == [A, B, C]
    assert split_urls(A) == [A]
    assert AmqpBus(f"{A},{B}").urls == [A, B]


@pytest.mark.parametrize("bad", ["", " , ", f"{A},amqps://x:5671/vh"])
def test_bad_url_lists_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="AMQP_URL"):
        split_urls(bad)


async def test_each_attempt_after_the_first_takes_the_next_address() -> None:
    conn = FailoverConnection(split_urls(A)[0], urls=[A, B, C])  # type: ignore[arg-type]
    ports = []
    for _ in range(5):
        conn.transport = None  # what aio-pika does at the start of every connection attempt
        ports.append(conn.url.port)
    assert ports == [5681, 5682, 5683, 5681, 5682]
    assert [u.port for u in conn.addresses] == [5681, 5682, 5683]
