"""The terminal client's engine (ChatClient) in process, against a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from netstack.config import ChatClientConfig
from netstack.servers.chat import ChatServer, auth
from netstack.servers.chat.client import ChatClient, LoginFailed, format_event
from tests.helpers import TIMEOUT, apoll_until
from tests.servers.chat.support import PASSWORD, chat_server, ws


class Screen:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    async def shows(self, needle: str) -> str:
        await apoll_until(lambda: any(needle in line for line in self.lines))
        return next(line for line in self.lines if needle in line)


@asynccontextmanager
async def running(
    srv: ChatServer, nick: str, *, register: bool = True, kind: str = "ws", **kw: object
) -> AsyncIterator[tuple[ChatClient, Screen]]:
    host, port = srv.ws_address if kind == "ws" else srv.tcp_address
    url = f"ws://{host}:{port}/ws" if kind == "ws" else f"tcp://{host}:{port}"
    cfg = ChatClientConfig(url=url, nick=nick, register=register, **kw)  # type: ignore[arg-type]
    screen = Screen()
    client = ChatClient(cfg, PASSWORD, screen)
    task = asyncio.get_running_loop().create_task(client.run())
    try:
        async with asyncio.timeout(TIMEOUT):
            await client.wait_ready()
        yield client, screen
    finally:
        client.stop()
        await asyncio.wait({task}, timeout=TIMEOUT)


async def test_commands_over_tcp(tmp_path: Path) -> None:
    async with chat_server(tmp_path / "db") as srv:
        bob = await ws(srv)
        await bob.register("bob")
        async with running(srv, "alice", kind="tcp", room="lobby") as (alice, screen):
            await screen.shows("* created #lobby")
            assert alice.prompt == "#lobby> "
            assert await alice.command("/help")
            await screen.shows("/join ROOM")
            await alice.command("/create secret invite")
            await screen.shows("* created #secret")
            await alice.command("/topic hush")
            await screen.shows("* alice set the topic of #secret: hush")
            await alice.command("/invite bob")
            await screen.shows("* invited bob to #secret")
            invited = await bob.expect("invited")
            assert invited["room"] == "secret"
            await bob.ok("join", room="secret")
            await screen.shows("* #secret: bob joined")
            await alice.command("/mute bob 60")
            await screen.shows("* alice muted bob in #secret")
            await alice.command("/unmute bob")
            await screen.shows("* alice unmuted bob in #secret")
            await alice.command("/kick bob be nice")
            await screen.shows("* alice removed bob from #secret: be nice")
            await alice.command("/ban bob")
            await alice.command("/rooms")
            await screen.shows("* #secret 1 member(s) (invite only) - hush")
            await alice.command("/leave")
            await screen.shows("* left #secret")
            assert alice.target == "#lobby"

            await alice.command("/msg bob")  # switch to a DM conversation
            assert alice.target == "@bob"
            await alice.command("hello in private")
            await screen.shows("[dm] alice -> bob: hello in private")
            await alice.command("/history")
            assert sum("hello in private" in line for line in screen.lines) == 2
            await alice.command("/who")  # no current room
            await screen.shows("! no current room: /join ROOM first")
            await alice.command("/join")
            await screen.shows("! unknown command or missing argument: /join")
            await bob.close()
            await alice.command("/msg bob are you there")
            await screen.shows("* bob is offline: delivered at their next login")
            assert not await alice.command("/quit")


async def test_plain_text_needs_a_target_and_login_failures_stop(tmp_path: Path) -> None:
    async with chat_server(tmp_path / "db") as srv:
        async with running(srv, "alice") as (alice, screen):
            await alice.command("hello?")
            await screen.shows("! join a room (/join ROOM) or /msg NICK first")
            await alice.command("//not a command")  # a leading slash, escaped
            await screen.shows("! join a room")
        host, port = srv.ws_address
        cfg = ChatClientConfig(url=f"ws://{host}:{port}/ws", nick="alice")
        wrong = ChatClient(cfg, "not the password", Screen())
        with pytest.raises(LoginFailed, match="login failed: wrong nick or password"):
            await wrong.run()
        taken = ChatClient(
            ChatClientConfig(url=cfg.url, nick="ALICE", register=True), "x" * 8, Screen()
        )
        with pytest.raises(LoginFailed, match="taken"):
            await taken.run()


async def test_reconnect_resumes_then_logs_in_again_when_the_token_is_gone(
    tmp_path: Path,
) -> None:
    db = tmp_path / "db"
    async with chat_server(db) as srv:
        bob = await ws(srv)
        await bob.register("bob")
        await bob.ok("create", room="general")
        async with running(
            srv, "alice", room="general", reconnect_initial=0.05, reconnect_max=0.2
        ) as (alice, screen):
            await screen.shows("* joined #general")
            first_token = alice.token
            for session in list(srv.service.sessions):  # drop every connection
                if session.user is not None and session.user.nick == "alice":
                    session.outlet.close(1001, "test")
            await screen.shows("* reconnected as alice; 0 new message(s)")
            assert alice.token == first_token  # resumed, same session
            await bob.ok("say", room="general", text="still there?")
            await screen.shows("#general <bob> still there?")

            assert first_token is not None
            await srv.service.store.delete_session(auth.token_hash(first_token))  # revoked
            for session in list(srv.service.sessions):
                if session.user is not None and session.user.nick == "alice":
                    session.outlet.close(1001, "test")
            await apoll_until(lambda: alice.token not in (None, first_token))  # logged in anew
            assert alice.connections == 3


def test_format_event_covers_every_kind() -> None:
    base = {"room": "r", "nick": "n", "by": "b"}
    assert (
        format_event({"type": "banned", **base, "reason": "spam"}) == "* b banned n from #r: spam"
    )
    assert format_event({"type": "role", **base, "role": "moderator"}) == (
        "* b made n a moderator of #r"
    )
    assert format_event({"type": "error", "code": "x", "message": "y"}) == "! x: y"
    assert format_event({"type": "hello"}) is None
    presence = {"type": "presence", "room": "r", "joined": [], "left": [], "offline": []}
    assert format_event({**presence, "joined": ["a"], "left": ["b", "c"]}) == (
        "* #r: a joined; b, c left"
    )
    many = [f"u{i}" for i in range(25)]
    assert format_event({**presence, "online": many, "offline": ["z"]}) == (
        "* #r: u0, u1, u2, u3, u4, u5, u6, u7, u8, u9 and 15 more online; z went offline"
    )
    assert format_event({**presence, "online": []}) is None
    dms = {**presence, "room": None, "online": ["bob"], "offline": ["carol"]}  # DM partners
    assert format_event(dms) == "* DMs: bob online; carol offline"
    line = format_event(
        {
            "type": "message",
            "message": {
                "id": 1,
                "ts": 0,
                "from": "a",
                "room": "r",
                "text": "",
                "file": {"name": "f.txt", "url": "/files/ab"},
            },
        }
    )
    assert line is not None
    assert line.endswith("#r <a> [file f.txt /files/ab]")


async def test_wss_and_tls_with_a_private_ca(tmp_path: Path, tls_certs) -> None:
    from netstack.config import TLS

    tls = TLS(certfile=tls_certs.certfile, keyfile=tls_certs.keyfile)
    async with chat_server(tmp_path / "db", tls=tls) as srv:
        (_, wss_port), (_, tls_port) = srv.ws_address, srv.tcp_address
        for url, register in (
            (f"wss://127.0.0.1:{wss_port}/ws", True),
            (f"tls://127.0.0.1:{tls_port}", False),
        ):
            cfg = ChatClientConfig(
                url=url, nick="alice", register=register, tls=TLS(cafile=tls_certs.cafile)
            )
            screen = Screen()
            client = ChatClient(cfg, PASSWORD, screen)
            task = asyncio.get_running_loop().create_task(client.run())
            async with asyncio.timeout(TIMEOUT):
                await client.wait_ready()
            await screen.shows(f"* logged in as alice on {url}")
            client.stop()
            await asyncio.wait({task}, timeout=TIMEOUT)
        # Without the CA the server's certificate is refused: a clear error, no retry loop.
        unverified = ChatClient(
            ChatClientConfig(url=f"wss://127.0.0.1:{wss_port}/ws", nick="alice"),
            PASSWORD,
            Screen(),
        )
        with pytest.raises(OSError, match=r"cannot connect to wss://.*CERTIFICATE_VERIFY_FAILED"):
            await unverified.run()


async def test_backfill_starts_from_before_the_login_not_from_live_messages() -> None:
    """A live message right behind the resume ack must not move the backfill start."""
    import json

    said = {"id": 7, "ts": 0, "from": "bob", "room": "general", "text": "said while away"}
    live = {"id": 10, "ts": 0, "from": "bob", "room": "general", "text": "live right away"}

    class Link:
        def __init__(self) -> None:
            self.inbox: asyncio.Queue[str | None] = asyncio.Queue()

        async def send(self, text: str) -> None:
            cmd = json.loads(text)
            put = self.inbox.put_nowait
            if cmd["type"] == "resume":  # the ack and a live message arrive together
                put(json.dumps({"type": "ack", "id": cmd["id"], "nick": "alice",
                                "rooms": ["general"], "last_id": 10}))  # fmt: skip
                put(json.dumps({"type": "message", "message": live}))
            elif cmd["type"] == "backfill":
                found = [m for m in (said, live) if m["id"] > cmd["since"]]
                put(json.dumps({"type": "ack", "id": cmd["id"], "messages": found,
                                "more": False}))  # fmt: skip
                put(None)  # then the connection drops

        async def recv(self) -> str | None:
            return await self.inbox.get()

        async def close(self) -> None:
            return None

    screen = Screen()
    client = ChatClient(ChatClientConfig(nick="alice"), PASSWORD, screen)
    client.token, client.last_id, client.connections = "token", 5, 2  # a reconnect
    await client._session(Link())
    assert [line.split(" ", 1)[1] for line in screen.lines if "<bob>" in line] == [
        "#general <bob> live right away",
        "#general <bob> said while away",
    ]
    assert screen.lines[-1] == "* reconnected as alice; 1 new message(s) while away"
