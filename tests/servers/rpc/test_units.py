"""Pure parts of the notes service: page tokens, the bounded fan-out hub, NOTIFY payloads."""

from __future__ import annotations

import asyncio
import base64

import pytest

from netstack.servers.rpc import paging, pgfeed
from netstack.servers.rpc.store import Note, like_pattern
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


async def test_hub_suspend_ends_everyone_until_resumed():
    hub: Hub[int] = Hub(backlog=3, max_subscribers=10)
    sub = hub.subscribe()
    hub.publish(1)
    hub.suspend("feed lost")
    with pytest.raises(SubscriptionEnded) as info:
        await sub.get()  # the queued event is dropped too: the subscriber re-syncs
    assert (info.value.reason, str(info.value)) == ("interrupted", "feed lost")
    with pytest.raises(SubscriptionEnded, match="feed lost"):
        hub.subscribe()
    hub.resume()
    again = hub.subscribe()
    hub.publish(2)
    assert await again.get() == 2
    hub.close()
    hub.suspend("late")  # a feed dropping during shutdown does not reopen anything
    with pytest.raises(SubscriptionEnded) as info:
        hub.subscribe()
    assert info.value.reason == "closed"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            '{"k": "I", "id": 7, "v": 1, "n": ["t", "b\\u00e9", 10, 11]}',
            ("created", Note(7, "t", "bé", 10, 11, 1)),
        ),
        ('{"k": "D", "id": 7, "v": 3, "seq": 12}', ("deleted", 12)),
        (
            '{"k": "U", "id": 7, "v": 2, "n": ["t", "", 10, 12]}',
            ("updated", Note(7, "t", "", 10, 12, 2)),
        ),
    ],
)
def test_pgfeed_parses_its_payloads(payload, expected):
    assert pgfeed.parse(payload) == expected


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "[]",
        "null",
        '{"k": "X", "id": 1, "v": 1, "n": ["t", "b", 1, 1]}',
        '{"k": "I", "id": 1, "v": 1}',
        '{"k": "I", "id": 1, "v": 1, "n": ["t", "b", 1]}',
        '{"k": "I", "id": "1", "v": 1, "n": ["t", "b", 1, 1]}',
        '{"k": "I", "id": 1, "v": 1, "n": ["t", 5, 1, 1]}',
        '{"k": "I", "id": 1, "v": 1, "seq": "3"}',
        '{"k": "I", "v": 1, "n": ["t", "b", 1, 1]}',
    ],
)
def test_pgfeed_rejects_foreign_payloads(payload):
    with pytest.raises(pgfeed.BadNotification, match="not a notes change"):
        pgfeed.parse(payload)
