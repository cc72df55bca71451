"""Pure parts of the notes service: page tokens and the bounded fan-out hub."""

from __future__ import annotations

import asyncio
import base64

import pytest

from netstack.servers.rpc import paging
from netstack.servers.rpc.store import like_pattern
from netstack.servers.rpc.watch import Hub, SubscriptionEnded, TooManySubscribers


def test_page_token_round_trip_and_scope():
    token = paging.encode(42, "search:apple")
    assert "=" not in token
    assert paging.decode(token, "search:apple") == 42
    with pytest.raises(paging.BadPageToken, match="different query"):
        paging.decode(token, "search:pear")


@pytest.mark.parametrize(
    "token",
    [
        "!!!",
        base64.urlsafe_b64encode(b"n1:abc:0").decode(),
        base64.urlsafe_b64encode(b"n2:5:0").decode(),
        base64.urlsafe_b64encode(b"n1:0:0").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        base64.urlsafe_b64encode(b"n1:5").decode(),
    ],
)
def test_malformed_page_tokens(token):
    with pytest.raises(paging.BadPageToken, match="malformed"):
        paging.decode(token, "list")


def test_like_pattern_escapes_wildcards():
    assert like_pattern("100%_a\\b") == "%100\\%\\_a\\\\b%"


async def test_hub_delivers_in_order_to_every_subscriber():
    hub: Hub[int] = Hub(backlog=8, max_subscribers=2)
    a, b = hub.subscribe(), hub.subscribe()
    with pytest.raises(TooManySubscribers):
        hub.subscribe()
    for i in range(3):
        hub.publish(i)
    assert [await a.get() for _ in range(3)] == [0, 1, 2]
    assert [await b.get() for _ in range(3)] == [0, 1, 2]
    waiter = asyncio.ensure_future(a.get())
    await asyncio.sleep(0)  # let it block: the point is that get() waits, not a sync
    assert not waiter.done()
    hub.publish(3)
    assert await asyncio.wait_for(waiter, 1) == 3
    hub.unsubscribe(a)
    assert len(hub) == 1


async def test_hub_ends_an_overflowing_subscriber_and_frees_its_queue():
    hub: Hub[int] = Hub(backlog=3, max_subscribers=10)
    slow, fast = hub.subscribe(), hub.subscribe()
    for i in range(3):
        hub.publish(i)
        assert await fast.get() == i
    hub.publish(3)  # slow already holds 3
    assert slow.pending == 0  # dropped, not grown
    hub.publish(4)
    assert slow.pending == 0
    with pytest.raises(SubscriptionEnded) as info:
        await slow.get()
    assert info.value.reason == "overflow"
    assert [await fast.get(), await fast.get()] == [3, 4]


async def test_hub_close_ends_everyone_and_refuses_new_subscribers():
    hub: Hub[int] = Hub(backlog=3, max_subscribers=10)
    sub = hub.subscribe()
    waiter = asyncio.ensure_future(sub.get())
    await asyncio.sleep(0)
    hub.close()
    with pytest.raises(SubscriptionEnded) as info:
        await asyncio.wait_for(waiter, 1)
    assert info.value.reason == "closed"
    with pytest.raises(SubscriptionEnded):
        hub.subscribe()
