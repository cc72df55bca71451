"""Session logic without sockets: a recording outlet in front of the real SQLite store."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from netstack.config import ChatLimits, ChatTimeouts
from netstack.servers.chat import auth
from netstack.servers.chat.fanout import LocalFanout, watch_topic
from netstack.servers.chat.server import open_store
from netstack.servers.chat.service import MAX_WATCHED, ChatService, Session
from netstack.servers.chat.sqlite import SQLiteStore
from netstack.servers.chat.store import Room
from tests.helpers import apoll_until

PASSWORD = "correct horse battery"


class Outlet:
    """Records what the session logic writes; ``backlog`` fakes unsent bytes."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.backlog = 0

    def write(self, text: str) -> None:
        self.sent.append(json.loads(text))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def buffered(self) -> int:
        return self.backlog

    def types(self) -> list[str]:
        return [e["type"] if e["type"] != "error" else "error:" + e["code"] for e in self.sent]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ChatService]:
    store = SQLiteStore(tmp_path / "chat.sqlite3")
    await store.open()
    svc = ChatService(store, LocalFanout(), limits=ChatLimits(flood_rate=1000, flood_burst=1000))
    yield svc
    svc.close()
    await store.close()


def open_session(service: ChatService) -> tuple[Session, Outlet]:
    outlet = Outlet()
    return service.open_session(outlet), outlet


async def reply(outlet: Outlet, rid: int) -> dict[str, Any]:
    await apoll_until(lambda: any(e.get("id") == rid for e in outlet.sent))
    return next(e for e in outlet.sent if e.get("id") == rid)


async def test_hello_first(service: ChatService) -> None:
    _, outlet = open_session(service)
    assert outlet.types() == ["hello"]
    assert outlet.sent[0]["ping_every"] is None  # no idle timeout configured


async def test_replies_keep_message_order_through_a_flood(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db")
    await store.open()
    limits = ChatLimits(flood_rate=0.001, flood_burst=3, flood_tolerance=0)
    svc = ChatService(store, LocalFanout(), limits=limits)
    session, outlet = open_session(svc)
    for i in range(5):  # 3 accepted, 1 warned, 1 over the tolerance
        session.receive(json.dumps({"type": "ping", "id": i}))
    await apoll_until(lambda: outlet.closed is not None)
    assert outlet.types() == ["hello", "ack", "ack", "ack", "error:slow_down", "error:flood"]
    assert outlet.closed == (1008, "flooding")
    session.receive('{"type":"ping"}')  # after the close: ignored
    assert len(outlet.sent) == 6
    await store.close()


async def test_oversize_message_closes_1009(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db")
    await store.open()
    svc = ChatService(
        store, LocalFanout(), limits=ChatLimits(max_message_bytes=2048, max_file_bytes=12)
    )
    session, outlet = open_session(svc)
    session.receive("x" * 3000)
    await apoll_until(lambda: outlet.closed is not None)
    assert outlet.types() == ["hello", "error:too_large"]
    assert outlet.closed == (1009, "message too big")
    await store.close()


async def test_slow_reader_is_dropped(service: ChatService) -> None:
    alice, a_out = open_session(service)
    bob, b_out = open_session(service)
    alice.receive(json.dumps({"type": "register", "id": 1, "nick": "alice", "password": PASSWORD}))
    bob.receive(json.dumps({"type": "register", "id": 1, "nick": "bob", "password": PASSWORD}))
    await reply(a_out, 1)
    await reply(b_out, 1)
    alice.receive(json.dumps({"type": "create", "id": 2, "room": "general"}))
    await reply(a_out, 2)
    bob.receive(json.dumps({"type": "join", "id": 2, "room": "general"}))
    await reply(b_out, 2)
    alice.receive(json.dumps({"type": "who", "id": 4, "room": "general"}))  # alice watches
    await reply(a_out, 4)
    b_out.backlog = service.limits.max_outgoing_bytes + 1  # bob stopped reading
    alice.receive(json.dumps({"type": "say", "id": 3, "room": "general", "text": "hi"}))
    await reply(a_out, 3)
    assert b_out.closed == (1008, "not reading fast enough")
    assert bob.closed
    assert bob not in service.sessions
    await apoll_until(lambda: not service._background)  # presence updated after the drop
    assert not await service.is_online(bob.user.id)  # type: ignore[union-attr]
    await apoll_until(lambda: any(e.get("offline") for e in a_out.sent))  # the next batch
    offline = [e for e in a_out.sent if e["type"] == "presence" and e["offline"]]
    assert offline == [
        {
            "type": "presence",
            "room": "general",
            "joined": [],
            "left": [],
            "online": [],
            "offline": ["bob"],
        }
    ]
    bob.connection_lost()  # the transport reports it too: nothing happens twice


async def test_a_failing_command_is_an_internal_error_and_the_session_goes_on(
    service: ChatService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    session, outlet = open_session(service)
    session.receive(
        json.dumps({"type": "register", "id": 1, "nick": "alice", "password": PASSWORD})
    )
    await reply(outlet, 1)

    async def broken(name: str) -> Room | None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(service.store, "get_room", broken)
    with caplog.at_level(logging.ERROR, logger="netstack"):
        session.receive(json.dumps({"type": "join", "id": 2, "room": "general"}))
        err = await reply(outlet, 2)
    assert (err["type"], err["code"], err["re"]) == ("error", "internal", "join")
    assert "disk on fire" not in json.dumps(err)  # no internals leak to the client
    assert any("chat command join from alice failed" in r.getMessage() for r in caplog.records)
    session.receive(json.dumps({"type": "ping", "id": 3}))
    assert (await reply(outlet, 3))["type"] == "ack"


async def test_disconnect_while_a_command_runs(service: ChatService) -> None:
    session, outlet = open_session(service)
    session.receive(
        json.dumps({"type": "register", "id": 1, "nick": "alice", "password": PASSWORD})
    )
    await asyncio.sleep(0)  # the worker has started hashing the password
    session.connection_lost()
    await apoll_until(lambda: session._worker is None)
    assert session not in service.sessions
    assert service.online == {}
    assert outlet.types() == ["hello"]


async def test_closed_during_login_is_not_left_online(service: ChatService) -> None:
    first, out = open_session(service)
    first.receive(json.dumps({"type": "register", "id": 1, "nick": "alice", "password": PASSWORD}))
    await reply(out, 1)
    session, _ = open_session(service)
    real = service.store.user_rooms

    async def slow_rooms(user_id: int) -> list[str]:
        session.closed = True  # the connection drops while the login is in flight
        return await real(user_id)

    service.store.user_rooms = slow_rooms  # type: ignore[method-assign]
    await service._enter(session, first.user, new_token=False)  # type: ignore[arg-type]
    assert session.user is None
    assert session not in service.online.get(first.user.id, set())  # type: ignore[union-attr]


async def test_shutdown_closes_every_session(service: ChatService) -> None:
    outlets = [open_session(service)[1] for _ in range(3)]
    service.shutdown()
    assert [o.closed for o in outlets] == [(1001, "server shutting down")] * 3


async def test_download_needs_a_live_token(service: ChatService) -> None:
    with pytest.raises(PermissionError):
        await service.download("x" * 43, "0" * 64)


def test_password_hashes() -> None:
    stored = auth.hash_password("hunter22hunter22", n=2**10)
    assert stored.startswith("scrypt$1024$8$1$")
    assert auth.verify_password("hunter22hunter22", stored)
    assert not auth.verify_password("hunter22hunter2", stored)
    assert not auth.verify_password("x", "argon2$whatever$1$2$3$4")
    assert not auth.verify_password("x", "scrypt$notanumber$8$1$AA==$AA==")
    assert not auth.verify_password("x", "garbage")
    assert auth.hash_password("same", n=2**10) != auth.hash_password("same", n=2**10)  # salted
    assert auth.token_hash("t") == auth.token_hash("t") != "t"


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path / "a.db")), SQLiteStore)
    assert open_store(f"sqlite://{tmp_path}/b.db").path == f"{tmp_path}/b.db"  # type: ignore[attr-defined]
    assert open_store("sqlite://").path == ":memory:"  # type: ignore[attr-defined]
    from netstack.servers.chat.postgres import PostgresStore

    assert isinstance(open_store("postgresql://localhost/chat"), PostgresStore)


async def test_local_fanout() -> None:
    fanout = LocalFanout()
    await fanout.start()
    got: list[str] = []

    class Sub:
        def deliver(self, text: str) -> None:
            got.append(text)

    sub = Sub()
    fanout.subscribe("room:a", sub)
    fanout.publish("room:a", "x")
    fanout.publish("room:b", "y")
    assert fanout.subscribers("room:a") == 1
    fanout.unsubscribe("room:a", sub)
    fanout.unsubscribe("room:a", sub)  # twice is harmless
    fanout.publish("room:a", "z")
    assert got == ["x"]
    assert fanout.subscribers("room:a") == 0
    await fanout.close()


async def test_password_guessing_is_throttled_per_nick(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db")
    await store.open()
    now = [1000.0]
    svc = ChatService(
        store,
        LocalFanout(),
        limits=ChatLimits(flood_rate=1000, flood_burst=1000),
        clock=lambda: now[0],
    )
    session, outlet = open_session(svc)
    rid = iter(range(1, 100))

    async def send(kind: str, **fields: Any) -> dict[str, Any]:
        i = next(rid)
        session.receive(json.dumps({"type": kind, "id": i, **fields}))
        return await reply(outlet, i)

    assert (await send("register", nick="alice", password=PASSWORD))["type"] == "ack"
    assert (await send("logout"))["type"] == "ack"
    for _ in range(10):
        assert (await send("login", nick="alice", password="wrong guess"))["code"] == "auth_failed"
    refused = await send("login", nick="ALICE", password=PASSWORD)  # the right one, too late
    assert refused["code"] == "too_many_attempts"
    assert "retry in 301 s" in refused["message"]
    other = await send("login", nick="bob", password="wrong guess")
    assert other["code"] == "auth_failed"  # other nicks are not affected
    now[0] += 300.0
    assert (await send("login", nick="alice", password=PASSWORD))["type"] == "ack"
    svc.close()
    await store.close()


async def test_pending_dms_survive_a_drop_during_login(service: ChatService) -> None:
    alice, a_out = open_session(service)
    alice.receive(json.dumps({"type": "register", "id": 1, "nick": "alice", "password": PASSWORD}))
    await reply(a_out, 1)
    bob, b_out = open_session(service)
    bob.receive(json.dumps({"type": "register", "id": 1, "nick": "bob", "password": PASSWORD}))
    token = (await reply(b_out, 1))["token"]
    bob.connection_lost()
    alice.receive(json.dumps({"type": "dm", "id": 2, "to": "bob", "text": "later"}))
    assert (await reply(a_out, 2))["delivered"] is False

    dropped, d_out = open_session(service)
    real = service.store.pending

    async def pending_then_drop(user_id: int, limit: int) -> list[Any]:
        found = await real(user_id, limit)
        dropped.connection_lost()  # gone before the ack and the DMs are written
        return found

    service.store.pending = pending_then_drop  # type: ignore[method-assign]
    dropped.receive(json.dumps({"type": "resume", "id": 1, "token": token}))
    await apoll_until(lambda: dropped._worker is None)
    assert d_out.types() == ["hello"]
    service.store.pending = real  # type: ignore[method-assign]

    again, g_out = open_session(service)
    again.receive(json.dumps({"type": "resume", "id": 1, "token": token}))
    await reply(g_out, 1)
    await apoll_until(lambda: "dm" in g_out.types())
    assert [e["message"]["text"] for e in g_out.sent if e["type"] == "dm"] == ["later"]
    assert await service.store.pending(again.user.id, 10) == []  # type: ignore[union-attr]


async def test_local_presence_counts_connections() -> None:
    from netstack.servers.chat.fanout import LocalPresence

    presence = LocalPresence()
    await presence.start()
    assert await presence.connect(7) is True
    assert await presence.connect(7) is False
    assert await presence.is_online(7)
    assert await presence.online([7, 8]) == {7}
    assert await presence.disconnect(7) is False
    assert await presence.disconnect(7) is True
    assert not await presence.is_online(7)
    assert await presence.disconnect(7) is False  # never below zero
    assert await presence.connect(7) is True
    await presence.close()


async def seeded(store: SQLiteStore, n: int, rooms: tuple[str, ...]) -> list[str]:
    """``n`` users u0..u{n-1}, all members of ``rooms`` (u0 owns them); their tokens."""
    tokens = []
    room_ids = []
    for i in range(n):
        user = await store.create_user(f"u{i}", "not-a-hash", 1)
        token = auth.new_token()
        await store.create_session(auth.token_hash(token), user.id, 2**50, 1)
        tokens.append(token)
        if i == 0:
            for name in rooms:
                room_ids.append((await store.create_room(name, "public", "", user.id, 1)).id)
        else:
            for room_id in room_ids:
                await store.add_member(room_id, user.id, "member", 1)
    return tokens


def presence_events(outlet: Outlet) -> list[dict[str, Any]]:
    return [e for e in outlet.sent if e["type"] == "presence"]


async def test_mass_login_is_one_presence_batch_for_watchers_only(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "chat.sqlite3")
    await store.open()
    # A long interval: this test flushes by hand, so the batch boundaries are exact.
    svc = ChatService(
        store,
        LocalFanout(),
        limits=ChatLimits(flood_rate=1000, flood_burst=1000),
        timeouts=ChatTimeouts(presence_interval=3600.0),
    )
    tokens = await seeded(store, 30, ("general",))
    sessions = [open_session(svc) for _ in tokens]
    (watcher, w_out), (_, m_out) = sessions[0], sessions[1]
    watcher.receive(json.dumps({"type": "resume", "id": 1, "token": tokens[0]}))
    await reply(w_out, 1)
    watcher.receive(json.dumps({"type": "who", "id": 2, "room": "general"}))
    assert [m["online"] for m in (await reply(w_out, 2))["members"]] == [True] + [False] * 29
    svc.flush_presence()  # u0's own online change, before it watched
    w_out.sent.clear()
    for (session, _), token in zip(sessions[1:], tokens[1:], strict=True):
        session.receive(json.dumps({"type": "resume", "id": 1, "token": token}))
    for _, outlet in sessions[1:]:
        await reply(outlet, 1)
    assert presence_events(w_out) == []  # nothing until the interval ends
    svc.flush_presence()
    assert presence_events(w_out) == [
        {
            "type": "presence",
            "room": "general",
            "joined": [],
            "left": [],
            "online": [f"u{i}" for i in range(1, 30)],
            "offline": [],
        }
    ]
    # A member that never asked who gets no online/offline: O(watchers), not O(members).
    assert presence_events(m_out) == []
    for session, _ in sessions[1:]:
        session.connection_lost()
    await apoll_until(lambda: not svc._background)
    svc.flush_presence()
    assert presence_events(w_out)[-1]["offline"] == [f"u{i}" for i in range(1, 30)]
    assert presence_events(m_out) == []
    svc.close()
    await store.close()


async def test_watching_is_bounded_and_ends_on_leave_and_logout(service: ChatService) -> None:
    rooms = tuple(f"r{i}" for i in range(MAX_WATCHED + 1))
    tokens = await seeded(service.store, 2, rooms)  # type: ignore[arg-type]
    session, outlet = open_session(service)
    session.receive(json.dumps({"type": "resume", "id": 1, "token": tokens[1]}))
    await reply(outlet, 1)
    fanout = service.fanout
    assert isinstance(fanout, LocalFanout)
    for i, room in enumerate(rooms, start=2):
        session.receive(json.dumps({"type": "who", "id": i, "room": room}))
        await reply(outlet, i)
    assert session.watching == list(rooms[1:])  # the oldest watch was dropped
    assert fanout.subscribers(watch_topic(rooms[0])) == 0
    assert fanout.subscribers(watch_topic(rooms[1])) == 1
    session.receive(json.dumps({"type": "who", "id": 20, "room": rooms[1]}))
    await reply(outlet, 20)
    assert session.watching == [*rooms[2:], rooms[1]]  # asked again: newest, not twice
    session.receive(json.dumps({"type": "leave", "id": 21, "room": rooms[2]}))
    await reply(outlet, 21)
    assert rooms[2] not in session.watching
    assert fanout.subscribers(watch_topic(rooms[2])) == 0
    session.receive(json.dumps({"type": "logout", "id": 22}))
    await reply(outlet, 22)
    assert session.watching == []
    assert all(fanout.subscribers(watch_topic(room)) == 0 for room in rooms)


async def test_unbatched_presence_goes_out_at_once(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "chat.sqlite3")
    await store.open()
    svc = ChatService(store, LocalFanout(), timeouts=ChatTimeouts(presence_interval=None))
    tokens = await seeded(store, 2, ("general",))
    (alice, a_out), (bob, b_out) = open_session(svc), open_session(svc)
    alice.receive(json.dumps({"type": "resume", "id": 1, "token": tokens[0]}))
    await reply(a_out, 1)  # commands are checked against the state they arrive in
    alice.receive(json.dumps({"type": "who", "id": 2, "room": "general"}))
    await reply(a_out, 2)
    bob.receive(json.dumps({"type": "resume", "id": 1, "token": tokens[1]}))
    await reply(b_out, 1)
    assert [e["online"] for e in presence_events(a_out)] == [["u1"]]
    svc.close()
    await store.close()


async def test_who_lists_online_members_first_up_to_the_limit(service: ChatService) -> None:
    tokens = await seeded(service.store, 6, ("general",))  # type: ignore[arg-type]
    sessions = [open_session(service) for _ in range(2)]
    for (session, outlet), token in zip(sessions, (tokens[0], tokens[3]), strict=True):
        session.receive(json.dumps({"type": "resume", "id": 1, "token": token}))
        await reply(outlet, 1)
    session, outlet = sessions[0]
    session.receive(json.dumps({"type": "who", "id": 2, "room": "general", "limit": 3}))
    who = await reply(outlet, 2)
    assert [(m["nick"], m["online"]) for m in who["members"]] == [
        ("u0", True),
        ("u3", True),
        ("u1", False),
    ]
    assert (who["count"], who["online_count"]) == (6, 2)
    session.receive(json.dumps({"type": "who", "id": 3, "room": "general"}))
    assert len((await reply(outlet, 3))["members"]) == 6  # default: up to MAX_WHO
