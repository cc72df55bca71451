"""Chat protocol: the JSON message grammar, per-session state and flood control (sans-I/O).

Theory of operation
-------------------
Both transports (WebSocket text messages, newline-delimited JSON over TCP) hand this core
whole messages; framing is theirs. One :class:`ChatConnection` per client:

1. :meth:`ChatConnection.receive_message` takes one message and the time it arrived.
   In order, it checks the size (before parsing: a hostile client cannot make us parse
   a huge document), takes a token from the flood-control bucket, parses JSON (json only:
   no pickle, no eval; duplicate keys, NaN and nesting too deep are refused), validates
   the command against :data:`COMMANDS` (types, lengths, nick and room name rules,
   unknown fields), and checks it is allowed in the current state.
2. A valid command becomes a :class:`Command` in :meth:`events_received`; an invalid one
   queues an ``error`` event with a specific code (:class:`Code`) and the connection
   stays up. Only two things end the session: a message over ``max_message_bytes``
   (:class:`~netstack.errors.LimitExceeded`, close code 1009) and flooding past the
   warning (state ``CLOSED``, :attr:`ChatConnection.close_code` 1008).
3. The server answers every command with exactly one ``ack`` or ``error`` carrying the
   client's ``id``, and pushes other events (messages, presence...) with :meth:`send`.
   :meth:`messages_to_send` drains the encoded JSON texts.

States::

    UNAUTHENTICATED --authenticate(nick)--> AUTHENTICATED --deauthenticate()--> UNAUTHENTICATED
    any --oversize message / flood past tolerance / close()--> CLOSED

In ``UNAUTHENTICATED`` only ``register``, ``login``, ``resume`` and ``ping`` are accepted
(anything else: ``not_authenticated``); in ``AUTHENTICATED`` those three are refused with
``already_authenticated``. The server, which checks passwords and tokens, drives the
transitions; this core never decides who a user is.

Flood control is a token bucket (:class:`TokenBucket`): ``flood_burst`` tokens, refilled at
``flood_rate`` per second, one per message (valid or not). An empty bucket drops the
message; the first drop of an episode is answered with a ``slow_down`` warning, later
drops silently, and the ``flood_tolerance``-th drop after the warning closes the session
with a ``flood`` error. An episode ends when a message is accepted again.

Wire format: see ``COMMANDS`` for client commands and the ``*_event`` helpers for what
the server sends; docs/chat-protocol (the report of the chat work) lists both.
"""

from __future__ import annotations

import binascii
import enum
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from netstack.config import ChatLimits
from netstack.errors import LimitExceeded, LocalProtocolError

PROTOCOL_VERSION: Final = 1

MAX_PAGE: Final = 200
"""Largest ``limit`` for ``history`` and ``backfill``."""
MAX_WHO: Final = 1000
"""Most members one ``who`` lists (online first): a 10,000-member room is not sent whole."""
DEFAULT_PAGE: Final = 50

# WebSocket close codes (RFC 6455 §7.4.1).
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009


class Code(enum.StrEnum):
    """Error codes sent in ``{"type": "error", "code": ...}``. Stable: clients match on them."""

    # Grammar (this module).
    BAD_JSON = "bad_json"
    NOT_OBJECT = "not_object"
    UNKNOWN_COMMAND = "unknown_command"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    BAD_TYPE = "bad_type"
    BAD_VALUE = "bad_value"
    BAD_REQUEST_ID = "bad_request_id"
    BAD_NICK = "bad_nick"
    BAD_ROOM = "bad_room"
    BAD_PASSWORD = "bad_password"
    BAD_TEXT = "bad_text"
    CONFLICTING_FIELDS = "conflicting_fields"
    TOO_LARGE = "too_large"
    NOT_AUTHENTICATED = "not_authenticated"
    ALREADY_AUTHENTICATED = "already_authenticated"
    SLOW_DOWN = "slow_down"
    FLOOD = "flood"
    # Semantics (the server).
    AUTH_FAILED = "auth_failed"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    BAD_TOKEN = "bad_token"
    NICK_TAKEN = "nick_taken"
    NO_SUCH_ROOM = "no_such_room"
    ROOM_EXISTS = "room_exists"
    NO_SUCH_USER = "no_such_user"
    NO_SUCH_FILE = "no_such_file"
    NOT_MEMBER = "not_member"
    INVITE_ONLY = "invite_only"
    BANNED = "banned"
    MUTED = "muted"
    FORBIDDEN = "forbidden"
    FILE_TOO_LARGE = "file_too_large"
    INTERNAL = "internal"


class State(enum.Enum):
    UNAUTHENTICATED = "unauthenticated"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


RequestId = int | str
"""A client's ``id`` for a command, echoed in its ``ack`` or ``error``."""


class CommandError(Exception):
    """A command is refused; the server turns it into an ``error`` event.

    Not a :class:`~netstack.errors.ProtocolError`: the connection stays up and the error
    goes to the peer as data, never up the stack.

    Attributes:
        code: the :class:`Code` sent to the client.
        message: one human-readable sentence.
    """

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- flood control


class TokenBucket:
    """``burst`` tokens, refilled continuously at ``rate`` per second; time is passed in.

    Args:
        rate: tokens added per second.
        burst: bucket capacity (and starting level).
    """

    __slots__ = ("_last", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self._last: float | None = None

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens at time ``now``; ``False`` (nothing taken) if too few.

        A clock that goes backwards adds nothing (never a negative refill).
        """
        if self._last is not None and now > self._last:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def retry_after(self, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are available."""
        return max(0.0, (cost - self.tokens) / self.rate)


# --------------------------------------------------------------------------- validation

NICK_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]{1,23}")
"""2-24 characters: a letter, then letters, digits, ``_`` or ``-``. Unique ignoring case."""
ROOM_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
"""1-32 characters: lower-case letters, digits, ``_``, ``-``; not starting with ``_``/``-``."""
TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]{16,128}")
HASH_RE: Final = re.compile(r"[0-9a-f]{64}")
MIME_RE: Final = re.compile(r"[a-z0-9][a-z0-9.+-]{0,40}/[a-z0-9][a-z0-9.+-]{0,60}")
RESERVED_NICKS: Final = frozenset({"server", "system", "admin", "root", "netstack"})
# Control characters other than tab and newline are refused in text (terminal escapes).
_CONTROL_RE: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_LINE_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
MIN_PASSWORD: Final = 8
MAX_PASSWORD: Final = 256
MAX_REASON: Final = 200
MAX_TOPIC: Final = 200
MAX_FILENAME: Final = 200
MAX_SECONDS: Final = 365 * 24 * 3600
MAX_REQUEST_ID_CHARS: Final = 64
MAX_SAFE_INT: Final = 2**53 - 1  # largest integer a JavaScript client reads exactly
MAX_DEPTH: Final = 8  # commands are flat; a little nesting is tolerated, no more


Checker = Callable[[object, ChatLimits], object]


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise CommandError(Code.BAD_TYPE, f"{what} must be a string")
    return value


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CommandError(Code.BAD_TYPE, f"{what} must be an integer")
    return value


def check_nick(value: object, limits: ChatLimits | None = None) -> str:
    """Return ``value`` if it is a valid nickname.

    Raises:
        CommandError: ``bad_type`` or ``bad_nick``.
    """
    nick = _str(value, "nick")
    if not NICK_RE.fullmatch(nick):
        raise CommandError(
            Code.BAD_NICK,
            "a nick is 2-24 characters: a letter, then letters, digits, '_' or '-'",
        )
    if nick.lower() in RESERVED_NICKS:
        raise CommandError(Code.BAD_NICK, f"the nick {nick!r} is reserved")
    return nick


def check_room(value: object, limits: ChatLimits | None = None) -> str:
    """Return ``value`` if it is a valid room name.

    Raises:
        CommandError: ``bad_type`` or ``bad_room``.
    """
    room = _str(value, "room")
    if not ROOM_RE.fullmatch(room):
        raise CommandError(
            Code.BAD_ROOM,
            "a room name is 1-32 characters: lower-case letters, digits, '_' or '-'",
        )
    return room


def _password(value: object, limits: ChatLimits) -> str:
    password = _str(value, "password")
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise CommandError(
            Code.BAD_PASSWORD, f"a password is {MIN_PASSWORD}-{MAX_PASSWORD} characters"
        )
    return password


def _text(value: object, limits: ChatLimits) -> str:
    text = _str(value, "text")
    if len(text) > limits.max_text_chars:
        raise CommandError(Code.BAD_TEXT, f"text is longer than {limits.max_text_chars} characters")
    if _CONTROL_RE.search(text):
        raise CommandError(Code.BAD_TEXT, "text contains control characters")
    return text


def _short_text(name: str, maximum: int) -> Checker:
    def check(value: object, limits: ChatLimits) -> str:
        text = _str(value, name)
        if len(text) > maximum or _LINE_CONTROL_RE.search(text):
            raise CommandError(
                Code.BAD_VALUE, f"{name} is at most {maximum} characters on one line"
            )
        return text

    return check


def _pattern(name: str, pattern: re.Pattern[str], rule: str) -> Checker:
    def check(value: object, limits: ChatLimits) -> str:
        text = _str(value, name)
        if not pattern.fullmatch(text):
            raise CommandError(Code.BAD_VALUE, f"{name} must be {rule}")
        return text

    return check


def _choice(name: str, *choices: str) -> Checker:
    def check(value: object, limits: ChatLimits) -> str:
        text = _str(value, name)
        if text not in choices:
            raise CommandError(Code.BAD_VALUE, f"{name} must be one of: {', '.join(choices)}")
        return text

    return check


def _int_range(name: str, low: int, high: int) -> Checker:
    def check(value: object, limits: ChatLimits) -> int:
        number = _int(value, name)
        if not low <= number <= high:
            raise CommandError(Code.BAD_VALUE, f"{name} must be between {low} and {high}")
        return number

    return check


def _filename(value: object, limits: ChatLimits) -> str:
    name = _str(value, "name")
    if (
        not name.strip()
        or len(name) > MAX_FILENAME
        or _LINE_CONTROL_RE.search(name)
        or "/" in name
        or "\\" in name
        or name in (".", "..")
    ):
        raise CommandError(
            Code.BAD_VALUE,
            f"name must be 1-{MAX_FILENAME} characters, without '/', '\\' or control characters",
        )
    return name


def _data(value: object, limits: ChatLimits) -> bytes:
    text = _str(value, "data")
    if len(text) > (limits.max_file_bytes + 2) // 3 * 4:
        raise CommandError(
            Code.FILE_TOO_LARGE, f"files are limited to {limits.max_file_bytes} bytes"
        )
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        raise CommandError(Code.BAD_VALUE, "data must be standard base64") from None
    if len(raw) > limits.max_file_bytes:  # padding tricks cannot get past the first check,
        raise CommandError(  # but the decoded size is what the limit is about
            Code.FILE_TOO_LARGE, f"files are limited to {limits.max_file_bytes} bytes"
        )
    if not raw:
        raise CommandError(Code.BAD_VALUE, "data is empty")
    return raw


_msg_id = _int_range("message id", 0, MAX_SAFE_INT)
_limit = _int_range("limit", 1, MAX_PAGE)
_who_limit = _int_range("limit", 1, MAX_WHO)
_seconds = _int_range("seconds", 1, MAX_SECONDS)
_token = _pattern("token", TOKEN_RE, "a session token from login")
_hash = _pattern("file", HASH_RE, "a file hash (64 lower-case hex digits)")
_mime = _pattern("mime", MIME_RE, "a MIME type such as image/png")
_reason = _short_text("reason", MAX_REASON)
_topic = _short_text("topic", MAX_TOPIC)
_visibility = _choice("visibility", "public", "invite")
_role = _choice("role", "moderator", "member")


@dataclass(frozen=True, slots=True)
class Spec:
    """Fields of one command: name -> checker, required and optional."""

    required: Mapping[str, Checker] = field(default_factory=dict)
    optional: Mapping[str, Checker] = field(default_factory=dict)
    pre_auth: bool = False


COMMANDS: Final[Mapping[str, Spec]] = {
    # Accounts and sessions.
    "register": Spec({"nick": check_nick, "password": _password}, pre_auth=True),
    "login": Spec({"nick": check_nick, "password": _password}, pre_auth=True),
    "resume": Spec({"token": _token}, pre_auth=True),
    "ping": Spec(pre_auth=True),
    "logout": Spec(),
    # Rooms.
    "create": Spec({"room": check_room}, {"visibility": _visibility, "topic": _topic}),
    "join": Spec({"room": check_room}),
    "leave": Spec({"room": check_room}),
    "rooms": Spec(),
    "who": Spec({"room": check_room}, {"limit": _who_limit}),
    "invite": Spec({"room": check_room, "nick": check_nick}),
    "topic": Spec({"room": check_room, "topic": _topic}),
    # Messages.
    "say": Spec({"room": check_room, "text": _text}, {"file": _hash}),
    "dm": Spec({"to": check_nick, "text": _text}, {"file": _hash}),
    "history": Spec(
        {}, {"room": check_room, "with": check_nick, "before": _msg_id, "limit": _limit}
    ),
    "backfill": Spec({"since": _msg_id}, {"limit": _limit}),
    "upload": Spec({"name": _filename, "data": _data}, {"mime": _mime}),
    # Moderation.
    "kick": Spec({"room": check_room, "nick": check_nick}, {"reason": _reason}),
    "ban": Spec({"room": check_room, "nick": check_nick}, {"reason": _reason}),
    "unban": Spec({"room": check_room, "nick": check_nick}),
    "mute": Spec(
        {"room": check_room, "nick": check_nick}, {"seconds": _seconds, "reason": _reason}
    ),
    "unmute": Spec({"room": check_room, "nick": check_nick}),
    "set_role": Spec({"room": check_room, "nick": check_nick, "role": _role}),
}
"""Every client command and its fields. Each message is a JSON object
``{"type": COMMAND, "id": optional int|str, ...fields}``; other fields are refused."""


@dataclass(frozen=True, slots=True)
class Command:
    """One validated client command.

    Attributes:
        type: the command name (a key of :data:`COMMANDS`).
        id: the client's request id, echoed in the reply.
        args: validated fields (checkers' return values: ``str``, ``int`` or ``bytes``).
    """

    type: str
    id: RequestId | None
    args: Mapping[str, object]

    def text(self, name: str) -> str:
        """A required string field."""
        value = self.args[name]
        assert isinstance(value, str), name
        return value

    def opt_text(self, name: str) -> str | None:
        """An optional string field."""
        return self.text(name) if name in self.args else None

    def number(self, name: str) -> int | None:
        """An optional integer field."""
        value = self.args.get(name)
        assert value is None or isinstance(value, int), name
        return value

    def blob(self, name: str) -> bytes:
        """A required decoded-bytes field (``upload``'s ``data``)."""
        value = self.args[name]
        assert isinstance(value, bytes), name
        return value


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def parse(text: str | bytes) -> dict[str, object]:
    """Parse one message into a JSON object.

    Raises:
        CommandError: ``bad_json`` (not JSON, duplicate keys, NaN/Infinity, nested more
            than :data:`MAX_DEPTH`) or ``not_object``.
    """
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
        too_deep = _depth(value) > MAX_DEPTH
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CommandError(Code.BAD_JSON, f"not valid JSON: {exc}") from None
    if too_deep:
        raise CommandError(Code.BAD_JSON, f"JSON nested deeper than {MAX_DEPTH}")
    if not isinstance(value, dict):
        raise CommandError(Code.NOT_OBJECT, "a message must be a JSON object")
    return value


def request_id(obj: Mapping[str, object]) -> RequestId | None:
    """The message's valid ``id``, or ``None`` if it has none or an invalid one."""
    rid = obj.get("id")
    if isinstance(rid, bool):
        return None
    if isinstance(rid, int) and 0 <= rid <= MAX_SAFE_INT:
        return rid
    if isinstance(rid, str) and len(rid) <= MAX_REQUEST_ID_CHARS:
        return rid
    return None


def validate(obj: Mapping[str, object], limits: ChatLimits) -> Command:
    """Check a parsed message against :data:`COMMANDS`.

    Raises:
        CommandError: with the most specific code for the first problem found.
    """
    rid = request_id(obj)
    if "id" in obj and rid is None:
        raise CommandError(
            Code.BAD_REQUEST_ID,
            f"id must be an integer 0..2^53-1 or a string of at most {MAX_REQUEST_ID_CHARS}",
        )
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise CommandError(Code.MISSING_FIELD, "every message needs a string 'type'")
    spec = COMMANDS.get(kind)
    if spec is None:
        raise CommandError(Code.UNKNOWN_COMMAND, f"unknown command {kind[:40]!r}")
    args: dict[str, object] = {}
    for name in obj:
        if name not in ("type", "id") and name not in spec.required and name not in spec.optional:
            raise CommandError(Code.UNKNOWN_FIELD, f"{kind} has no field {name[:40]!r}")
    for name, check in spec.required.items():
        if name not in obj:
            raise CommandError(Code.MISSING_FIELD, f"{kind} needs {name!r}")
        args[name] = check(obj[name], limits)
    for name, check in spec.optional.items():
        if name in obj:
            args[name] = check(obj[name], limits)
    _cross_checks(kind, args)
    return Command(kind, rid, args)


def _cross_checks(kind: str, args: Mapping[str, object]) -> None:
    if kind in ("say", "dm") and "file" not in args and not str(args["text"]).strip():
        raise CommandError(Code.BAD_TEXT, "text is empty")
    if kind == "history" and ("room" in args) == ("with" in args):
        raise CommandError(Code.CONFLICTING_FIELDS, "history needs exactly one of 'room' or 'with'")


# --------------------------------------------------------------------------- events


def encode(event: Mapping[str, object]) -> str:
    """One event as compact JSON text (no newline inside: safe for line framing)."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def ack_event(
    command: Command | str, request: RequestId | None = None, **data: object
) -> dict[str, object]:
    """``{"type": "ack", "re": COMMAND, "id": ID, ...data}``."""
    if isinstance(command, Command):
        name, request = command.type, command.id
    else:
        name = command
    event: dict[str, object] = {"type": "ack", "re": name}
    if request is not None:
        event["id"] = request
    event.update(data)
    return event


def error_event(
    code: Code,
    message: str,
    *,
    request: RequestId | None = None,
    command: str | None = None,
    **data: object,
) -> dict[str, object]:
    """``{"type": "error", "code": CODE, "message": TEXT, "id"?: ID, "re"?: COMMAND}``."""
    event: dict[str, object] = {"type": "error", "code": str(code), "message": message}
    if request is not None:
        event["id"] = request
    if command is not None:
        event["re"] = command
    event.update(data)
    return event


def hello_event(limits: ChatLimits) -> dict[str, object]:
    """The first event on every connection: protocol version and the client's limits."""
    return {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "server": "netstack-chat",
        "limits": {
            "max_message_bytes": limits.max_message_bytes,
            "max_text_chars": limits.max_text_chars,
            "max_file_bytes": limits.max_file_bytes,
            "flood_rate": limits.flood_rate,
            "flood_burst": limits.flood_burst,
            "max_page": MAX_PAGE,
        },
    }


# --------------------------------------------------------------------------- presence

PresenceChange = Literal["join", "leave", "online", "offline"]
"""One presence change of one user in one room: membership (``join``/``leave``) or
connection (``online``/``offline``: the user's first / last connection)."""

_OPPOSITE: Final[Mapping[str, str]] = {
    "join": "leave",
    "leave": "join",
    "online": "offline",
    "offline": "online",
}
_LISTS: Final[Mapping[str, str]] = {
    "join": "joined",
    "leave": "left",
    "online": "online",
    "offline": "offline",
}


@dataclass(frozen=True, slots=True)
class PresenceBatch:
    """One coalesced ``presence`` event for one room and one audience.

    Attributes:
        room: the room name.
        membership: ``True``: ``joined``/``left`` changes, for the room's members;
            ``False``: ``online``/``offline`` changes, for the sessions watching the room.
        event: the ``presence`` event (all four lists present, two of them empty).
    """

    room: str
    membership: bool
    event: dict[str, object]


class PresenceBatcher:
    """Coalesces presence changes per room into at most two events per flush.

    Sending every join and every online change to every member of a room costs O(N) per
    change, O(N^2) when N clients connect at once. The server instead adds each change
    here (:meth:`add`) and flushes (:meth:`flush`) every ``presence_interval`` (it owns
    the timer; this core has no clock). A change and its reversal within one interval
    (``online`` then ``offline``) cancel out: nobody could have seen the difference.
    Within a list, nicks keep the order of their first pending change.
    """

    def __init__(self) -> None:
        # (room, membership?) -> nick -> its pending change
        self._pending: dict[tuple[str, bool], dict[str, str]] = {}

    def __bool__(self) -> bool:
        """``True`` while some change waits for :meth:`flush`."""
        return bool(self._pending)

    def add(self, room: str, nick: str, change: PresenceChange) -> None:
        """Note one change of ``nick`` in ``room``."""
        key = (room, change in ("join", "leave"))
        changes = self._pending.setdefault(key, {})
        if changes.get(nick) == _OPPOSITE[change]:
            del changes[nick]
            if not changes:
                del self._pending[key]
        else:
            changes[nick] = change

    def flush(self) -> list[PresenceBatch]:
        """Drain the pending changes as events, rooms in the order they first changed."""
        batches = []
        for (room, membership), changes in self._pending.items():
            lists: dict[str, list[str]] = {"joined": [], "left": [], "online": [], "offline": []}
            for nick, change in changes.items():
                lists[_LISTS[change]].append(nick)
            event: dict[str, object] = {"type": "presence", "room": room, **lists}
            batches.append(PresenceBatch(room, membership, event))
        self._pending = {}
        return batches


# --------------------------------------------------------------------------- connection


class ChatConnection:
    """Per-client protocol state: validation, authentication gate, flood control.

    Args:
        limits: sizes and flood-control settings.
    """

    def __init__(self, limits: ChatLimits) -> None:
        self.limits = limits
        self.state = State.UNAUTHENTICATED
        self.nick: str | None = None
        self.bucket = TokenBucket(limits.flood_rate, limits.flood_burst)
        self.dropped = 0  # messages dropped in the current flood episode
        self.close_code: int | None = None
        self.close_reason = ""
        self._events: list[Command] = []
        self._outgoing: list[str] = []

    # ------------------------------------------------------------------ input

    def receive_message(self, data: str | bytes, now: float) -> None:
        """Take one client message received at ``now`` (seconds, any monotonic clock).

        Raises:
            LimitExceeded: the message is over ``max_message_bytes``; the session is
                closed (close code 1009). An ``error`` event is queued first.
            LocalProtocolError: the connection is already closed.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("receive_message called on a closed chat connection")
        size = len(data) if isinstance(data, bytes) else _utf8_size(data)
        if size > self.limits.max_message_bytes:
            self.send(
                error_event(
                    Code.TOO_LARGE,
                    f"message of {size} bytes exceeds {self.limits.max_message_bytes}",
                )
            )
            self.close(CLOSE_TOO_BIG, "message too big")
            raise LimitExceeded("max_message_bytes", self.limits.max_message_bytes, actual=size)
        if not self._admit(now):
            return
        obj: dict[str, object] = {}
        try:
            obj = parse(data)
            command = validate(obj, self.limits)
            self._check_state(command)
        except CommandError as exc:
            self.send(
                error_event(
                    exc.code,
                    exc.message,
                    request=request_id(obj),
                    command=_command_name(obj),
                )
            )
            return
        self._events.append(command)

    def _admit(self, now: float) -> bool:
        if self.bucket.take(now):
            self.dropped = 0
            return True
        self.dropped += 1
        if self.dropped == 1:
            self.send(
                error_event(
                    Code.SLOW_DOWN,
                    "too many messages: this one was dropped; slow down or be disconnected",
                    retry_after=round(self.bucket.retry_after(), 3),
                )
            )
        elif self.dropped > self.limits.flood_tolerance + 1:  # the warning was drop 1
            self.send(error_event(Code.FLOOD, "flooding: disconnected"))
            self.close(CLOSE_POLICY, "flooding")
        return False

    def _check_state(self, command: Command) -> None:
        pre_auth = COMMANDS[command.type].pre_auth
        if self.state is State.UNAUTHENTICATED and not pre_auth:
            raise CommandError(Code.NOT_AUTHENTICATED, "log in first (register, login or resume)")
        if self.state is State.AUTHENTICATED and pre_auth and command.type != "ping":
            raise CommandError(Code.ALREADY_AUTHENTICATED, f"already logged in as {self.nick}")

    def events_received(self) -> list[Command]:
        """Drain and return the valid commands received so far."""
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ state

    def authenticate(self, nick: str) -> None:
        """The server accepted a register/login/resume for ``nick``.

        Raises:
            LocalProtocolError: not in ``UNAUTHENTICATED``.
        """
        if self.state is not State.UNAUTHENTICATED:
            raise LocalProtocolError(f"authenticate in state {self.state.value}")
        self.state = State.AUTHENTICATED
        self.nick = nick

    def deauthenticate(self) -> None:
        """Logged out: back to ``UNAUTHENTICATED``.

        Raises:
            LocalProtocolError: not in ``AUTHENTICATED``.
        """
        if self.state is not State.AUTHENTICATED:
            raise LocalProtocolError(f"deauthenticate in state {self.state.value}")
        self.state = State.UNAUTHENTICATED
        self.nick = None

    def close(self, code: int = 1000, reason: str = "") -> None:
        """End the session; the transport closes with ``close_code`` after flushing."""
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.close_code = code
            self.close_reason = reason

    # ------------------------------------------------------------------ output

    def send(self, event: Mapping[str, object]) -> None:
        """Queue one event; fetch its JSON text with :meth:`messages_to_send`."""
        self._outgoing.append(encode(event))

    def messages_to_send(self) -> list[str]:
        """Drain and return the encoded events queued so far."""
        out, self._outgoing = self._outgoing, []
        return out


def _utf8_size(text: str) -> int:
    # ASCII text (the common case) is one byte per character: skip the encode.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _command_name(obj: Mapping[str, object]) -> str | None:
    kind = obj.get("type")
    return kind if isinstance(kind, str) and kind in COMMANDS else None


__all__ = [
    "CLOSE_POLICY",
    "CLOSE_TOO_BIG",
    "COMMANDS",
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "MAX_WHO",
    "PROTOCOL_VERSION",
    "ChatConnection",
    "Code",
    "Command",
    "CommandError",
    "PresenceBatch",
    "PresenceBatcher",
    "PresenceChange",
    "State",
    "TokenBucket",
    "ack_event",
    "check_nick",
    "check_room",
    "encode",
    "error_event",
    "hello_event",
    "parse",
    "validate",
]
