"""Chat server end to end: real sockets on 127.0.0.1:0, raw TCP lines and a websockets client."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from netstack.config import TLS, ChatLimits, ChatTimeouts
from netstack.servers.chat import ChatServer
from tests.helpers import TIMEOUT, apoll_until
from tests.servers.chat.support import (
    PASSWORD,
    Client,
    TCPClient,
    WSClient,
    chat_config,
    chat_server,
    tcp,
    ws,
)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "chat.sqlite3"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """For the end-to-end tests that also run on PostgreSQL (the store suite covers the rest)."""
    if request.param == "sqlite":
        return str(tmp_path / "chat.sqlite3")
    url: str = request.getfixturevalue("pg_url")
    return url


async def http_get(
    addr: tuple[str, int], path: str, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(*addr)
    headers.setdefault("Host", f"{addr[0]}:{addr[1]}")
    lines = [f"GET {path} HTTP/1.1"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    async with asyncio.timeout(TIMEOUT):
        raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


async def closing(*clients: Client) -> None:
    for client in clients:
        await client.close()


# ---------------------------------------------------------------- accounts


async def test_register_login_resume_logout(db: Path) -> None:
    async with chat_server(db) as srv:
        a = await tcp(srv)
        assert a.hello["protocol"] == 1
        assert a.hello["ping_every"] == 30.0  # half the default 60 s idle timeout
        assert a.hello["limits"]["max_text_chars"] == 4000
        reg = await a.register("alice")
        assert reg["nick"] == "alice"
        assert len(reg["token"]) >= 40
        assert reg["rooms"] == []
        await a.close()

        b = await ws(srv)
        await b.fails("login", "auth_failed", nick="alice", password="wrong password")
        await b.fails("login", "auth_failed", nick="nobody", password=PASSWORD)
        await b.fails("register", "nick_taken", nick="ALICE", password=PASSWORD)
        login = await b.login("Alice")  # nicks are unique ignoring case
        assert login["nick"] == "alice"
        assert login["token"] != reg["token"]
        await b.fails("login", "already_authenticated", nick="alice", password=PASSWORD)

        c = await tcp(srv)
        await c.fails("resume", "bad_token", token="x" * 43)
        resumed = await c.ok("resume", token=login["token"])
        assert resumed["nick"] == "alice"
        assert "token" not in resumed  # the same session continues
        await c.ok("logout")
        await c.fails("say", "not_authenticated", room="general", text="hi")
        await c.fails("resume", "bad_token", token=login["token"])  # logout revoked it
        await c.ok("resume", token=reg["token"])  # other sessions stay valid
        await closing(b, c)


async def test_expired_token_is_refused(db: Path) -> None:
    async with chat_server(db, chat_timeouts=ChatTimeouts(session_ttl=0.001)) as srv:
        a = await tcp(srv)
        token = (await a.register("alice"))["token"]
        b = await tcp(srv)
        await asyncio.sleep(0.01)  # the token's lifetime is 1 ms, not a synchronisation
        await b.fails("resume", "bad_token", token=token)
        await closing(a, b)


async def test_unauthenticated_commands_are_refused(db: Path) -> None:
    async with chat_server(db) as srv:
        for client in (await tcp(srv), await ws(srv)):
            for kind, fields in [
                ("say", {"room": "general", "text": "hi"}),
                ("join", {"room": "general"}),
                ("rooms", {}),
                ("dm", {"to": "bob", "text": "x"}),
                ("logout", {}),
            ]:
                await client.fails(kind, "not_authenticated", **fields)
            pong = await client.ok("ping")
            assert pong["time"] > 0
            await client.close()


# ---------------------------------------------------------------- messaging


async def test_two_users_exchange_messages_across_tcp_and_ws(db: Path) -> None:
    async with chat_server(db) as srv:
        alice, bob = await tcp(srv), await ws(srv)
        await alice.register("alice")
        await bob.register("bob")
        created = await alice.ok("create", room="general", topic="everything")
        assert created["room"] == {
            "name": "general",
            "visibility": "public",
            "topic": "everything",
            "role": "owner",
        }
        await alice.fails("create", "room_exists", room="general")
        await bob.ok("join", room="general")
        joined = await alice.presence("general", joined="bob")
        assert joined == {
            "type": "presence",
            "room": "general",
            "joined": ["bob"],
            "left": [],
            "online": [],
            "offline": [],
        }

        sent = await alice.ok("say", room="general", text="hi bob")
        msg = sent["message"]
        assert msg["from"] == "alice"
        assert msg["room"] == "general"
        assert msg["text"] == "hi bob"
        assert msg["id"] > 0
        assert msg["ts"] > 0
        assert (await bob.expect("message"))["message"] == msg
        assert (await alice.expect("message"))["message"] == msg  # the sender sees it too

        reply = await bob.ok("say", room="general", text="héllo ✓\nsecond line")
        assert (await alice.expect("message"))["message"] == reply["message"]
        assert reply["message"]["id"] > msg["id"]

        who = await bob.ok("who", room="general")
        assert who["members"] == [
            {"nick": "alice", "role": "owner", "online": True, "muted": False},
            {"nick": "bob", "role": "member", "online": True, "muted": False},
        ]
        rooms = await bob.ok("rooms")
        assert rooms["rooms"] == [
            {
                "name": "general",
                "visibility": "public",
                "topic": "everything",
                "role": "member",
                "members": 2,
                "joined": True,
            }
        ]
        await bob.ok("leave", room="general")
        await alice.presence("general", left="bob")
        await bob.fails("say", "not_member", room="general", text="still here?")
        await bob.fails("leave", "not_member", room="general")
        await bob.fails("join", "no_such_room", room="nowhere")
        await closing(alice, bob)


async def test_presence_online_offline(db: Path) -> None:
    async with chat_server(db) as srv:
        alice, bob = await tcp(srv), await ws(srv)
        await alice.register("alice")
        await bob.register("bob")
        await alice.ok("create", room="general")
        await bob.ok("join", room="general")
        await alice.presence("general", joined="bob")
        await alice.ok("who", room="general")  # the member pane: online/offline from now on
        await bob.close()
        event = await alice.presence("general", offline="bob")
        assert event["online"] == []
        bob = await tcp(srv)
        login = await bob.login("bob")
        assert login["rooms"] == ["general"]
        await alice.presence("general", online="bob")
        # A second session of the same user does not announce again: the next batch
        # (carol joining, after bob2 came and went) holds nothing about bob.
        bob2 = await ws(srv)
        await bob2.login("bob")
        await bob2.close()
        await apoll_until(lambda: len(srv.service.sessions) == 2)
        carol = await tcp(srv)
        await carol.register("carol")
        await carol.ok("join", room="general")
        await alice.presence("general", joined="carol")
        assert not [e for e in alice.events if e["type"] == "presence"]
        await carol.close()
        await closing(alice, bob)


async def test_direct_messages_and_offline_delivery(any_db: str) -> None:
    db = any_db
    async with chat_server(db) as srv:
        alice, bob = await tcp(srv), await ws(srv)
        await alice.register("alice")
        await bob.register("bob")
        carol = await tcp(srv)
        await carol.register("carol")
        await carol.close()

        live = await alice.ok("dm", to="bob", text="psst")
        assert live["delivered"] is True
        got = await bob.expect("dm")
        assert got["message"] == live["message"]
        assert got["message"]["to"] == "bob"
        assert (await alice.expect("dm"))["message"]["id"] == live["message"]["id"]

        await alice.fails("dm", "no_such_user", to="nobody", text="hello?")
        first = await alice.ok("dm", to="carol", text="while you were out")
        second = await bob.ok("dm", to="carol", text="me too")
        assert first["delivered"] is False

        carol = await ws(srv)
        login = await carol.login("carol")
        pending = [await carol.expect("dm"), await carol.expect("dm")]
        assert [p["message"]["id"] for p in pending] == [
            first["message"]["id"],
            second["message"]["id"],
        ]
        assert all(p["pending"] for p in pending)
        # Where her DM partners are (the most recent first), whatever room she shows.
        partners = await carol.expect("presence", room=None)
        assert (partners["online"], partners["offline"]) == (["bob", "alice"], [])
        assert carol.events == []  # the ack came first, then the DMs and that state
        assert login["type"] == "ack"
        # Her partners hear she is online, and offline, though they share no room with her.
        await alice.presence(None, online="carol")
        await bob.presence(None, online="carol")
        await carol.close()
        await alice.presence(None, offline="carol")
        await bob.presence(None, offline="carol")

        carol = await tcp(srv)
        await carol.login("carol")
        await carol.ok("ping")
        assert not [e for e in carol.events if e["type"] == "dm"]  # delivered once only
        history = await carol.ok("history", **{"with": "alice"})
        assert [m["text"] for m in history["messages"]] == ["while you were out"]
        await closing(alice, bob, carol)


async def test_history_paging(db: Path) -> None:
    async with chat_server(db) as srv:
        alice = await tcp(srv)
        await alice.register("alice")
        await alice.ok("create", room="general")
        sent = [
            (await alice.ok("say", room="general", text=f"m{i}"))["message"]["id"]
            for i in range(120)
        ]

        seen: list[int] = []
        before = None
        pages = 0
        while True:
            fields: dict[str, Any] = {"room": "general", "limit": 50}
            if before is not None:
                fields["before"] = before
            page = await alice.ok("history", **fields)
            ids = [m["id"] for m in page["messages"]]
            assert ids == sorted(ids)
            seen = ids + seen
            pages += 1
            if not page["more"]:
                break
            before = ids[0]
        assert pages == 3
        assert seen == sent
        default = await alice.ok("history", room="general")
        assert len(default["messages"]) == 50
        await alice.fails("history", "bad_value", room="general", limit=1000)
        await alice.fails("history", "conflicting_fields")
        await alice.fails("history", "no_such_room", room="nowhere")
        await alice.close()


async def test_reconnect_backfill_loses_nothing(any_db: str) -> None:
    db = any_db
    async with chat_server(db) as srv:
        alice, bob = await tcp(srv), await ws(srv)
        await alice.register("alice")
        token = (await bob.register("bob"))["token"]
        await alice.ok("create", room="general")
        await bob.ok("join", room="general")
        total = 200

        async def talk() -> list[int]:
            ids = []
            for i in range(total):
                ids.append((await alice.ok("say", room="general", text=f"n{i}"))["message"]["id"])
            return ids

        talker = asyncio.create_task(talk())
        seen: set[int] = set()
        last = 0
        while len(seen) < 40:  # read some live, then drop the connection mid-stream
            event = await bob.expect("message")
            seen.add(event["message"]["id"])
            last = max(last, event["message"]["id"])
        await bob.close()

        bob = await tcp(srv)
        await bob.ok("resume", token=token)  # subscribed from here on
        more = True
        while more:
            page = await bob.ok("backfill", since=last, limit=37)
            for m in page["messages"]:
                seen.add(m["id"])
                last = max(last, m["id"])
            more = page["more"]
        sent = await talker
        while not set(sent) <= seen:  # the rest arrive live
            seen.add((await bob.expect("message"))["message"]["id"])
        assert set(sent) <= seen
        assert len(sent) == total
        await closing(alice, bob)


# ---------------------------------------------------------------- rooms and moderation


async def test_invite_only_rooms(db: Path) -> None:
    async with chat_server(db) as srv:
        alice, bob, eve = await tcp(srv), await ws(srv), await tcp(srv)
        await alice.register("alice")
        await bob.register("bob")
        await eve.register("eve")
        await alice.ok("create", room="secret", visibility="invite")
        await bob.fails("join", "invite_only", room="secret")
        await bob.fails("history", "not_member", room="secret")
        await bob.fails("who", "not_member", room="secret")
        assert (await bob.ok("rooms"))["rooms"] == []  # not listed to outsiders
        await bob.fails("invite", "not_member", room="secret", nick="eve")
        await alice.fails("invite", "no_such_user", room="secret", nick="nobody")
        await alice.ok("invite", room="secret", nick="bob")
        invited = await bob.expect("invited")
        assert invited["room"] == "secret"
        assert invited["by"] == "alice"
        await bob.ok("join", room="secret")
        await bob.ok("say", room="secret", text="thanks")
        assert (await alice.expect("message"))["message"]["text"] == "thanks"
        await eve.fails("join", "invite_only", room="secret")
        await closing(alice, bob, eve)


async def test_kick_ban_mute_and_roles(db: Path) -> None:
    async with chat_server(db) as srv:
        alice, bob, carol = await tcp(srv), await ws(srv), await tcp(srv)
        for client, nick in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
            await client.register(nick)
        await alice.ok("create", room="general")
        await bob.ok("join", room="general")
        await carol.ok("join", room="general")

        await bob.fails("kick", "forbidden", room="general", nick="carol")
        await alice.fails("kick", "forbidden", room="general", nick="alice")
        await alice.fails("kick", "no_such_user", room="general", nick="nobody")

        # Mute: bob cannot speak until unmuted; everyone sees it.
        await alice.ok("mute", room="general", nick="bob", reason="calm down")
        muted = await carol.expect("muted", nick="bob")
        assert muted["by"] == "alice"
        assert muted["until"] is None
        await bob.fails("say", "muted", room="general", text="hello?")
        who = await carol.ok("who", room="general")
        assert {m["nick"]: m["muted"] for m in who["members"]}["bob"] is True
        await alice.ok("unmute", room="general", nick="bob")
        await carol.expect("unmuted", nick="bob")
        await bob.ok("say", room="general", text="back")
        timed = await alice.ok("mute", room="general", nick="bob", seconds=3600)
        assert timed["until"] > 0
        await bob.fails("say", "muted", room="general", text="again?")
        await alice.ok("unmute", room="general", nick="bob")

        # Kick: bob is told, removed, stops receiving, and may come back.
        await alice.ok("kick", room="general", nick="bob", reason="spam")
        kicked = await bob.expect("kicked")
        assert (kicked["room"], kicked["nick"], kicked["by"], kicked["reason"]) == (
            "general",
            "bob",
            "alice",
            "spam",
        )
        await carol.expect("kicked", nick="bob")
        await carol.ok("say", room="general", text="bob cannot see this")
        await bob.ok("ping")
        texts = [e["message"]["text"] for e in bob.events if e["type"] == "message"]
        assert "bob cannot see this" not in texts
        await alice.fails("kick", "not_member", room="general", nick="bob")
        await bob.ok("join", room="general")

        # Ban: removed and cannot rejoin until unbanned.
        await alice.ok("ban", room="general", nick="bob", reason="repeat")
        await bob.expect("banned", room="general")
        await bob.fails("join", "banned", room="general")
        await bob.fails("history", "banned", room="general")
        await alice.ok("unban", room="general", nick="bob")
        await alice.fails("unban", "bad_value", room="general", nick="bob")
        await bob.ok("join", room="general")

        # Roles: the owner makes carol a moderator; she moderates members, not the owner.
        await bob.fails("set_role", "forbidden", room="general", nick="carol", role="moderator")
        await alice.ok("set_role", room="general", nick="carol", role="moderator")
        assert (await bob.expect("role", nick="carol"))["role"] == "moderator"
        await carol.ok("mute", room="general", nick="bob", seconds=60)
        await carol.fails("kick", "forbidden", room="general", nick="alice")
        await carol.fails("set_role", "forbidden", room="general", nick="bob", role="moderator")
        await carol.ok("topic", room="general", topic="be nice")
        assert (await bob.expect("topic"))["topic"] == "be nice"
        await bob.fails("topic", "forbidden", room="general", topic="anarchy")
        await alice.fails("set_role", "forbidden", room="general", nick="alice", role="member")
        await closing(alice, bob, carol)


# ---------------------------------------------------------------- bad input and limits


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_malformed_and_unknown_keep_connection_up(db: Path, transport: str) -> None:
    async with chat_server(db) as srv:
        client = await (tcp(srv) if transport == "tcp" else ws(srv))
        await client.register("alice")
        await client.send_raw("this is not json")
        assert (await client.expect("error"))["code"] == "bad_json"
        await client.send_raw("[1, 2, 3]")
        assert (await client.expect("error"))["code"] == "not_object"
        await client.send({"type": "frobnicate", "id": 9})
        err = await client.expect("error")
        assert (err["code"], err["id"]) == ("unknown_command", 9)
        await client.fails("say", "bad_room", room="No Spaces", text="x")
        await client.fails("say", "missing_field", room="general")
        await client.fails("say", "bad_text", room="general", text="x" * 5000)
        await client.fails("join", "unknown_field", room="general", color="red")
        await client.ok("ping")  # still up
        await client.close()


async def test_oversize_message_ws_closes_1009(db: Path) -> None:
    limits = ChatLimits(max_message_bytes=4096, max_file_bytes=1024, flood_burst=100)
    async with chat_server(db, chat_limits=limits) as srv:
        client = await ws(srv)
        await client.register("alice")
        await client.send({"type": "say", "room": "general", "text": "x" * 5000})
        await client.wait_closed()
        assert client.ws.close_code == 1009
        other = await ws(srv)  # the server keeps serving everyone else
        await other.ok("ping")
        await other.close()


async def test_oversize_line_tcp_gets_error_then_close(db: Path) -> None:
    limits = ChatLimits(max_message_bytes=4096, max_file_bytes=1024, flood_burst=100)
    async with chat_server(db, chat_limits=limits) as srv:
        client = await tcp(srv)
        await client.send_raw(b"x" * 5000)
        err = await client.expect("error")
        assert err["code"] == "too_large"
        await client.wait_closed()
        other = await tcp(srv)
        await other.ok("ping")
        await other.close()


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_flood_control_warns_then_disconnects(db: Path, transport: str) -> None:
    limits = ChatLimits(flood_rate=1.0, flood_burst=5, flood_tolerance=3)
    async with chat_server(db, chat_limits=limits) as srv:
        client = await (tcp(srv) if transport == "tcp" else ws(srv))
        for i in range(20):
            await client.send({"type": "ping", "id": i})
        await client.wait_closed()
        codes = [e.get("code") for e in client.events if e["type"] == "error"]
        assert codes == ["slow_down", "flood"]
        acks = [e for e in client.events if e["type"] == "ack"]
        assert 5 <= len(acks) <= 6  # the burst (plus at most one refilled token)
        if isinstance(client, WSClient):
            assert client.ws.close_code == 1008
        other = await (tcp(srv) if transport == "tcp" else ws(srv))
        await other.ok("ping")
        await other.close()


# ---------------------------------------------------------------- files and HTTP


async def test_file_upload_and_download(any_db: str) -> None:
    db = any_db
    limits = ChatLimits(max_message_bytes=8192, max_file_bytes=4096, flood_burst=100)
    async with chat_server(db, chat_limits=limits) as srv:
        alice, bob = await ws(srv), await tcp(srv)
        token = (await alice.register("alice"))["token"]
        await bob.register("bob")
        await alice.ok("create", room="general")
        await bob.ok("join", room="general")
        data = bytes(range(256)) * 8
        up = await alice.ok(
            "upload", name="notes é.bin", data=base64.b64encode(data).decode(), mime="image/png"
        )
        info = up["file"]
        assert info["hash"] == hashlib.sha256(data).hexdigest()
        assert info["size"] == len(data)
        assert info["url"] == f"/files/{info['hash']}"
        again = await alice.ok("upload", name="other", data=base64.b64encode(data).decode())
        assert again["file"]["name"] == "notes é.bin"  # stored once, by content
        await alice.fails(
            "upload", "file_too_large", name="big", data=base64.b64encode(b"x" * 4097).decode()
        )

        shared = await alice.ok("say", room="general", text="", file=info["hash"])
        assert (await bob.expect("message"))["message"]["file"] == info
        assert shared["message"]["text"] == ""
        await alice.fails("say", "no_such_file", room="general", text="x", file="0" * 64)

        status, headers, body = await http_get(
            srv.ws_address, info["url"], Authorization=f"Bearer {token}"
        )
        assert status == 200
        assert body == data
        assert headers["content-type"] == "image/png"
        assert headers["content-disposition"] == "inline; filename*=UTF-8''notes%20%C3%A9.bin"
        assert headers["x-content-type-options"] == "nosniff"
        status, _, body = await http_get(srv.ws_address, f"{info['url']}?token={token}")
        assert (status, body) == (200, data)
        assert (await http_get(srv.ws_address, info["url"]))[0] == 401
        assert (await http_get(srv.ws_address, f"{info['url']}?token=bogus"))[0] == 401
        assert (await http_get(srv.ws_address, f"/files/{'0' * 64}?token={token}"))[0] == 404
        assert (await http_get(srv.ws_address, f"/files/nothex?token={token}"))[0] == 404
        await closing(alice, bob)


async def test_http_page_and_routes(db: Path) -> None:
    async with chat_server(db) as srv:
        status, headers, body = await http_get(srv.ws_address, "/")
        assert status == 200
        assert headers["content-type"] == "text/html; charset=utf-8"
        host, port = srv.ws_address
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert f"connect-src 'self' ws://{host}:{port} wss://{host}:{port};" in csp
        assert body.startswith(b"<!doctype html>")
        assert b'<script src="app.js"' in body  # relative: the page also works under /chat/
        status, headers, body = await http_get(srv.ws_address, "/app.js")
        assert (status, headers["content-type"]) == (200, "text/javascript; charset=utf-8")
        assert b"function connect()" in body
        status, headers, _ = await http_get(srv.ws_address, "/app.css")
        assert (status, headers["content-type"]) == (200, "text/css; charset=utf-8")
        status, headers, _ = await http_get(srv.ws_address, "/favicon.svg")
        assert (status, headers["content-type"]) == (200, "image/svg+xml")
        _, headers, _ = await http_get(srv.ws_address, "/", Host="evil/host")
        assert (
            "connect-src 'self' ws://localhost wss://localhost;"
            in headers["content-security-policy"]
        )
        assert (await http_get(srv.ws_address, "/healthz"))[:1] == (200,)
        reader, writer = await asyncio.open_connection(*srv.ws_address)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
        writer.close()
        assert (await http_get(srv.ws_address, "/nope"))[0] == 404


async def test_websocket_origin_check(db: Path) -> None:
    async with chat_server(db, allowed_origins=("https://chat.example",)) as srv:
        host, port = srv.ws_address
        url = f"ws://{host}:{port}/ws"
        with pytest.raises(InvalidStatus) as info:
            await connect(url, origin="http://evil.example")  # type: ignore[arg-type]
        assert info.value.response.status_code == 403
        for origin in (f"http://{host}:{port}", "https://chat.example"):
            async with connect(url, origin=origin) as conn:  # type: ignore[arg-type]
                assert json.loads(await conn.recv())["type"] == "hello"
        with pytest.raises(InvalidStatus) as info:
            await connect(f"ws://{host}:{port}/other")
        assert info.value.response.status_code == 404


async def test_tls_for_both_transports(db: Path, tls_certs) -> None:
    tls = TLS(certfile=tls_certs.certfile, keyfile=tls_certs.keyfile)
    async with ChatServer(chat_config(db, tls=tls)) as srv:
        assert {kind for kind, _ in srv.listening()} == {"wss", "tls"}
        ctx = ssl.create_default_context(cafile=tls_certs.cafile)
        host, port = srv.ws_address
        conn = await connect(f"wss://{host}:{port}/ws", ssl=ctx)
        client = WSClient(conn)
        await client.expect("hello")
        await client.register("alice")
        await client.close()
        reader, writer = await asyncio.open_connection(*srv.tcp_address, ssl=ctx)
        line_client = TCPClient(reader, writer)
        await line_client.expect("hello")
        await line_client.login("alice")
        await line_client.close()


# ---------------------------------------------------------------- persistence


async def test_persistence_across_restart(any_db: str) -> None:
    db = any_db
    async with chat_server(db) as srv:
        alice, bob = await tcp(srv), await ws(srv)
        token = (await alice.register("alice"))["token"]
        await bob.register("bob")
        await alice.ok("create", room="general", topic="kept")
        await alice.ok("create", room="secret", visibility="invite")
        said = await alice.ok("say", room="general", text="remember me")
        await bob.ok("join", room="general")
        await alice.ok("ban", room="general", nick="bob")
        await closing(alice, bob)

    async with chat_server(db) as srv:
        alice = await ws(srv)
        resumed = await alice.ok("resume", token=token)  # the session survived the restart
        assert resumed["rooms"] == ["general", "secret"]
        history = await alice.ok("history", room="general")
        assert [m["id"] for m in history["messages"]] == [said["message"]["id"]]
        bob = await tcp(srv)
        await bob.login("bob")
        await bob.fails("join", "banned", room="general")
        await bob.fails("register", "already_authenticated", nick="bob", password=PASSWORD)
        after = await alice.ok("say", room="general", text="still here")
        assert after["message"]["id"] > said["message"]["id"]  # ids keep growing
        await closing(alice, bob)


async def test_server_close_tells_clients(db: Path) -> None:
    srv = ChatServer(chat_config(db))
    await srv.start()
    client = await ws(srv)
    line = await tcp(srv)
    await srv.close()
    await client.wait_closed()
    assert client.ws.close_code == 1001
    await line.wait_closed()
    with pytest.raises((ConnectionClosed, OSError)):
        await connect(f"ws://{srv.cfg.bind}/ws")


async def test_max_clients_per_transport(db: Path) -> None:
    limits = ChatLimits(max_clients=2, flood_burst=100)
    async with chat_server(db, chat_limits=limits) as srv:
        held = [await ws(srv), await ws(srv)]
        host, port = srv.ws_address
        with pytest.raises(InvalidStatus) as info:
            await connect(f"ws://{host}:{port}/ws")
        assert info.value.response.status_code == 503
        lines = [await tcp(srv), await tcp(srv)]
        reader, writer = await asyncio.open_connection(*srv.tcp_address)
        async with asyncio.timeout(TIMEOUT):
            assert await reader.read() == b""  # refused: closed without a hello
        writer.close()
        await held[0].close()
        await apoll_until(lambda: srv.ws is not None and srv.ws.clients == 1)
        again = await ws(srv)
        await again.ok("ping")
        await closing(again, held[1], *lines)


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_garbage_never_takes_the_connection_down(db: Path, transport: str) -> None:
    """Random bytes and random JSON: every message gets an error, the session survives."""
    import random

    rng = random.Random(6)
    async with chat_server(db) as srv:
        client = await (tcp(srv) if transport == "tcp" else ws(srv))
        await client.register("fuzzer")
        kinds = ["say", "join", "history", "mute", "upload", "dm", "nope", 5, None]
        values: list[Any] = [
            None,
            True,
            -1,
            2**60,
            1.5,
            "",
            "x" * 300,
            [],
            {},
            {"a": [1]},
            "général",
        ]
        sent = 0
        for _ in range(150):
            if rng.random() < 0.3:
                raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
                raw = raw.replace(b"\n", b" ")
                if transport == "ws":  # a text frame must be UTF-8: send what survives decoding
                    raw = raw.decode("utf-8", "replace").encode()
                await client.send_raw(raw)
            else:
                obj = {"type": rng.choice(kinds)}
                for name in rng.sample(["room", "text", "nick", "to", "since", "id", "data"], 3):
                    obj[name] = rng.choice(values)
                await client.send_raw(json.dumps(obj))
            sent += 1
        pong = await client.ok("ping")
        assert pong["type"] == "ack"
        answered = [e for e in client.events if e["type"] in ("error", "ack")]
        assert len(answered) == sent  # one reply per message, none lost, none twice
        assert not client.closed
        await client.close()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_fan_out_frames_match_websockets_own(size: int) -> None:
    from websockets.frames import Frame, Opcode

    from netstack.servers.chat.ws import framed, text_frame

    payload = ("é" * size).encode()[:size]
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    text = "x" * size
    assert framed(text) is framed(text)  # built once per fanned-out text
    assert framed(text + "y") == text_frame((text + "y").encode())
