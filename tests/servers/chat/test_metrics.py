"""``chat serve --metrics-bind``: real WebSocket and TCP users, a real scrape of ``/metrics``."""

from __future__ import annotations

import socket

import pytest

from netstack.servers.chat import ChatServer
from tests.helpers import apoll_until
from tests.helpers.scrape import ascrape, value
from tests.servers.chat.support import chat_config, chat_server, tcp, ws


def users(samples) -> float:
    return value(samples, "netstack_chat_users_online")


def connections(samples, transport: str) -> float:
    return value(samples, "netstack_chat_connections", transport=transport)


def messages(samples) -> float:
    return value(samples, "netstack_chat_messages_total")


async def test_users_connections_messages_and_rooms(tmp_path):
    async with chat_server(tmp_path / "chat.db", metrics_bind="127.0.0.1:0") as srv:
        address = srv.metrics_address
        assert address is not None
        samples = await ascrape(address)
        assert (users(samples), messages(samples)) == (0, 0)
        assert (connections(samples, "ws"), connections(samples, "tcp")) == (0, 0)
        assert value(samples, "netstack_chat_rooms") == 0

        alice, bob = await ws(srv), await ws(srv)
        await alice.register("alice")
        await bob.register("bob")
        await alice.ok("create", room="general")
        await bob.ok("join", room="general")
        await alice.ok("create", room="quiet")
        lurker = await tcp(srv)  # connected, not logged in: a connection, not a user
        samples = await ascrape(address)
        assert users(samples) == 2
        assert connections(samples, "ws") == 2
        assert connections(samples, "tcp") == 1
        assert value(samples, "netstack_chat_rooms") == 2
        assert messages(samples) == 0

        await alice.ok("say", room="general", text="hello bob")
        samples = await ascrape(address)
        assert messages(samples) == 1
        await bob.ok("dm", to="alice", text="hi alice")
        await bob.fails("say", "no_such_room", room="nowhere", text="lost")  # not accepted
        samples = await ascrape(address)
        assert messages(samples) == 2

        # A second session of the same user is one more connection, not one more user.
        alice2 = await ws(srv)
        await alice2.login("alice")
        samples = await ascrape(address)
        assert (users(samples), connections(samples, "ws")) == (2, 3)

        await bob.close()
        await apoll_until(lambda: len(srv.service.online) == 1)
        samples = await ascrape(address)
        assert users(samples) == 1
        assert connections(samples, "ws") == 2
        assert value(samples, "netstack_chat_rooms") == 2  # alice is in both

        await alice.close()
        await alice2.close()
        await lurker.close()
        await apoll_until(lambda: not srv.service.online and not srv.service.sessions)
        samples = await ascrape(address)
        assert users(samples) == 0
        assert (connections(samples, "ws"), connections(samples, "tcp")) == (0, 0)
        assert value(samples, "netstack_chat_rooms") == 0
        assert messages(samples) == 2  # a counter never goes down


async def test_without_metrics_bind_no_endpoint(tmp_path):
    async with chat_server(tmp_path / "chat.db", tcp_bind=None) as srv:
        assert srv.metrics_address is None
        assert srv.metrics_server is None


async def test_metrics_port_in_use_fails_start_and_releases_the_listeners(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        server = ChatServer(chat_config(tmp_path / "chat.db", metrics_bind=f"127.0.0.1:{port}"))
        with pytest.raises(OSError, match=f"metrics_bind 127.0.0.1:{port}: Address already in use"):
            await server.start()
        assert server.ws is not None
        assert server.ws.server is not None
        assert not server.ws.server.is_serving()
