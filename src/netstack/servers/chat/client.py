"""A chat client for people: the engine behind ``netstack chat connect``.

:class:`ChatClient` speaks the wire protocol (docs/chat-protocol.md) over WebSocket or
TCP lines, turns typed lines into commands (``/join``, ``/msg``...; plain text goes to the
current room or DM) and server events into one printable line each, handed to an
``output`` callback. The terminal (prompt_toolkit) lives in ``cli/chat.py``.

Reconnection: after a lost connection the client waits (jittered exponential backoff),
reconnects, resumes with its session token, and backfills every message newer than the
highest id it has printed, page by page; ids already printed are skipped, since backfill
and live delivery may overlap.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from netstack.config import ChatClientConfig, parse_hostport
from netstack.transport.tls import client_context

logger = logging.getLogger(__name__)

CALL_TIMEOUT: Final = 30.0
SEEN_IDS: Final = 10_000  # remembered message ids, to drop duplicates after a backfill
HISTORY_DEFAULT: Final = 20
PRESENCE_NAMES: Final = 10  # nicks shown per presence line; a mass login says "and N more"

HELP: Final = """commands:
  /join ROOM            join (or create) a room and talk there
  /leave [ROOM]         leave the room (default: the current one)
  /msg NICK [TEXT]      direct message; without TEXT, talk to NICK from now on
  /who [ROOM]           members and who is online (then online/offline changes there)
  /history [N]          the last N messages here (default 20)
  /rooms                public rooms and yours
  /topic TEXT           set the room topic (moderators)
  /invite NICK          invite to the current room
  /kick NICK [REASON]   /ban NICK [REASON]   /mute NICK [SECONDS]   /unmute NICK
  /quit                 leave (Ctrl-D too)
anything else is sent to the current room or person"""


class ClientError(Exception):
    """A command failed: ``code`` is the server's error code (or a local one)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LoginFailed(ClientError):
    """The server refused the nick/password: retrying will not help."""


class _Link(Protocol):
    async def send(self, text: str) -> None: ...

    async def recv(self) -> str | None: ...

    async def close(self) -> None: ...


class _WSLink:
    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, text: str) -> None:
        await self.ws.send(text)

    async def recv(self) -> str | None:
        from websockets.exceptions import ConnectionClosed

        try:
            data = await self.ws.recv()
        except ConnectionClosed:
            return None
        return data if isinstance(data, str) else data.decode()

    async def close(self) -> None:
        await self.ws.close()


class _TCPLink:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, text: str) -> None:
        self.writer.write(text.encode() + b"\n")
        await self.writer.drain()

    async def recv(self) -> str | None:
        try:
            line = await self.reader.readline()
        except (ConnectionError, ValueError):
            return None
        return line.decode() if line.endswith(b"\n") else None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def clock(ts: int) -> str:
    """``HH:MM`` local time of a millisecond timestamp."""
    return time.strftime("%H:%M", time.localtime(ts / 1000))


def format_message(m: dict[str, Any]) -> str:
    text = str(m.get("text", ""))
    file = m.get("file")
    if isinstance(file, dict):
        text = (text + " " if text else "") + f"[file {file.get('name')} {file.get('url')}]"
    if "room" in m:
        return f"{clock(m['ts'])} #{m['room']} <{m['from']}> {text}"
    return f"{clock(m['ts'])} [dm] {m['from']} -> {m['to']}: {text}"


def _nicks(names: list[str]) -> str:
    shown = ", ".join(names[:PRESENCE_NAMES])
    more = len(names) - PRESENCE_NAMES
    return f"{shown} and {more} more" if more > 0 else shown


def format_presence(ev: dict[str, Any]) -> str | None:
    """One line for a batched ``presence`` event (``None``: it lists nobody).

    Room null: the user's DM partners (their state after the login, then changes).
    """
    dms = ev.get("room") is None
    parts = [
        f"{_nicks(ev[name])} {verb}"
        for name, verb in (
            ("joined", "joined"),
            ("left", "left"),
            ("online", "online"),
            ("offline", "offline" if dms else "went offline"),
        )
        if ev.get(name)
    ]
    if not parts:
        return None
    return f"* {'DMs' if dms else '#' + ev['room']}: {'; '.join(parts)}"


def format_event(ev: dict[str, Any]) -> str | None:
    """One line for a server event (``None``: nothing to show)."""
    kind = ev.get("type")
    if kind in ("message", "dm"):
        return format_message(ev["message"])
    if kind == "presence":
        return format_presence(ev)
    reason = f": {ev['reason']}" if ev.get("reason") else ""
    if kind in ("kicked", "banned"):
        done = "removed" if kind == "kicked" else "banned"
        return f"* {ev['by']} {done} {ev['nick']} from #{ev['room']}{reason}"
    if kind == "muted":
        return f"* {ev['by']} muted {ev['nick']} in #{ev['room']}{reason}"
    if kind == "unmuted":
        return f"* {ev['by']} unmuted {ev['nick']} in #{ev['room']}"
    if kind == "topic":
        return f"* {ev['by']} set the topic of #{ev['room']}: {ev['topic']}"
    if kind == "role":
        return f"* {ev['by']} made {ev['nick']} a {ev['role']} of #{ev['room']}"
    if kind == "invited":
        return f"* {ev['by']} invited you to #{ev['room']}: /join {ev['room']}"
    if kind == "error":
        return f"! {ev.get('code')}: {ev.get('message')}"
    return None


class ChatClient:
    """One person's connection to a chat server, reconnecting until :meth:`stop`.

    Args:
        cfg: where to connect and as whom.
        password: the account's password.
        output: called with each line to show.
    """

    def __init__(
        self,
        cfg: ChatClientConfig,
        password: str,
        output: Callable[[str], None],
    ) -> None:
        if cfg.nick is None:
            raise ValueError("a nick is needed")
        self.cfg = cfg
        self.nick: str = cfg.nick
        self.password = password
        self.output = output
        self.token: str | None = None
        self.last_id = 0
        self.target: str | None = None  # "#room" or "@nick"
        self.rooms: set[str] = set()
        self._seen: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._link: _Link | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()  # logged in on the current connection
        self._ssl = client_context(cfg.tls)
        if cfg.url.startswith(("wss://", "tls://")) and self._ssl is None:
            self._ssl = ssl.create_default_context()
        self.connections = 0

    # ------------------------------------------------------------------ prompt

    @property
    def prompt(self) -> str:
        return f"{self.target or self.nick}> "

    # ------------------------------------------------------------------ connection

    async def _open(self) -> _Link:
        url = self.cfg.url
        if url.startswith(("ws://", "wss://")):
            from websockets.asyncio.client import connect

            ws = await connect(url, ssl=self._ssl, max_size=None, open_timeout=CALL_TIMEOUT)
            return _WSLink(ws)
        host, port = parse_hostport(url.split("://", 1)[1].rstrip("/"), field="url")
        reader, writer = await asyncio.open_connection(host, port, ssl=self._ssl, limit=1 << 24)
        return _TCPLink(reader, writer)

    async def run(self) -> None:
        """Connect, log in, and keep the connection up until :meth:`stop`.

        Raises:
            OSError: the first connection fails (nothing to reconnect to).
            LoginFailed: the server refuses the nick or password.
        """
        attempt = 0
        while not self._stop.is_set():
            try:
                link = await self._open()
            except Exception as exc:  # OSError, timeouts, websockets' handshake errors
                if self.connections == 0:
                    raise OSError(f"cannot connect to {self.cfg.url}: {exc}") from exc
                link = None
            if link is not None:
                self.connections += 1
                attempt = 0
                await self._session(link)
            if self._stop.is_set():
                break
            delay = min(self.cfg.reconnect_max, self.cfg.reconnect_initial * 2**attempt)
            delay *= random.uniform(0.75, 1.25)
            attempt += 1
            self.output(f"* disconnected; reconnecting in {delay:.1f} s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    async def _session(self, link: _Link) -> None:
        self._link = link
        reader = asyncio.get_running_loop().create_task(self._read(link))
        try:
            await self._login()
        except LoginFailed:
            self._stop.set()
            raise
        except ClientError as exc:  # lost during login, or refused for now: reconnect
            self.output(f"! login: {exc}")
        else:
            self._ready.set()
            await reader
        finally:
            self._ready.clear()
            self._link = None
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ClientError("disconnected", "connection lost"))
            self._pending.clear()
            await link.close()

    async def _read(self, link: _Link) -> None:
        while True:
            text = await link.recv()
            if text is None:
                return
            try:
                event = json.loads(text)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            rid = event.get("id")
            if event.get("type") in ("ack", "error") and rid in self._pending:
                fut = self._pending.pop(rid)
                if not fut.done():
                    fut.set_result(event)
                continue
            self.show(event)

    def show(self, event: dict[str, Any]) -> None:
        """Print one server event (messages once each, by id)."""
        if event.get("type") in ("message", "dm"):
            msg_id = int(event["message"]["id"])
            if msg_id in self._seen:
                return
            self._seen[msg_id] = None
            if len(self._seen) > SEEN_IDS:
                self._seen.popitem(last=False)
            self.last_id = max(self.last_id, msg_id)
        if event.get("type") in ("kicked", "banned") and event.get("nick") == self.nick:
            self.rooms.discard(event["room"])
        line = format_event(event)
        if line is not None:
            self.output(line)

    async def call(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Send a command; returns its ``ack``.

        Raises:
            ClientError: the server answered with an error, or the connection is down.
        """
        link = self._link
        if link is None:
            raise ClientError("disconnected", "not connected (reconnecting)")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        await link.send(json.dumps({"type": kind, "id": rid, **fields}))
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                reply = await fut
        except TimeoutError:
            self._pending.pop(rid, None)
            raise ClientError("timeout", f"no reply to {kind}") from None
        if reply["type"] == "error":
            raise ClientError(str(reply.get("code")), str(reply.get("message")))
        return reply

    async def _login(self) -> None:
        # Taken before the login: live messages may arrive (and raise last_id) before the
        # backfill is sent, and starting from them would skip what came in between.
        since = self.last_id
        first = self.connections == 1 and self.token is None
        ack: dict[str, Any] | None = None
        if self.token is not None:
            try:
                ack = await self.call("resume", token=self.token)
            except ClientError as exc:
                if exc.code != "bad_token":
                    raise
                self.token = None
        if ack is None:
            kind = "register" if first and self.cfg.register else "login"
            try:
                ack = await self.call(kind, nick=self.nick, password=self.password)
            except ClientError as exc:
                if exc.code in ("auth_failed", "nick_taken", "bad_nick", "bad_password"):
                    raise LoginFailed(exc.code, f"{kind} failed: {exc}") from None
                raise
            self.token = ack["token"]
        self.nick = ack["nick"]
        self.rooms = set(ack["rooms"])
        if first:
            self.last_id = max(self.last_id, int(ack["last_id"]))
            self.output(f"* logged in as {self.nick} on {self.cfg.url}; /help for commands")
            if self.rooms and self.target is None:
                self.target = "#" + sorted(self.rooms)[0]
            if self.cfg.room:
                await self.command(f"/join {self.cfg.room}")
            return
        missed = await self._backfill(since)
        self.output(f"* reconnected as {self.nick}; {missed} new message(s) while away")

    async def _backfill(self, since: int) -> int:
        """Show every message newer than ``since`` not shown yet; returns how many."""
        shown = 0
        while True:
            page = await self.call("backfill", since=since, limit=200)
            for message in page["messages"]:
                kind = "message" if "room" in message else "dm"
                if int(message["id"]) not in self._seen:
                    shown += 1
                self.show({"type": kind, "message": message})
                since = max(since, int(message["id"]))
            if not page["more"] or not page["messages"]:
                return shown

    def stop(self) -> None:
        self._stop.set()
        if self._link is not None:
            asyncio.get_running_loop().create_task(self._link.close())

    async def wait_ready(self) -> None:
        await self._ready.wait()

    # ------------------------------------------------------------------ typed lines

    async def command(self, line: str) -> bool:
        """Run one typed line; returns False on ``/quit``."""
        line = line.strip()
        if not line:
            return True
        try:
            return await self._command(line)
        except ClientError as exc:
            self.output(f"! {exc}")
        return True

    def _need_room(self, given: str | None = None) -> str:
        if given:
            return given.lstrip("#")
        if self.target and self.target.startswith("#"):
            return self.target[1:]
        raise ClientError("no_room", "no current room: /join ROOM first")

    async def _command(self, line: str) -> bool:
        if not line.startswith("/") or line.startswith("//"):
            text = line[1:] if line.startswith("//") else line
            if self.target is None:
                raise ClientError("no_target", "join a room (/join ROOM) or /msg NICK first")
            if self.target.startswith("#"):
                await self.call("say", room=self.target[1:], text=text)
            else:
                await self.call("dm", to=self.target[1:], text=text)
            return True
        cmd, _, rest = line.partition(" ")
        args = rest.split()
        cmd = cmd.lower()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            self.output(HELP)
        elif cmd == "/join" and args:
            await self._join(args[0].lstrip("#"))
        elif cmd == "/leave":
            room = self._need_room(args[0] if args else None)
            await self.call("leave", room=room)
            self.rooms.discard(room)
            if self.target == "#" + room:
                self.target = "#" + sorted(self.rooms)[0] if self.rooms else None
            self.output(f"* left #{room}")
        elif cmd in ("/msg", "/dm", "/query") and args:
            nick = args[0]
            text = rest.strip()[len(nick) :].strip()
            if text:
                ack = await self.call("dm", to=nick, text=text)
                if not ack["delivered"]:
                    self.output(f"* {nick} is offline: delivered at their next login")
            else:
                self.target = "@" + nick
                self.output(f"* talking to {nick}")
        elif cmd == "/who":
            room = self._need_room(args[0] if args else None)
            ack = await self.call("who", room=room)
            people = ", ".join(
                f"{m['nick']}{'' if m['role'] == 'member' else ' (' + m['role'] + ')'}"
                f"{' [online]' if m['online'] else ''}"
                for m in ack["members"]
            )
            more = ack["count"] - len(ack["members"])
            self.output(f"* #{ack['room']}: {people}" + (f" and {more} more" if more > 0 else ""))
        elif cmd == "/history":
            await self._history(int(args[0]) if args and args[0].isdigit() else HISTORY_DEFAULT)
        elif cmd == "/rooms":
            ack = await self.call("rooms")
            for r in ack["rooms"]:
                mark = "*" if r["joined"] else " "
                lock = " (invite only)" if r["visibility"] == "invite" else ""
                topic = f" - {r['topic']}" if r["topic"] else ""
                self.output(f"{mark} #{r['name']} {r['members']} member(s){lock}{topic}")
        elif cmd == "/create" and args:
            await self._join(args[0].lstrip("#"), visibility=args[1] if len(args) > 1 else None)
        elif cmd == "/topic" and rest.strip():
            await self.call("topic", room=self._need_room(), topic=rest.strip())
        elif cmd == "/invite" and args:
            await self.call("invite", room=self._need_room(), nick=args[0])
            self.output(f"* invited {args[0]} to #{self._need_room()}")
        elif cmd in ("/kick", "/ban") and args:
            fields: dict[str, Any] = {"room": self._need_room(), "nick": args[0]}
            if len(args) > 1:
                fields["reason"] = " ".join(args[1:])
            await self.call(cmd[1:], **fields)
        elif cmd == "/mute" and args:
            fields = {"room": self._need_room(), "nick": args[0]}
            if len(args) > 1 and args[1].isdigit():
                fields["seconds"] = int(args[1])
            await self.call("mute", **fields)
        elif cmd == "/unmute" and args:
            await self.call("unmute", room=self._need_room(), nick=args[0])
        else:
            raise ClientError("usage", f"unknown command or missing argument: {line}; try /help")
        return True

    async def _join(self, room: str, visibility: str | None = None) -> None:
        if visibility is not None:
            vis = "invite" if visibility.startswith("invite") else "public"
            ack = await self.call("create", room=room, visibility=vis)
            verb = "created"
        else:
            try:
                ack = await self.call("join", room=room)
                verb = "joined"
            except ClientError as exc:
                if exc.code != "no_such_room":
                    raise
                ack = await self.call("create", room=room)
                verb = "created"
        name = ack["room"]["name"]
        self.rooms.add(name)
        self.target = "#" + name
        topic = f" - {ack['room']['topic']}" if ack["room"]["topic"] else ""
        self.output(f"* {verb} #{name}{topic}")

    async def _history(self, count: int) -> None:
        if self.target is None:
            raise ClientError("no_target", "no current room or person")
        count = max(1, min(count, 200))
        if self.target.startswith("#"):
            ack = await self.call("history", room=self.target[1:], limit=count)
        else:
            ack = await self.call("history", limit=count, **{"with": self.target[1:]})
        if not ack["messages"]:
            self.output(f"* no messages in {self.target}")
        for message in ack["messages"]:
            self.output(format_message(message))
