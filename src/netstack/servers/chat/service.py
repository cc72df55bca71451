"""Chat session logic, shared by the WebSocket and TCP transports.

A transport wraps each connection in an :class:`Outlet` (write one encoded event, close
with a code, report unsent bytes) and calls :meth:`ChatService.open_session`. The
returned :class:`Session` takes raw messages (:meth:`Session.receive`, synchronous: size,
flood and grammar checks happen as the bytes arrive, in ``proto/chat.py``) and runs the
valid commands one at a time, in order, in its own task. Every command gets exactly one
``ack`` or ``error``; other events arrive through the :class:`~.fanout.Fanout`.

Invariants:

* A user's sessions are subscribed to ``user:<id>`` and to ``room:<name>`` for every room
  the user belongs to, from login (before anything is read for them, so a client that
  subscribes then backfills misses nothing) until logout or disconnect.
* Presence is per user: ``online`` when the first session logs in and ``offline`` when
  the last one goes; ``join``/``leave`` are membership. Changes are coalesced per room
  (``proto.chat.PresenceBatcher``) and sent every ``presence_interval``: membership to the
  room's members, online/offline only to the sessions watching the room (the last
  :data:`MAX_WATCHED` rooms each asked ``who`` about), so a mass connect of N members
  costs O(N) per interval, not O(N^2).
* Online/offline of a user also goes to their :data:`MAX_DM_PARTNERS` most recent DM
  partners (``user:<id>``, a ``presence`` event with ``room`` null, batched per partner),
  whatever room those watch; each login gets its partners' current state after the ack.
  A user without DMs costs one store query per login/logout and no event.
* A crashed instance's users are announced ``offline`` by the one surviving instance that
  reaps it (:class:`~.scaleout.RedisPresence`, in batches), through the same batches.
* A DM to a user with no live session is also queued as pending and delivered at the
  next login (and is in ``backfill`` anyway).
* Several instances (``--redis``): events cross instances through the fan-out, and so do
  the room subscription changes of a user (join, leave, kick, ban), as ``control`` events
  that each instance applies to its own sessions of that user. Presence is counted across
  instances; its changes are coroutines run after the ack (login) or in the background
  (disconnect), and :meth:`ChatService.drain` waits for the latter on shutdown.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Protocol

from netstack.config import ChatLimits, ChatTimeouts
from netstack.errors import LimitExceeded
from netstack.proto.chat import (
    CLOSE_POLICY,
    DEFAULT_PAGE,
    MAX_PAGE,
    MAX_WHO,
    ChatConnection,
    Code,
    Command,
    CommandError,
    PresenceBatcher,
    PresenceChange,
    State,
    ack_event,
    encode,
    error_event,
    hello_event,
)
from netstack.servers.chat import auth
from netstack.servers.chat.fanout import (
    CONTROL_TOPIC,
    Fanout,
    LocalPresence,
    LocalThrottle,
    LoginThrottle,
    Presence,
    room_topic,
    user_topic,
    watch_topic,
)
from netstack.servers.chat.store import (
    ROLE_RANK,
    FileInfo,
    Member,
    Role,
    Room,
    Store,
    StoreConflict,
    User,
    Visibility,
    file_json,
)

logger = logging.getLogger(__name__)

# Safe to show inline in a browser; anything else is served as an attachment.
INLINE_MIMES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "text/plain"})
MUTE_FOREVER = 2**62
# Password guessing: after this many failed logins for one nick within the window, further
# attempts are refused without checking the password until the window has passed.
MAX_LOGIN_FAILURES = 10
LOGIN_WINDOW = 300.0
# scrypt costs ~50 ms of CPU and 16 MiB per hash: a few at a time, queued beyond that, so
# a burst of logins cannot take every core or a lot of memory.
HASH_WORKERS = 2
CLOSE_GOING_AWAY = 1001
# Rooms whose online/offline changes one session receives (the member pane of the page
# shows one; a terminal user may /who a few). The oldest watch is dropped beyond this.
MAX_WATCHED = 4
# A user's online/offline also goes to the users they exchanged DMs with: the most recent
# this many (the page lists DM partners; a presence change costs O(this), not O(partners)).
MAX_DM_PARTNERS = 50


class Outlet(Protocol):
    """One client connection, as the session logic sees it."""

    def write(self, text: str) -> None:
        """Send one encoded event (never blocks; the transport buffers)."""

    def close(self, code: int, reason: str) -> None:
        """Close after flushing what was written (a WebSocket close code)."""

    def buffered(self) -> int:
        """Bytes written but not yet sent."""


class _LastEncoded:
    """UTF-8 of the text being fanned out, encoded once for all its recipients.

    A publish hands the same ``str`` object to every subscriber in turn, so an identity
    check on the last text turns N encodes into one.
    """

    text: str = ""
    utf8: bytes = b""
    line: bytes = b"\n"


def utf8(text: str) -> bytes:
    """``text.encode()``, cached for the text being fanned out."""
    if text is not _LastEncoded.text:
        _LastEncoded.text, _LastEncoded.utf8 = text, text.encode()
        _LastEncoded.line = _LastEncoded.utf8 + b"\n"
    return _LastEncoded.utf8


def utf8_line(text: str) -> bytes:
    """``text.encode() + b"\\n"`` (a TCP line), cached like :func:`utf8`."""
    utf8(text)
    return _LastEncoded.line


def now_ms() -> int:
    return int(time.time() * 1000)


class Session:
    """One client connection's chat state; created by :meth:`ChatService.open_session`."""

    def __init__(self, service: ChatService, outlet: Outlet) -> None:
        self.service = service
        self.outlet = outlet
        self.conn = ChatConnection(service.limits)
        self.user: User | None = None
        self.token_hash: str | None = None
        self.rooms: set[str] = set()
        self.watching: list[str] = []  # rooms whose online/offline changes it gets, oldest first
        self.closed = False
        self.after_ack: list[dict[str, object]] = []
        self.pending_upto = 0  # last pending DM sent after the login ack, to clear
        # presence.connect() of this session's login: disconnect() waits for it.
        self.presence_task: asyncio.Future[bool] | None = None
        # Commands to run, error texts to send and a final close, in arrival order.
        self._inbox: collections.deque[Command | str | tuple[int, str]] = collections.deque()
        self._worker: asyncio.Task[None] | None = None

    @property
    def nick(self) -> str | None:
        return self.user.nick if self.user else None

    # ------------------------------------------------------------------ input

    def receive(self, data: str | bytes) -> None:
        """One message from the client, as received (called by the transport).

        Replies keep the order of the messages: while earlier commands are still running,
        an error for a later message (and a flood disconnect) waits behind them.
        """
        if self.closed or self.conn.close_code is not None:
            return
        try:
            self.conn.receive_message(data, self.service.clock())
        except LimitExceeded as exc:
            logger.warning("chat client %s: %s; closing", self.nick or "-", exc)
        if self.conn.close_code is not None:
            logger.warning("chat client %s: %s; closing", self.nick or "-", self.conn.close_reason)
        self._inbox.extend(self.conn.messages_to_send())
        self._inbox.extend(self.conn.events_received())
        if self.conn.close_code is not None:
            self._inbox.append((self.conn.close_code, self.conn.close_reason))
        if self._worker is None and self._inbox:
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        try:
            while self._inbox and not self.closed:
                item = self._inbox.popleft()
                if isinstance(item, Command):
                    await self.service.handle(self, item)
                elif isinstance(item, str):
                    self.deliver(item)
                else:
                    self.outlet.close(*item)
        finally:
            self._worker = None

    # ------------------------------------------------------------------ output

    def send(self, event: dict[str, object]) -> None:
        """Send one event to this client only."""
        self.deliver(encode(event))

    def deliver(self, text: str) -> None:
        """Fan-out hook: write ``text`` unless this client cannot keep up."""
        if self.closed:
            return
        if self.outlet.buffered() > self.service.limits.max_outgoing_bytes:
            logger.warning("chat client %s is not reading; dropping it", self.nick or "-")
            self.outlet.close(CLOSE_POLICY, "not reading fast enough")
            self.connection_lost()
            return
        self.outlet.write(text)

    # ------------------------------------------------------------------ end

    def connection_lost(self) -> None:
        """The transport closed (called once by the transport; idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._worker is not None:
            self._worker.cancel()
        self.service.session_closed(self)


class _Control:
    """The service's own subscriber to ``control`` events (subscription changes)."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    def deliver(self, text: str) -> None:
        try:
            event = json.loads(text)
            op, user_id, room = event["op"], event["user"], event["room"]
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a malformed chat control event")
            return
        if op in ("subscribe", "unsubscribe") and isinstance(user_id, int):
            self.service.control(op, user_id, str(room))


class ChatService:
    """Accounts, rooms, messages and presence for every connected session.

    Args:
        store: persistence (opened by the caller).
        fanout: event delivery between sessions (and instances).
        presence: who is connected (and on which instance does not matter).
        throttle: failed logins per nick (in-process by default).
        limits: per-client limits.
        timeouts: ``session_ttl`` for login tokens.
        idle_timeout: the TCP idle timeout, announced to clients in ``hello``.
        clock: monotonic seconds for flood control (tests pass a fake one).
        wallclock: milliseconds since the epoch for message timestamps and expiry.
    """

    def __init__(
        self,
        store: Store,
        fanout: Fanout,
        *,
        presence: Presence | None = None,
        throttle: LoginThrottle | None = None,
        limits: ChatLimits | None = None,
        timeouts: ChatTimeouts | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], int] = now_ms,
        idle_timeout: float | None = None,
    ) -> None:
        self.store = store
        self.fanout = fanout
        self.presence = presence if presence is not None else LocalPresence()
        self.limits = limits or ChatLimits()
        self.timeouts = timeouts or ChatTimeouts()
        self.clock = clock
        self.wallclock = wallclock
        self.idle_timeout = idle_timeout
        self.sessions: set[Session] = set()
        self.online: dict[int, set[Session]] = {}  # this instance's logged-in sessions
        self.messages_accepted = 0  # say + dm stored (the metrics endpoint reads it)
        self._hasher = concurrent.futures.ThreadPoolExecutor(
            max_workers=HASH_WORKERS, thread_name_prefix="chat-scrypt"
        )
        self.throttle = (
            throttle
            if throttle is not None
            else LocalThrottle(clock, max_failures=MAX_LOGIN_FAILURES, window=LOGIN_WINDOW)
        )
        self._background: set[asyncio.Task[None]] = set()  # presence updates of closed sessions
        self._presence_batch = PresenceBatcher()
        self._dm_batch = PresenceBatcher()  # "room" is the DM partner's user id
        self._presence_timer: asyncio.TimerHandle | None = None
        self.fanout.subscribe(CONTROL_TOPIC, _Control(self))
        self.presence.on_expired(self._expired)
        self.presence.on_returned(self._returned)
        self._handlers: dict[str, Callable[[Session, Command], Awaitable[dict[str, object]]]] = {
            "register": self._register,
            "login": self._login,
            "resume": self._resume,
            "logout": self._logout,
            "ping": self._ping,
            "create": self._create,
            "join": self._join,
            "leave": self._leave,
            "rooms": self._rooms,
            "who": self._who,
            "invite": self._invite,
            "topic": self._topic,
            "say": self._say,
            "dm": self._dm,
            "history": self._history,
            "backfill": self._backfill,
            "upload": self._upload,
            "kick": self._kick,
            "ban": self._ban,
            "unban": self._unban,
            "mute": self._mute,
            "unmute": self._unmute,
            "set_role": self._set_role,
        }

    # ------------------------------------------------------------------ sessions

    def open_session(self, outlet: Outlet) -> Session:
        """A new connection: returns its session, after sending ``hello``."""
        session = Session(self, outlet)
        self.sessions.add(session)
        hello = hello_event(self.limits)
        # TCP clients must say something within idle_timeout: a ping every half of it.
        hello["ping_every"] = self.idle_timeout / 2 if self.idle_timeout else None
        session.send(hello)
        return session

    def session_closed(self, session: Session) -> None:
        self.sessions.discard(session)
        self._go_offline(session)

    async def drain(self) -> None:
        """Wait for the presence updates of closed sessions and send the last batch
        (before closing the fan-out)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self.flush_presence()

    def shutdown(self) -> None:
        """Tell every client the server is going away (close code 1001)."""
        for session in list(self.sessions):
            session.outlet.close(CLOSE_GOING_AWAY, "server shutting down")

    async def handle(self, session: Session, command: Command) -> None:
        """Run one command and send its ``ack`` or ``error``."""
        try:
            result = await self._handlers[command.type](session, command)
        except CommandError as exc:
            session.send(
                error_event(exc.code, exc.message, request=command.id, command=command.type)
            )
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("chat command %s from %s failed", command.type, session.nick)
            session.send(
                error_event(
                    Code.INTERNAL, "internal error", request=command.id, command=command.type
                )
            )
            return
        ack = ack_event(command)
        ack.update(result)
        session.send(ack)
        events, session.after_ack = session.after_ack, []
        for event in events:
            session.send(event)
        if session.pending_upto and not session.closed and session.user is not None:
            # Written to the client: no longer pending, even if it disconnects right now
            # (shield: the disconnect cancels this task, not the store update).
            upto, session.pending_upto = session.pending_upto, 0
            await asyncio.shield(self.store.clear_pending(session.user.id, upto))

    # ------------------------------------------------------------------ helpers

    def _user(self, session: Session) -> User:
        assert session.user is not None, "the proto layer lets only logged-in commands through"
        return session.user

    async def _room(self, name: str) -> Room:
        room = await self.store.get_room(name)
        if room is None:
            raise CommandError(Code.NO_SUCH_ROOM, f"no room named {name!r}")
        return room

    async def _member(self, room: Room, user: User) -> Member:
        member = await self.store.get_member(room.id, user.id)
        if member is None:
            raise CommandError(Code.NOT_MEMBER, f"you are not in {room.name!r}")
        return member

    async def _target(self, nick: str) -> User:
        user = await self.store.get_user(nick)
        if user is None:
            raise CommandError(Code.NO_SUCH_USER, f"no user named {nick!r}")
        return user

    def _publish(self, topic: str, event: dict[str, object]) -> None:
        self.fanout.publish(topic, encode(event))

    def _presence(self, room: str, nick: str, change: PresenceChange) -> None:
        """Queue a presence change; the batch goes out within ``presence_interval``."""
        self._presence_batch.add(room, nick, change)
        self._schedule_presence()

    def _dm_presence(self, partner_id: int, nick: str, change: PresenceChange) -> None:
        """Queue an online/offline change of ``nick`` for its DM partner ``partner_id``."""
        self._dm_batch.add(str(partner_id), nick, change)
        self._schedule_presence()

    async def _announce(
        self, user_id: int, nick: str, rooms: Collection[str], change: PresenceChange
    ) -> None:
        """Queue ``online``/``offline`` of a user for its rooms' watchers and DM partners."""
        for room in sorted(rooms):
            self._presence(room, nick, change)
        for partner_id, _ in await self.store.dm_partners(user_id, MAX_DM_PARTNERS):
            self._dm_presence(partner_id, nick, change)

    async def _expired(self, user_ids: list[int]) -> None:
        """Users of a dead instance connected nowhere else (one batch): ``offline``."""
        for user_id in user_ids:
            user = await self.store.get_user_by_id(user_id)
            if user is not None:
                rooms = await self.store.user_rooms(user_id)
                await self._announce(user_id, user.nick, rooms, "offline")

    async def _returned(self, user_ids: list[int]) -> None:
        """This instance was taken for dead and its users announced offline: ``online``."""
        for user_id in user_ids:
            session = next(iter(self._user_sessions(user_id)), None)
            if session is not None and session.user is not None:
                await self._announce(user_id, session.user.nick, session.rooms, "online")

    def _schedule_presence(self) -> None:
        interval = self.timeouts.presence_interval
        if interval is None:
            self.flush_presence()
        elif self._presence_timer is None:
            self._presence_timer = asyncio.get_running_loop().call_later(
                interval, self.flush_presence
            )

    def flush_presence(self) -> None:
        """Publish the coalesced presence changes now (the timer's callback)."""
        if self._presence_timer is not None:
            self._presence_timer.cancel()
            self._presence_timer = None
        for batch in self._presence_batch.flush():
            topic = room_topic(batch.room) if batch.membership else watch_topic(batch.room)
            self._publish(topic, batch.event)
        for batch in self._dm_batch.flush():  # to each partner's own sessions, room null
            self._publish(user_topic(int(batch.room)), {**batch.event, "room": None})

    def _watch(self, session: Session, room: str) -> None:
        """Send ``session`` the online/offline changes of ``room`` from now on."""
        if room in session.watching:
            session.watching.remove(room)
        elif len(session.watching) >= MAX_WATCHED:
            self.fanout.unsubscribe(watch_topic(session.watching.pop(0)), session)
        session.watching.append(room)
        self.fanout.subscribe(watch_topic(room), session)

    def _unwatch(self, session: Session, room: str) -> None:
        if room in session.watching:
            session.watching.remove(room)
            self.fanout.unsubscribe(watch_topic(room), session)

    def _user_sessions(self, user_id: int) -> set[Session]:
        return self.online.get(user_id, set())

    def _subscribe_room(self, user_id: int, room: str) -> None:
        """Subscribe every session of the user, on every instance, to the room."""
        self._publish(CONTROL_TOPIC, {"op": "subscribe", "user": user_id, "room": room})

    def _unsubscribe_room(self, user_id: int, room: str) -> None:
        self._publish(CONTROL_TOPIC, {"op": "unsubscribe", "user": user_id, "room": room})

    def control(self, op: str, user_id: int, room: str) -> None:
        """Apply a subscription change to this instance's sessions of ``user_id``."""
        for s in self._user_sessions(user_id):
            if op == "subscribe":
                s.rooms.add(room)
                self.fanout.subscribe(room_topic(room), s)
            else:
                s.rooms.discard(room)
                self.fanout.unsubscribe(room_topic(room), s)
                self._unwatch(s, room)  # left, kicked or banned: who asks again if allowed

    async def is_online(self, user_id: int) -> bool:
        return await self.presence.is_online(user_id)

    # ------------------------------------------------------------------ accounts

    async def _hash(self, password: str) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._hasher, auth.hash_password, password)

    async def _verify(self, password: str, stored: str) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._hasher, auth.verify_password, password, stored)

    def close(self) -> None:
        """Release the hashing threads (after the listeners are closed)."""
        if self._presence_timer is not None:  # drain() sent what was due
            self._presence_timer.cancel()
            self._presence_timer = None
        self._hasher.shutdown(wait=False, cancel_futures=True)

    async def _register(self, session: Session, cmd: Command) -> dict[str, object]:
        nick = cmd.text("nick")
        if await self.store.get_user(nick) is not None:
            raise CommandError(Code.NICK_TAKEN, f"the nick {nick!r} is taken")
        password_hash = await self._hash(cmd.text("password"))
        try:
            user = await self.store.create_user(nick, password_hash, self.wallclock())
        except StoreConflict:
            raise CommandError(Code.NICK_TAKEN, f"the nick {nick!r} is taken") from None
        return await self._enter(session, user, new_token=True)

    async def _login(self, session: Session, cmd: Command) -> dict[str, object]:
        key = cmd.text("nick").lower()
        wait = await self.throttle.blocked(key)
        if wait is not None:
            raise CommandError(
                Code.TOO_MANY_ATTEMPTS,
                f"too many failed logins for this nick; retry in {int(wait) + 1} s",
            )
        user = await self.store.get_user(key)
        stored = user.password_hash if user is not None else auth.DUMMY_HASH
        ok = await self._verify(cmd.text("password"), stored)
        if user is None or not ok:
            await self.throttle.failed(key)
            raise CommandError(Code.AUTH_FAILED, "wrong nick or password")
        await self.throttle.succeeded(key)
        return await self._enter(session, user, new_token=True)

    async def _resume(self, session: Session, cmd: Command) -> dict[str, object]:
        token = cmd.text("token")
        user = await self.store.session_user(auth.token_hash(token), self.wallclock())
        if user is None:
            raise CommandError(Code.BAD_TOKEN, "the session token is unknown or expired")
        session.token_hash = auth.token_hash(token)
        return await self._enter(session, user, new_token=False)

    async def _enter(self, session: Session, user: User, *, new_token: bool) -> dict[str, object]:
        if session.conn.state is not State.UNAUTHENTICATED:  # logged in by a racing command
            raise CommandError(Code.ALREADY_AUTHENTICATED, "already logged in")
        result: dict[str, object] = {"nick": user.nick}
        if new_token:
            token = auth.new_token()
            now = self.wallclock()
            expires = now + int(self.timeouts.session_ttl * 1000)
            await self.store.create_session(auth.token_hash(token), user.id, expires, now)
            session.token_hash = auth.token_hash(token)
            result.update(token=token, expires=expires)
        rooms = await self.store.user_rooms(user.id)
        if session.closed:
            return result
        session.conn.authenticate(user.nick)
        session.user = user
        self.online.setdefault(user.id, set()).add(session)
        self.fanout.subscribe(user_topic(user.id), session)
        for room in rooms:
            session.rooms.add(room)
            self.fanout.subscribe(room_topic(room), session)
        # Shielded: if the connection drops meanwhile, its disconnect() waits for this.
        counted = session.presence_task = asyncio.ensure_future(self.presence.connect(user.id))
        try:
            first = await asyncio.shield(counted)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # shared presence unreachable: still logged in, here
            logger.warning("chat presence: connect of %s failed: %s", user.nick, exc)
            first = False
        partners = await self.store.dm_partners(user.id, MAX_DM_PARTNERS)
        if first:
            for room in rooms:
                self._presence(room, user.nick, "online")
            for partner_id, _ in partners:
                self._dm_presence(partner_id, user.nick, "online")
        # Where the DM partners are, whatever room the client shows; changes follow.
        if partners and (event := await self._partners_event(partners)) is not None:
            session.after_ack.append(event)
        result["rooms"] = rooms
        result["last_id"] = await self.store.last_message_id()
        # Sent after the ack: the DMs that waited for this login. They stop being pending
        # only once written (handle() clears them), so a drop during login loses none.
        # At most a page: a user back after a long time gets the rest at the next login
        # and, like everything else, through backfill (a login costs O(page), not O(inbox)).
        for message in await self.store.pending(user.id, MAX_PAGE):
            session.after_ack.append({"type": "dm", "message": message.to_json(), "pending": True})
            session.pending_upto = message.id
        return result

    def _go_offline(self, session: Session) -> asyncio.Task[None] | None:
        """Unsubscribe the session now; returns the task that updates presence after."""
        user = session.user
        if user is None:
            return None
        self.fanout.unsubscribe(user_topic(user.id), session)
        for room in session.rooms:
            self.fanout.unsubscribe(room_topic(room), session)
        for room in session.watching:
            self.fanout.unsubscribe(watch_topic(room), session)
        rooms, session.rooms, session.watching = session.rooms, set(), []
        sessions = self.online.get(user.id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self.online[user.id]
        counted, session.presence_task = session.presence_task, None
        if counted is None:
            return None
        task = asyncio.get_running_loop().create_task(self._release(user, rooms, counted))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _release(self, user: User, rooms: set[str], counted: asyncio.Future[bool]) -> None:
        """Count a closed session out of presence; ``offline`` if it was the user's last."""
        try:
            await counted
        except Exception:  # never counted in (logged by _enter)
            return
        try:
            last = await self.presence.disconnect(user.id)
        except Exception as exc:
            logger.warning("chat presence: disconnect of %s failed: %s", user.nick, exc)
            return
        if last:
            try:
                await self._announce(user.id, user.nick, rooms, "offline")
            except Exception as exc:  # the store failed: the rooms were queued already
                logger.warning("chat presence: DM partners of %s: %s", user.nick, exc)

    async def _partners_event(self, partners: list[tuple[int, str]]) -> dict[str, object] | None:
        """A ``presence`` event (room null) with the online state of these DM partners."""
        try:
            online = await self.presence.online([uid for uid, _ in partners])
        except Exception as exc:  # shared presence unreachable: say nothing
            logger.warning("chat presence: lookup of DM partners failed: %s", exc)
            return None
        return {
            "type": "presence",
            "room": None,
            "joined": [],
            "left": [],
            "online": [nick for uid, nick in partners if uid in online],
            "offline": [nick for uid, nick in partners if uid not in online],
        }

    async def _logout(self, session: Session, cmd: Command) -> dict[str, object]:
        if session.token_hash is not None:
            await self.store.delete_session(session.token_hash)
        release = self._go_offline(session)
        if release is not None:
            await asyncio.shield(release)
        session.user = None
        session.token_hash = None
        session.conn.deauthenticate()
        return {}

    async def _ping(self, session: Session, cmd: Command) -> dict[str, object]:
        return {"time": self.wallclock()}

    # ------------------------------------------------------------------ rooms

    def _room_json(self, room: Room, role: Role | None = None) -> dict[str, object]:
        out: dict[str, object] = {
            "name": room.name,
            "visibility": room.visibility,
            "topic": room.topic,
        }
        if role is not None:
            out["role"] = role
        return out

    async def _create(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        visibility: Visibility = "invite" if cmd.opt_text("visibility") == "invite" else "public"
        name = cmd.text("room")
        try:
            room = await self.store.create_room(
                name, visibility, cmd.opt_text("topic") or "", user.id, self.wallclock()
            )
        except StoreConflict:
            raise CommandError(Code.ROOM_EXISTS, f"a room named {name!r} exists") from None
        self._subscribe_room(user.id, room.name)
        return {"room": self._room_json(room, "owner")}

    async def _join(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        room = await self._room(cmd.text("room"))
        member = await self.store.get_member(room.id, user.id)
        if member is None:
            if await self.store.is_banned(room.id, user.id):
                raise CommandError(Code.BANNED, f"you are banned from {room.name!r}")
            if room.visibility == "invite" and not await self.store.has_invite(room.id, user.id):
                raise CommandError(Code.INVITE_ONLY, f"{room.name!r} is invite-only")
            await self.store.add_member(room.id, user.id, "member", self.wallclock())
            self._presence(room.name, user.nick, "join")
        self._subscribe_room(user.id, room.name)
        return {"room": self._room_json(room, member.role if member else "member")}

    async def _leave(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        room = await self._room(cmd.text("room"))
        if not await self.store.remove_member(room.id, user.id):
            raise CommandError(Code.NOT_MEMBER, f"you are not in {room.name!r}")
        self._unsubscribe_room(user.id, room.name)
        self._presence(room.name, user.nick, "leave")
        return {"room": room.name}

    async def _rooms(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        summaries = await self.store.list_rooms(user.id)
        return {
            "rooms": [
                {
                    **self._room_json(s.room, s.role),
                    "members": s.members,
                    "joined": s.role is not None,
                }
                for s in summaries
            ]
        }

    async def _visible(self, room: Room, user: User) -> None:
        """Reading a room: public rooms to anyone not banned, invite-only to members."""
        if await self.store.is_banned(room.id, user.id):
            raise CommandError(Code.BANNED, f"you are banned from {room.name!r}")
        if room.visibility == "invite":
            await self._member(room, user)

    async def _who(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        room = await self._room(cmd.text("room"))
        await self._visible(room, user)
        now = self.wallclock()
        members = await self.store.members(room.id)
        # Watch before reading presence: a change racing this reply arrives as an event.
        if not session.closed:
            self._watch(session, room.name)
        online = await self.presence.online([m.user_id for m in members])
        # Online first (stable: by nick within each group), at most ``limit``.
        listed = sorted(members, key=lambda m: m.user_id not in online)[
            : cmd.number("limit") or MAX_WHO
        ]
        return {
            "room": room.name,
            "topic": room.topic,
            "members": [
                {
                    "nick": m.nick,
                    "role": m.role,
                    "online": m.user_id in online,
                    "muted": m.muted_until is not None and m.muted_until > now,
                }
                for m in listed
            ],
            "count": len(members),
            "online_count": sum(m.user_id in online for m in members),
        }

    async def _invite(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        room = await self._room(cmd.text("room"))
        await self._member(room, user)
        target = await self._target(cmd.text("nick"))
        if await self.store.is_banned(room.id, target.id):
            raise CommandError(Code.BANNED, f"{target.nick} is banned from {room.name!r}")
        await self.store.add_invite(room.id, target.id, user.id, self.wallclock())
        self._publish(
            user_topic(target.id),
            {"type": "invited", "room": room.name, "by": user.nick, "topic": room.topic},
        )
        return {"room": room.name, "nick": target.nick}

    async def _topic(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        room = await self._room(cmd.text("room"))
        member = await self._member(room, user)
        if ROLE_RANK[member.role] < ROLE_RANK["moderator"]:
            raise CommandError(Code.FORBIDDEN, "only moderators and the owner set the topic")
        topic = cmd.text("topic")
        await self.store.set_topic(room.id, topic)
        self._publish(
            room_topic(room.name),
            {"type": "topic", "room": room.name, "topic": topic, "by": user.nick},
        )
        return {"room": room.name, "topic": topic}

    # ------------------------------------------------------------------ messages

    async def _file(self, cmd: Command) -> FileInfo | None:
        file_hash = cmd.opt_text("file")
        if file_hash is None:
            return None
        info = await self.store.file_info(file_hash)
        if info is None:
            raise CommandError(Code.NO_SUCH_FILE, "upload the file first")
        return info

    async def _say(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        room = await self._room(cmd.text("room"))
        member = await self._member(room, user)
        now = self.wallclock()
        if member.muted_until is not None and member.muted_until > now:
            until = "" if member.muted_until >= MUTE_FOREVER else f" until {member.muted_until}"
            raise CommandError(Code.MUTED, f"you are muted in {room.name!r}{until}")
        file = await self._file(cmd)
        message = await self.store.add_message(
            sender=user, text=cmd.text("text"), now=now, room=room, file=file
        )
        self.messages_accepted += 1
        body = message.to_json()
        self._publish(room_topic(room.name), {"type": "message", "message": body})
        return {"message": body}

    async def _dm(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        target = await self._target(cmd.text("to"))
        file = await self._file(cmd)
        try:
            offline = not await self.presence.is_online(target.id)
        except Exception as exc:  # unknown: queue it for the next login
            logger.warning("chat presence: lookup of %s failed: %s", target.nick, exc)
            offline = True
        message = await self.store.add_message(
            sender=user,
            text=cmd.text("text"),
            now=self.wallclock(),
            recipient=target,
            file=file,
            pending=offline,
        )
        self.messages_accepted += 1
        event = encode({"type": "dm", "message": message.to_json()})
        if not offline:
            self.fanout.publish(user_topic(target.id), event)
        if target.id != user.id:
            self.fanout.publish(user_topic(user.id), event)
        return {"message": message.to_json(), "delivered": not offline}

    async def _history(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        limit = cmd.number("limit") or DEFAULT_PAGE
        before = cmd.number("before")
        # One more than asked tells whether older messages exist.
        room_name = cmd.opt_text("room")
        if room_name is not None:
            room = await self._room(room_name)
            await self._visible(room, user)
            messages = await self.store.room_history(room, before, limit + 1)
            where: dict[str, object] = {"room": room.name}
        else:
            other = await self._target(cmd.text("with"))
            messages = await self.store.dm_history(user, other, before, limit + 1)
            where = {"with": other.nick}
        more = len(messages) > limit
        page = messages[1:] if more else messages
        return {**where, "messages": [m.to_json() for m in page], "more": more}

    async def _backfill(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        limit = cmd.number("limit") or DEFAULT_PAGE
        messages = await self.store.backfill(user.id, cmd.number("since") or 0, limit + 1)
        more = len(messages) > limit
        page = messages[:limit]
        return {"messages": [m.to_json() for m in page], "more": more}

    async def _upload(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        data = cmd.blob("data")
        mime = cmd.opt_text("mime") or "application/octet-stream"
        info = FileInfo(hashlib.sha256(data).hexdigest(), cmd.text("name"), len(data), mime)
        existing = await self.store.file_info(info.hash)
        if existing is None:
            await self.store.put_file(info, data, user.id, self.wallclock())
        return {"file": file_json(existing or info)}

    # ------------------------------------------------------------------ moderation

    async def _authority(self, cmd: Command, user: User) -> tuple[Room, Member, User, Role]:
        """The room, the actor (moderator or owner), the target and the target's role."""
        room = await self._room(cmd.text("room"))
        actor = await self._member(room, user)
        if ROLE_RANK[actor.role] < ROLE_RANK["moderator"]:
            raise CommandError(Code.FORBIDDEN, f"you are not a moderator of {room.name!r}")
        target = await self._target(cmd.text("nick"))
        if target.id == user.id:
            raise CommandError(Code.FORBIDDEN, "you cannot do that to yourself")
        target_member = await self.store.get_member(room.id, target.id)
        role: Role = target_member.role if target_member else "member"
        if ROLE_RANK[role] >= ROLE_RANK[actor.role]:
            raise CommandError(Code.FORBIDDEN, f"{target.nick} is a {role} of {room.name!r}")
        return room, actor, target, role

    def _remove_from_room(self, room: Room, target: User, event: dict[str, object]) -> None:
        # The room hears it (the target too, still subscribed), then the target is cut off.
        self._publish(room_topic(room.name), event)
        self._unsubscribe_room(target.id, room.name)

    async def _kick(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        room, _, target, _ = await self._authority(cmd, user)
        if not await self.store.remove_member(room.id, target.id):
            raise CommandError(Code.NOT_MEMBER, f"{target.nick} is not in {room.name!r}")
        reason = cmd.opt_text("reason") or ""
        self._remove_from_room(
            room,
            target,
            {
                "type": "kicked",
                "room": room.name,
                "nick": target.nick,
                "by": user.nick,
                "reason": reason,
            },
        )
        return {"room": room.name, "nick": target.nick}

    async def _ban(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        room, _, target, _ = await self._authority(cmd, user)
        reason = cmd.opt_text("reason") or ""
        await self.store.add_ban(room.id, target.id, user.id, reason, self.wallclock())
        was_member = await self.store.remove_member(room.id, target.id)
        event: dict[str, object] = {
            "type": "banned",
            "room": room.name,
            "nick": target.nick,
            "by": user.nick,
            "reason": reason,
        }
        if was_member:
            self._remove_from_room(room, target, event)
        return {"room": room.name, "nick": target.nick}

    async def _unban(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        room, _, target, _ = await self._authority(cmd, user)
        if not await self.store.remove_ban(room.id, target.id):
            raise CommandError(Code.BAD_VALUE, f"{target.nick} is not banned from {room.name!r}")
        return {"room": room.name, "nick": target.nick}

    async def _mute(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        room, _, target, _ = await self._authority(cmd, user)
        if await self.store.get_member(room.id, target.id) is None:
            raise CommandError(Code.NOT_MEMBER, f"{target.nick} is not in {room.name!r}")
        seconds = cmd.number("seconds")
        until = self.wallclock() + seconds * 1000 if seconds else MUTE_FOREVER
        await self.store.set_mute(room.id, target.id, until)
        self._publish(
            room_topic(room.name),
            {
                "type": "muted",
                "room": room.name,
                "nick": target.nick,
                "by": user.nick,
                "until": until if seconds else None,
                "reason": cmd.opt_text("reason") or "",
            },
        )
        return {"room": room.name, "nick": target.nick, "until": until if seconds else None}

    async def _unmute(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        room, _, target, _ = await self._authority(cmd, user)
        await self.store.set_mute(room.id, target.id, None)
        self._publish(
            room_topic(room.name),
            {"type": "unmuted", "room": room.name, "nick": target.nick, "by": user.nick},
        )
        return {"room": room.name, "nick": target.nick}

    async def _set_role(self, session: Session, cmd: Command) -> dict[str, object]:
        user = self._user(session)
        room = await self._room(cmd.text("room"))
        actor = await self._member(room, user)
        if actor.role != "owner":
            raise CommandError(Code.FORBIDDEN, f"only the owner of {room.name!r} sets roles")
        target = await self._target(cmd.text("nick"))
        member = await self.store.get_member(room.id, target.id)
        if member is None:
            raise CommandError(Code.NOT_MEMBER, f"{target.nick} is not in {room.name!r}")
        if member.role == "owner":
            raise CommandError(Code.FORBIDDEN, "the owner's role cannot change")
        role: Role = "moderator" if cmd.text("role") == "moderator" else "member"
        await self.store.set_role(room.id, target.id, role)
        self._publish(
            room_topic(room.name),
            {"type": "role", "room": room.name, "nick": target.nick, "role": role, "by": user.nick},
        )
        return {"room": room.name, "nick": target.nick, "role": role}

    # ------------------------------------------------------------------ HTTP downloads

    async def download(self, token: str, file_hash: str) -> tuple[FileInfo, bytes] | None:
        """The file for a valid session token, else ``None`` (the caller answers 404/403)."""
        user = await self.store.session_user(auth.token_hash(token), self.wallclock())
        if user is None:
            raise PermissionError("bad or expired session token")
        return await self.store.get_file(file_hash)
