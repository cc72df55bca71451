from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netstack.config import ChatLimits
from netstack.errors import LimitExceeded, LocalProtocolError
from netstack.proto.chat import (
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    COMMANDS,
    MAX_DEPTH,
    ChatConnection,
    Code,
    Command,
    CommandError,
    PresenceBatcher,
    PresenceChange,
    State,
    TokenBucket,
    ack_event,
    check_nick,
    check_room,
    encode,
    error_event,
    hello_event,
    parse,
    validate,
)

LIMITS = ChatLimits(max_text_chars=20, max_file_bytes=12, max_message_bytes=2048)
HASH = "ab" * 32


def authed(limits: ChatLimits = LIMITS) -> ChatConnection:
    conn = ChatConnection(limits)
    conn.authenticate("alice")
    return conn


def errors(conn: ChatConnection) -> list[dict[str, object]]:
    return [json.loads(m) for m in conn.messages_to_send()]


def send(conn: ChatConnection, obj: object, now: float = 0.0) -> list[Command]:
    conn.receive_message(json.dumps(obj), now)
    return conn.events_received()


def refused(obj: dict[str, object]) -> str:
    with pytest.raises(CommandError) as info:
        validate(obj, LIMITS)
    return str(info.value.code)


# ---------------------------------------------------------------- grammar: valid commands

VALID = [
    {"type": "register", "nick": "alice", "password": "correct horse"},
    {"type": "login", "nick": "Bob_2", "password": "12345678"},
    {"type": "resume", "token": "A" * 43},
    {"type": "ping", "id": 7},
    {"type": "logout", "id": "x1"},
    {"type": "create", "room": "general", "visibility": "invite", "topic": "all hands"},
    {"type": "join", "room": "a"},
    {"type": "leave", "room": "dev-ops_2"},
    {"type": "rooms"},
    {"type": "who", "room": "general"},
    {"type": "who", "room": "general", "limit": 1000},
    {"type": "invite", "room": "general", "nick": "bob"},
    {"type": "topic", "room": "general", "topic": ""},
    {"type": "say", "room": "general", "text": "hello\n\tworld"},
    {"type": "say", "room": "general", "text": "", "file": HASH},
    {"type": "dm", "to": "bob", "text": "hi"},
    {"type": "history", "room": "general", "before": 10, "limit": 200},
    {"type": "history", "with": "bob"},
    {"type": "backfill", "since": 0, "limit": 1},
    {"type": "upload", "name": "a.txt", "data": base64.b64encode(b"x" * 12).decode()},
    {"type": "upload", "name": "a.png", "data": "eA==", "mime": "image/png"},
    {"type": "kick", "room": "general", "nick": "bob", "reason": "spam"},
    {"type": "ban", "room": "general", "nick": "bob"},
    {"type": "unban", "room": "general", "nick": "bob"},
    {"type": "mute", "room": "general", "nick": "bob", "seconds": 60, "reason": "x"},
    {"type": "unmute", "room": "general", "nick": "bob"},
    {"type": "set_role", "room": "general", "nick": "bob", "role": "moderator"},
]


@pytest.mark.parametrize("obj", VALID, ids=lambda o: str(o["type"]))
def test_valid_commands(obj: dict[str, object]) -> None:
    command = validate(obj, LIMITS)
    assert command.type == obj["type"]
    assert command.id == obj.get("id")
    fields = {k for k in obj if k not in ("type", "id")}
    assert set(command.args) == fields


def test_every_command_has_a_valid_example() -> None:
    assert {o["type"] for o in VALID} == set(COMMANDS)


def test_command_accessors() -> None:
    cmd = validate({"type": "history", "room": "general", "limit": 5}, LIMITS)
    assert cmd.text("room") == "general"
    assert cmd.opt_text("with") is None
    assert cmd.opt_text("room") == "general"
    assert cmd.number("limit") == 5
    assert cmd.number("before") is None
    up = validate({"type": "upload", "name": "f", "data": "aGk="}, LIMITS)
    assert up.blob("data") == b"hi"


# ---------------------------------------------------------------- grammar: refusals

INVALID = [
    ({"nick": "a"}, Code.MISSING_FIELD),
    ({"type": 5}, Code.MISSING_FIELD),
    ({"type": "shout"}, Code.UNKNOWN_COMMAND),
    ({"type": "ping", "extra": 1}, Code.UNKNOWN_FIELD),
    ({"type": "ping", "id": True}, Code.BAD_REQUEST_ID),
    ({"type": "ping", "id": -1}, Code.BAD_REQUEST_ID),
    ({"type": "ping", "id": 2**53}, Code.BAD_REQUEST_ID),
    ({"type": "ping", "id": "x" * 65}, Code.BAD_REQUEST_ID),
    ({"type": "ping", "id": 1.5}, Code.BAD_REQUEST_ID),
    ({"type": "login", "nick": "alice"}, Code.MISSING_FIELD),
    ({"type": "login", "nick": 5, "password": "12345678"}, Code.BAD_TYPE),
    ({"type": "login", "nick": "a", "password": "12345678"}, Code.BAD_NICK),
    ({"type": "login", "nick": "1abc", "password": "12345678"}, Code.BAD_NICK),
    ({"type": "login", "nick": "a" * 25, "password": "12345678"}, Code.BAD_NICK),
    ({"type": "login", "nick": "al ice", "password": "12345678"}, Code.BAD_NICK),
    ({"type": "register", "nick": "Admin", "password": "12345678"}, Code.BAD_NICK),
    ({"type": "login", "nick": "alice", "password": "short"}, Code.BAD_PASSWORD),
    ({"type": "login", "nick": "alice", "password": "x" * 257}, Code.BAD_PASSWORD),
    ({"type": "resume", "token": "short"}, Code.BAD_VALUE),
    ({"type": "join", "room": "General"}, Code.BAD_ROOM),
    ({"type": "join", "room": "#general"}, Code.BAD_ROOM),
    ({"type": "join", "room": "-x"}, Code.BAD_ROOM),
    ({"type": "join", "room": "a" * 33}, Code.BAD_ROOM),
    ({"type": "join", "room": ["a"]}, Code.BAD_TYPE),
    ({"type": "create", "room": "a", "visibility": "secret"}, Code.BAD_VALUE),
    ({"type": "create", "room": "a", "topic": "x" * 201}, Code.BAD_VALUE),
    ({"type": "create", "room": "a", "topic": "two\nlines"}, Code.BAD_VALUE),
    ({"type": "say", "room": "a", "text": "x" * 21}, Code.BAD_TEXT),
    ({"type": "say", "room": "a", "text": "bell\x07"}, Code.BAD_TEXT),
    ({"type": "say", "room": "a", "text": "esc\x1b[2J"}, Code.BAD_TEXT),
    ({"type": "say", "room": "a", "text": "  \n "}, Code.BAD_TEXT),
    ({"type": "dm", "to": "bob", "text": ""}, Code.BAD_TEXT),
    ({"type": "say", "room": "a", "text": "x", "file": "AB" * 32}, Code.BAD_VALUE),
    ({"type": "history"}, Code.CONFLICTING_FIELDS),
    ({"type": "history", "room": "a", "with": "bob"}, Code.CONFLICTING_FIELDS),
    ({"type": "history", "room": "a", "limit": 0}, Code.BAD_VALUE),
    ({"type": "history", "room": "a", "limit": 201}, Code.BAD_VALUE),
    ({"type": "who", "room": "a", "limit": 1001}, Code.BAD_VALUE),
    ({"type": "history", "room": "a", "before": "9"}, Code.BAD_TYPE),
    ({"type": "backfill", "since": False}, Code.BAD_TYPE),
    ({"type": "backfill", "since": -1}, Code.BAD_VALUE),
    ({"type": "mute", "room": "a", "nick": "bob", "seconds": 0}, Code.BAD_VALUE),
    ({"type": "set_role", "room": "a", "nick": "bob", "role": "owner"}, Code.BAD_VALUE),
    ({"type": "upload", "name": "a/b", "data": "eA=="}, Code.BAD_VALUE),
    ({"type": "upload", "name": "..", "data": "eA=="}, Code.BAD_VALUE),
    ({"type": "upload", "name": " ", "data": "eA=="}, Code.BAD_VALUE),
    ({"type": "upload", "name": "x" * 201, "data": "eA=="}, Code.BAD_VALUE),
    ({"type": "upload", "name": "a\\b", "data": "eA=="}, Code.BAD_VALUE),
    ({"type": "upload", "name": "a", "data": "not base64!"}, Code.BAD_VALUE),
    ({"type": "upload", "name": "a", "data": ""}, Code.BAD_VALUE),
    ({"type": "upload", "name": "a", "data": "eA==", "mime": "Image/PNG"}, Code.BAD_VALUE),
    ({"type": "upload", "name": "a", "data": "A" * 20}, Code.FILE_TOO_LARGE),
    ({"type": "upload", "name": "a", "data": "A" * 16 + "AAA="}, Code.FILE_TOO_LARGE),
]


@pytest.mark.parametrize(("obj", "code"), INVALID, ids=lambda v: str(v)[:50])
def test_invalid_commands_get_specific_codes(obj: dict[str, object], code: Code) -> None:
    assert refused(obj) == code


def test_file_size_checked_after_decoding() -> None:
    # 16 base64 characters may decode to 12 bytes (allowed) or, with padding, fewer.
    assert validate({"type": "upload", "name": "a", "data": "AAAAAAAAAAAAAAAA"}, LIMITS)
    # A limit not a multiple of 3: 16 characters pass the length check, 12 bytes do not.
    small = ChatLimits(max_file_bytes=10, max_message_bytes=2048)
    with pytest.raises(CommandError) as info:
        validate({"type": "upload", "name": "a", "data": "A" * 16}, small)
    assert info.value.code == Code.FILE_TOO_LARGE


def test_name_checkers() -> None:
    assert check_nick("Zed-9") == "Zed-9"
    assert check_room("r") == "r"
    with pytest.raises(CommandError):
        check_room("")


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{", Code.BAD_JSON),
        (b"\xff\xfe", Code.BAD_JSON),
        ('{"type":"ping","type":"ping"}', Code.BAD_JSON),
        ('{"type":"ping","x":NaN}', Code.BAD_JSON),
        ('{"type":"ping","x":Infinity}', Code.BAD_JSON),
        ("[" * 100_000 + "]" * 100_000, Code.BAD_JSON),
        ('{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1), Code.BAD_JSON),
        ('{"a":' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}", Code.BAD_JSON),
        ("9" * 5000, Code.BAD_JSON),
        ("[]", Code.NOT_OBJECT),
        ('"ping"', Code.NOT_OBJECT),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_parse_refusals(text: str | bytes, code: Code) -> None:
    with pytest.raises(CommandError) as info:
        parse(text)
    assert info.value.code == code


def test_parse_accepts_bytes_and_shallow_nesting() -> None:
    assert parse(b'{"type":"ping"}') == {"type": "ping"}
    nested = '{"a":' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}"
    assert parse(nested)["a"] == parse(nested)["a"]


# ---------------------------------------------------------------- events


def test_events_encode_compactly_without_newlines() -> None:
    text = encode({"type": "message", "text": "a\nb", "who": "é"})
    assert "\n" not in text
    assert text == '{"type":"message","text":"a\\nb","who":"é"}'


def test_ack_and_error_events() -> None:
    cmd = Command("say", 4, {})
    assert ack_event(cmd, message={"id": 1}) == {
        "type": "ack",
        "re": "say",
        "id": 4,
        "message": {"id": 1},
    }
    assert ack_event("ping") == {"type": "ack", "re": "ping"}
    assert ack_event("ping", "r1") == {"type": "ack", "re": "ping", "id": "r1"}
    assert error_event(Code.MUTED, "no", request=3, command="say", until=5) == {
        "type": "error",
        "code": "muted",
        "message": "no",
        "id": 3,
        "re": "say",
        "until": 5,
    }
    assert error_event(Code.FLOOD, "bye") == {"type": "error", "code": "flood", "message": "bye"}


def test_hello_event_carries_limits() -> None:
    hello = hello_event(LIMITS)
    assert hello["type"] == "hello"
    assert hello["protocol"] == 1
    assert hello["limits"]["max_text_chars"] == 20  # type: ignore[index]  # a dict


# ---------------------------------------------------------------- connection state


def test_unauthenticated_may_only_log_in() -> None:
    conn = ChatConnection(LIMITS)
    assert send(conn, {"type": "say", "id": 1, "room": "a", "text": "hi"}) == []
    [err] = errors(conn)
    assert err["code"] == "not_authenticated"
    assert err["id"] == 1
    assert err["re"] == "say"
    assert conn.state is State.UNAUTHENTICATED
    [cmd] = send(conn, {"type": "login", "nick": "alice", "password": "12345678"})
    assert cmd.type == "login"
    assert [c.type for c in send(conn, {"type": "ping"})] == ["ping"]


def test_authenticated_cannot_log_in_again_but_can_ping() -> None:
    conn = authed()
    assert conn.nick == "alice"
    assert send(conn, {"type": "register", "nick": "bob", "password": "12345678"}) == []
    assert errors(conn)[0]["code"] == "already_authenticated"
    assert [c.type for c in send(conn, {"type": "ping"})] == ["ping"]
    assert [c.type for c in send(conn, {"type": "say", "room": "a", "text": "x"})] == ["say"]


def test_logout_returns_to_unauthenticated() -> None:
    conn = authed()
    conn.deauthenticate()
    assert conn.state is State.UNAUTHENTICATED
    assert conn.nick is None
    with pytest.raises(LocalProtocolError):
        conn.deauthenticate()
    conn.authenticate("bob")
    with pytest.raises(LocalProtocolError):
        conn.authenticate("bob")


def test_bad_messages_keep_the_connection_open() -> None:
    conn = authed()
    conn.receive_message("not json", 0.0)
    conn.receive_message('{"type":"frobnicate","id":"q"}', 0.0)
    conn.receive_message('{"type":"say","id":2,"room":"NO","text":"x"}', 0.0)
    codes = [(e["code"], e.get("id"), e.get("re")) for e in errors(conn)]
    assert codes == [
        ("bad_json", None, None),
        ("unknown_command", "q", None),
        ("bad_room", 2, "say"),
    ]
    assert conn.state is State.AUTHENTICATED
    assert [c.type for c in send(conn, {"type": "ping"})] == ["ping"]


def test_oversize_message_closes_with_1009() -> None:
    conn = authed()
    big = json.dumps({"type": "say", "room": "a", "text": "x" * 3000})
    with pytest.raises(LimitExceeded) as info:
        conn.receive_message(big, 0.0)
    assert info.value.limit == "max_message_bytes"
    assert info.value.actual == len(big)
    assert conn.state is State.CLOSED
    assert conn.close_code == CLOSE_TOO_BIG
    assert errors(conn)[0]["code"] == "too_large"
    with pytest.raises(LocalProtocolError):
        conn.receive_message("{}", 0.0)


def test_size_counts_utf8_bytes_not_characters() -> None:
    conn = authed(ChatLimits(max_message_bytes=1100, max_file_bytes=12))
    text = '{"type":"ping","id":"' + "é" * 30 + '"}'  # 30 chars, 60 bytes
    conn.receive_message(text, 0.0)
    assert conn.events_received()
    with pytest.raises(LimitExceeded):
        conn.receive_message("é" * 600, 0.0)  # 600 characters, 1200 bytes
    with pytest.raises(LimitExceeded):
        authed(ChatLimits(max_message_bytes=1100, max_file_bytes=12)).receive_message(
            b"x" * 1101, 0.0
        )


def test_close_is_idempotent() -> None:
    conn = authed()
    conn.close(1001, "going away")
    conn.close(1000, "again")
    assert (conn.close_code, conn.close_reason) == (1001, "going away")


# ---------------------------------------------------------------- flood control


def test_token_bucket_refills_at_rate_up_to_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after() == pytest.approx(0.5)
    assert not bucket.take(0.25)
    assert bucket.take(0.5)
    assert bucket.take(100.0)
    assert bucket.tokens == pytest.approx(2.0)  # capped at burst, minus one
    assert bucket.take(99.0)  # a clock going backwards adds nothing
    assert bucket.tokens == pytest.approx(1.0)
    assert bucket.retry_after() == 0.0
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0, 1)


def test_flood_warns_then_disconnects() -> None:
    limits = ChatLimits(flood_rate=1.0, flood_burst=3, flood_tolerance=2)
    conn = authed(limits)
    for _ in range(3):
        assert send(conn, {"type": "ping"}, now=10.0)
    assert errors(conn) == []
    assert send(conn, {"type": "ping"}, now=10.0) == []  # dropped: warning
    [warn] = errors(conn)
    assert warn["code"] == "slow_down"
    assert warn["retry_after"] == pytest.approx(1.0)
    assert send(conn, {"type": "ping"}, now=10.0) == []  # dropped silently (1 of 2)
    assert send(conn, {"type": "ping"}, now=10.0) == []  # 2 of 2
    assert errors(conn) == []
    assert conn.state is State.AUTHENTICATED
    assert send(conn, {"type": "ping"}, now=10.0) == []  # past the tolerance
    [bye] = errors(conn)
    assert bye["code"] == "flood"
    assert conn.state is State.CLOSED
    assert conn.close_code == CLOSE_POLICY


def test_flood_episode_ends_when_client_slows_down() -> None:
    limits = ChatLimits(flood_rate=1.0, flood_burst=1, flood_tolerance=1)
    conn = authed(limits)
    assert send(conn, {"type": "ping"}, now=0.0)
    assert not send(conn, {"type": "ping"}, now=0.0)  # warning
    assert send(conn, {"type": "ping"}, now=1.0)  # refilled: episode over
    assert not send(conn, {"type": "ping"}, now=1.0)  # a new warning, not a disconnect
    assert [e["code"] for e in errors(conn)] == ["slow_down", "slow_down"]
    assert conn.state is State.AUTHENTICATED


def test_malformed_messages_count_towards_flood() -> None:
    limits = ChatLimits(flood_rate=1.0, flood_burst=2, flood_tolerance=0)
    conn = authed(limits)
    conn.receive_message("junk", 0.0)
    conn.receive_message("junk", 0.0)
    conn.receive_message("junk", 0.0)
    assert [e["code"] for e in errors(conn)] == ["bad_json", "bad_json", "slow_down"]
    conn.receive_message("junk", 0.0)
    assert [e["code"] for e in errors(conn)] == ["flood"]
    assert conn.state is State.CLOSED


# ---------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
messages = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64),
    st.builds(
        lambda kind, extra: json.dumps({"type": kind, **extra}),
        st.sampled_from([*COMMANDS, "bogus"]),
        st.dictionaries(
            st.sampled_from(["room", "nick", "text", "id", "to", "since", "password", "x"]),
            json_values,
            max_size=4,
        ),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(messages, st.floats(0, 10)), max_size=30), st.booleans())
def test_any_input_yields_commands_errors_or_a_clean_close(
    inputs: list[tuple[str | bytes, float]], logged_in: bool
) -> None:
    conn = ChatConnection(ChatLimits(max_message_bytes=2048, max_file_bytes=64))
    if logged_in:
        conn.authenticate("alice")
    for data, now in inputs:
        if conn.state is State.CLOSED:
            with pytest.raises(LocalProtocolError):
                conn.receive_message(data, now)
            break
        conn.receive_message(data, now)
        for cmd in conn.events_received():
            assert cmd.type in COMMANDS
            assert logged_in or COMMANDS[cmd.type].pre_auth
        for out in conn.messages_to_send():
            event = json.loads(out)
            assert event["type"] == "error"
            assert event["code"] in {str(c) for c in Code}


# ---------------------------------------------------------------- presence batching


def test_presence_batches_per_room_and_audience() -> None:
    batcher = PresenceBatcher()
    assert not batcher
    assert batcher.flush() == []
    batcher.add("general", "bob", "online")
    batcher.add("general", "carol", "join")
    batcher.add("general", "dave", "online")
    batcher.add("random", "bob", "offline")
    batcher.add("general", "erin", "leave")
    assert batcher
    batches = batcher.flush()
    assert not batcher
    assert [(b.room, b.membership, b.event) for b in batches] == [
        (
            "general",
            False,
            {
                "type": "presence",
                "room": "general",
                "joined": [],
                "left": [],
                "online": ["bob", "dave"],
                "offline": [],
            },
        ),
        (
            "general",
            True,
            {
                "type": "presence",
                "room": "general",
                "joined": ["carol"],
                "left": ["erin"],
                "online": [],
                "offline": [],
            },
        ),
        (
            "random",
            False,
            {
                "type": "presence",
                "room": "random",
                "joined": [],
                "left": [],
                "online": [],
                "offline": ["bob"],
            },
        ),
    ]
    assert batcher.flush() == []  # drained


def test_presence_change_and_its_reversal_cancel_out() -> None:
    batcher = PresenceBatcher()
    batcher.add("general", "bob", "online")
    batcher.add("general", "bob", "offline")  # reconnect blip within one interval
    assert not batcher
    batcher.add("general", "bob", "join")
    batcher.add("general", "carol", "join")
    batcher.add("general", "bob", "leave")
    batcher.add("general", "carol", "join")  # repeated (another instance): one entry
    (batch,) = batcher.flush()
    assert batch.event["joined"] == ["carol"]
    assert batch.event["left"] == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.sampled_from(["x", "y", "z"]),
            st.sampled_from(["join", "leave", "online", "offline"]),
        ),
        max_size=40,
    )
)
def test_presence_batch_ends_in_the_net_state(
    changes: list[tuple[str, str, PresenceChange]],
) -> None:
    # Alternating changes (as the server makes them) leave exactly the net difference.
    batcher = PresenceBatcher()
    state: dict[tuple[str, str, bool], str] = {}
    start: dict[tuple[str, str, bool], str] = {}
    for room, nick, change in changes:
        key = (room, nick, change in ("join", "leave"))
        if state.get(key) == change:
            continue  # the server never repeats a change from one instance
        opposite = {"join": "leave", "leave": "join", "online": "offline", "offline": "online"}
        start.setdefault(key, opposite[change])
        state[key] = change
        batcher.add(room, nick, change)
    seen = {}
    for batch in batcher.flush():
        for name, change in (
            ("joined", "join"),
            ("left", "leave"),
            ("online", "online"),
            ("offline", "offline"),
        ):
            nicks = batch.event[name]
            assert isinstance(nicks, list)
            for nick in nicks:
                seen[(batch.room, nick, batch.membership)] = change
            if nicks:
                assert batch.membership == (change in ("join", "leave"))
    expected = {k: v for k, v in state.items() if v != start[k]}
    assert seen == expected
