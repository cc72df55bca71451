"""Chat test clients (raw TCP lines and a real websockets client) and a server factory."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from netstack.config import ChatLimits, ChatServerConfig, ChatTimeouts, Timeouts
from netstack.servers.chat import ChatServer
from tests.helpers import TIMEOUT

PASSWORD = "correct horse battery"


def chat_config(db: Path | str, **kw: Any) -> ChatServerConfig:
    # Tests send bursts far above a person's typing: flood control is tested on its own.
    kw.setdefault("chat_limits", ChatLimits(flood_rate=10_000, flood_burst=10_000))
    kw.setdefault("timeouts", Timeouts(graceful_timeout=TIMEOUT))
    kw.setdefault("chat_timeouts", ChatTimeouts())
    kw.setdefault("bind", "127.0.0.1:0")
    kw.setdefault("tcp_bind", "127.0.0.1:0")
    return ChatServerConfig(db=str(db), **kw)


@asynccontextmanager
async def chat_server(db: Path | str, **kw: Any) -> AsyncIterator[ChatServer]:
    async with ChatServer(chat_config(db, **kw)) as srv:
        yield srv


class Client:
    """A chat client over some transport: ``call`` a command, ``expect`` an event.

    Events that are not the one waited for are kept in ``self.events`` (in order), so a
    test can look for them later with :meth:`expect`.
    """

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.closed = False
        self.hello: dict[str, Any] = {}

    async def send_raw(self, data: str | bytes) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def _recv(self) -> dict[str, Any] | None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def send(self, obj: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(obj))

    async def _next(self) -> dict[str, Any]:
        event = await self._recv()
        if event is None:
            self.closed = True
            raise EOFError("connection closed")
        return event

    async def expect(self, kind: str, **match: Any) -> dict[str, Any]:
        """The first event (kept or new) of type ``kind`` whose fields equal ``match``."""
        return await self.expect_where(
            lambda e: e.get("type") == kind and all(e.get(k) == v for k, v in match.items())
        )

    async def presence(self, room: str, **change: str) -> dict[str, Any]:
        """The first batched ``presence`` event of ``room`` listing the nick given for each
        list, e.g. ``presence("general", joined="bob")``."""
        return await self.expect_where(
            lambda e: (
                e.get("type") == "presence"
                and e.get("room") == room
                and all(nick in e.get(name, ()) for name, nick in change.items())
            )
        )

    async def expect_where(self, fits: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first event (kept or new) for which ``fits`` is true."""

        for i, event in enumerate(self.events):
            if fits(event):
                return self.events.pop(i)
        async with asyncio.timeout(TIMEOUT):
            while True:
                event = await self._next()
                if fits(event):
                    return event
                self.events.append(event)

    async def call(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Send a command and return its ``ack`` or ``error``."""
        rid = next(self._ids)
        await self.send({"type": kind, "id": rid, **fields})
        async with asyncio.timeout(TIMEOUT):
            while True:
                for i, event in enumerate(self.events):
                    if event.get("id") == rid and event["type"] in ("ack", "error"):
                        return self.events.pop(i)
                event = await self._next()
                if event.get("id") == rid and event["type"] in ("ack", "error"):
                    return event
                self.events.append(event)

    async def ok(self, kind: str, **fields: Any) -> dict[str, Any]:
        reply = await self.call(kind, **fields)
        assert reply["type"] == "ack", reply
        return reply

    async def fails(self, kind: str, code: str, **fields: Any) -> dict[str, Any]:
        reply = await self.call(kind, **fields)
        assert reply["type"] == "error", reply
        assert reply["code"] == code, reply
        return reply

    async def wait_closed(self) -> None:
        """Keep reading (events go to ``self.events``) until the server closes."""
        async with asyncio.timeout(TIMEOUT):
            while not self.closed:
                try:
                    self.events.append(await self._next())
                except EOFError:
                    break
        await self.close()

    async def register(self, nick: str, password: str = PASSWORD) -> dict[str, Any]:
        return await self.ok("register", nick=nick, password=password)

    async def login(self, nick: str, password: str = PASSWORD) -> dict[str, Any]:
        return await self.ok("login", nick=nick, password=password)


class TCPClient(Client):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__()
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, addr: tuple[str, int]) -> TCPClient:
        reader, writer = await asyncio.open_connection(*addr, limit=1 << 24)
        client = cls(reader, writer)
        client.hello = await client.expect("hello")
        return client

    async def send_raw(self, data: str | bytes) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.writer.write(raw if raw.endswith(b"\n") else raw + b"\n")
        await self.writer.drain()

    async def _recv(self) -> dict[str, Any] | None:
        try:
            line = await self.reader.readline()
        except ConnectionResetError:
            return None
        if not line:
            return None
        assert line.endswith(b"\n")
        event: dict[str, Any] = json.loads(line)
        return event

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class WSClient(Client):
    def __init__(self, ws: ClientConnection) -> None:
        super().__init__()
        self.ws = ws

    @classmethod
    async def open(cls, addr: tuple[str, int], **kw: Any) -> WSClient:
        ws = await connect(f"ws://{addr[0]}:{addr[1]}/ws", max_size=None, **kw)
        client = cls(ws)
        client.hello = await client.expect("hello")
        return client

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data if isinstance(data, str) else data.decode())

    async def _recv(self) -> dict[str, Any] | None:
        try:
            text = await self.ws.recv()
        except ConnectionClosed:
            return None
        event: dict[str, Any] = json.loads(text)
        return event

    async def close(self) -> None:
        await self.ws.close()


async def tcp(srv: ChatServer) -> TCPClient:
    return await TCPClient.open(srv.tcp_address)


async def ws(srv: ChatServer) -> WSClient:
    return await WSClient.open(srv.ws_address)
