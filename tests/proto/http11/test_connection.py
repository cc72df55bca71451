"""The server role's response side: framing, misuse, keep-alive, the header cache."""

from __future__ import annotations

import pytest

from netstack.config import HTTPLimits
from netstack.errors import LocalProtocolError, RemoteProtocolError
from netstack.proto.http11 import (
    ConnectionClosed,
    Data,
    EndOfMessage,
    Framing,
    HTTPConnection,
    InformationalResponse,
    Request,
    Response,
    State,
    connection,
)
from tests.proto.http11.corpus import PARSERS

H = b"Host: example.com\r\n"
GET11 = b"GET / HTTP/1.1\r\n" + H + b"\r\n"
GET10 = b"GET / HTTP/1.0\r\n\r\n"
GET10_KA = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
HEAD11 = b"HEAD / HTTP/1.1\r\n" + H + b"\r\n"
UPGRADE = b"GET / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n"


@pytest.fixture(params=PARSERS)
def parser(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def server(parser: str, data: bytes = GET11) -> HTTPConnection:
    conn = HTTPConnection(HTTPLimits(), parser)
    conn.receive_data(data)
    events = conn.events_received()
    assert isinstance(events[0], Request)
    return conn


def sent(conn: HTTPConnection) -> bytes:
    return b"".join(conn.data_to_send())


# ------------------------------------------------------------------ framing

CL = [(b"content-length", b"5")]


@pytest.mark.parametrize(
    ("request_bytes", "status", "headers", "expected", "framing", "state"),
    [
        (
            GET11,
            200,
            CL,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            Framing.LENGTH,
            State.IDLE,
        ),
        (
            GET11,
            200,
            [],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Framing.CHUNKED,
            State.IDLE,
        ),
        (
            GET10,
            200,
            [],
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nhello",
            Framing.CLOSE,
            State.MUST_CLOSE,
        ),
        (
            GET10_KA,
            200,
            CL,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: keep-alive\r\n\r\nhello",
            Framing.LENGTH,
            State.IDLE,
        ),
        (
            GET10_KA,
            200,
            [],
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nhello",
            Framing.CLOSE,
            State.MUST_CLOSE,
        ),
        (
            HEAD11,
            200,
            CL,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            Framing.NONE,
            State.IDLE,
        ),
        (HEAD11, 200, [], b"HTTP/1.1 200 OK\r\n\r\n", Framing.NONE, State.IDLE),
        (GET11, 204, [], b"HTTP/1.1 204 No Content\r\n\r\n", Framing.NONE, State.IDLE),
        (
            GET11,
            304,
            CL,
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
            Framing.NONE,
            State.IDLE,
        ),
        (
            GET11,
            200,
            [*CL, (b"connection", b"close")],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
            Framing.LENGTH,
            State.MUST_CLOSE,
        ),
        (
            b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
            200,
            [*CL, (b"connection", b"keep-alive")],
            # The app said keep-alive, the client said close: close wins, and says so.
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: keep-alive\r\n"
            b"connection: close\r\n\r\nhello",
            Framing.LENGTH,
            State.MUST_CLOSE,
        ),
    ],
    ids=[
        "length",
        "chunked-1.1",
        "close-delimited-1.0",
        "1.0-keep-alive-length",
        "1.0-keep-alive-no-length-closes",
        "head-with-length",
        "head-without-length",
        "204",
        "304",
        "app-connection-close",
        "client-close-beats-app-keep-alive",
    ],
)
def test_framing(
    parser: str,
    request_bytes: bytes,
    status: int,
    headers: list[tuple[bytes, bytes]],
    expected: bytes,
    framing: Framing,
    state: State,
) -> None:
    # The fast path (send_response) and the streaming one (events) give the same bytes.
    fast = server(parser, request_bytes)
    fast.send_response(status, headers, b"hello")
    assert sent(fast) == expected
    assert fast.our_state is state
    assert fast.keep_alive is (state is State.IDLE)

    slow = server(parser, request_bytes)
    slow.send(Response(status, headers))
    assert slow._framing is framing
    slow.send(Data(b""))
    slow.send(Data(b"hello"))
    slow.send(EndOfMessage())
    assert sent(slow) == expected
    assert slow.our_state is state


def test_chunked_trailers_and_send_head(parser: str) -> None:
    conn = server(parser)
    conn.send_head(200, [(b"x", b"1")], trusted=b"server: t\r\n", reason=b"Fine")
    conn.send(Data(b"abc"))
    conn.send(EndOfMessage([(b"checksum", b"9")]))
    assert sent(conn) == (
        b"HTTP/1.1 200 Fine\r\nx: 1\r\nserver: t\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nchecksum: 9\r\n\r\n"
    )
    assert conn.data_to_send() == []


def test_send_response_trusted_lines_and_empty_chunked_body(parser: str) -> None:
    conn = server(parser)
    conn.send_response(200, [], b"", trusted=b"date: d\r\n")
    assert sent(conn) == (
        b"HTTP/1.1 200 OK\r\ndate: d\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    )


def test_respond_returns_the_bytes_with_what_was_queued_before(parser: str) -> None:
    conn = server(parser, b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\n\r\n")
    conn.send(InformationalResponse(100))
    out = conn.respond(200, CL, b"hello", trusted=b"date: d\r\n")
    assert out == (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: d\r\n\r\nhello"
    )
    assert conn.data_to_send() == []  # drained: nothing is sent twice
    assert conn.our_state is State.IDLE
    # Nothing queued: just this response (HEAD: the head only).
    conn.receive_data(HEAD11)
    conn.events_received()
    assert conn.respond(200, CL, b"hello") == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


def test_pipelined_responses_answer_requests_in_order(parser: str) -> None:
    conn = HTTPConnection(HTTPLimits(), parser)
    conn.receive_data(b"GET /1 HTTP/1.1\r\n" + H + b"\r\nGET /2 HTTP/1.1\r\n" + H + b"\r\n")
    assert len(conn.events_received()) == 4
    assert conn.pending_requests == 2
    assert conn.current_request is not None
    assert conn.current_request.target == b"/1"
    conn.send_response(200, CL, b"first")
    assert conn.current_request is not None
    assert conn.current_request.target == b"/2"
    conn.send_response(200, CL, b"later")
    assert conn.pending_requests == 0
    assert conn.current_request is None
    assert sent(conn).count(b"HTTP/1.1 200 OK") == 2


# ------------------------------------------------------------------ 1xx and switching


def test_100_continue(parser: str) -> None:
    conn = server(
        parser, b"PUT / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 1\r\n\r\n"
    )
    conn.send(InformationalResponse(100))
    assert sent(conn) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert conn.our_state is State.IDLE
    conn.receive_data(b"x")
    assert [type(e) for e in conn.events_received()] == [Data, EndOfMessage]


def test_1xx_to_http10_is_dropped(parser: str) -> None:
    conn = server(parser, GET10)
    conn.send(InformationalResponse(100))
    conn.send(InformationalResponse(103, [(b"link", b"</a>")]))
    assert conn.data_to_send() == []
    assert conn.our_state is State.IDLE


def test_101_switches_and_later_bytes_stay_raw(parser: str) -> None:
    conn = server(parser, UPGRADE + b"early")
    conn.send(InformationalResponse(101, [(b"upgrade", b"websocket")]))
    assert sent(conn) == b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"
    assert conn.our_state is State.SWITCHED_PROTOCOL
    assert not conn.keep_alive
    assert conn.switched_protocol_data() == b"early"
    conn.receive_data(b"GET / HTTP/1.1\r\n\r\n")  # not parsed: it is the new protocol's
    assert conn.events_received() == []
    assert conn.switched_protocol_data() == b"GET / HTTP/1.1\r\n\r\n"
    assert conn.switched_protocol_data() == b""
    conn.receive_eof()
    assert conn.events_received() == [ConnectionClosed()]


def test_declined_upgrade_resumes_parsing(parser: str) -> None:
    conn = server(parser, UPGRADE + b"GET /next HTTP/1.1\r\n" + H + b"\r\n")
    assert conn.events_received() == []  # held until the upgrade is decided
    conn.send_response(426, [(b"content-length", b"0")])
    events = conn.events_received()
    assert isinstance(events[0], Request)
    assert events[0].target == b"/next"


# ------------------------------------------------------------------ misuse


def misuse_cases() -> list[tuple[str, bytes, list[object]]]:
    resp = Response(200, CL)
    return [
        ("data-before-response", GET11, [Data(b"x")]),
        ("end-before-response", GET11, [EndOfMessage()]),
        ("response-twice", GET11, [resp, Response(200, CL)]),
        ("body-longer-than-length", GET11, [resp, Data(b"hello!")]),
        ("body-longer-in-two-pieces", GET11, [resp, Data(b"hel"), Data(b"lo!")]),
        ("body-shorter-than-length", GET11, [resp, Data(b"hell"), EndOfMessage()]),
        (
            "transfer-encoding-from-app",
            GET11,
            [Response(200, [(b"transfer-encoding", b"chunked")])],
        ),
        ("two-content-lengths", GET11, [Response(200, [*CL, *CL])]),
        ("content-length-not-digits", GET11, [Response(200, [(b"content-length", b"-1")])]),
        ("header-name-with-space", GET11, [Response(200, [(b"x y", b"1")])]),
        ("header-name-with-colon", GET11, [Response(200, [(b"x:", b"1")])]),
        ("empty-header-name", GET11, [Response(200, [(b"", b"1")])]),
        ("crlf-in-value", GET11, [Response(200, [(b"x", b"1\r\nset-cookie: a=b")])]),
        ("lf-in-value", GET11, [Response(200, [(b"x", b"1\nx: 2")])]),
        ("cr-in-value", GET11, [Response(200, [(b"x", b"1\r")])]),
        ("nul-in-value", GET11, [Response(200, [(b"x", b"1\x00")])]),
        ("crlf-in-name", GET11, [Response(200, [(b"x\r\ny", b"1")])]),
        ("crlf-in-reason", GET11, [Response(200, CL, reason=b"OK\r\nx: y")]),
        ("status-99", GET11, [Response(99, CL)]),
        ("status-1000", GET11, [Response(1000, CL)]),
        ("1xx-as-response", GET11, [Response(100, [])]),
        ("200-as-informational", GET11, [InformationalResponse(200)]),
        ("1xx-after-response", GET11, [resp, InformationalResponse(100)]),
        ("101-to-a-plain-request", GET11, [InformationalResponse(101)]),
        (
            "101-to-http10-upgrade",
            b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            [InformationalResponse(101)],
        ),
        ("crlf-in-1xx-header", UPGRADE, [InformationalResponse(101, [(b"u", b"a\r\nb")])]),
        ("server-sends-request", GET11, [Request(b"GET", b"/", [])]),
        ("server-sends-connection-closed", GET11, [ConnectionClosed()]),
        ("response-without-request", b"", [Response(200, CL)]),
        ("informational-without-request", b"", [InformationalResponse(100)]),
    ]


@pytest.mark.parametrize(
    ("request_bytes", "events"),
    [(r, e) for _, r, e in misuse_cases()],
    ids=[name for name, _, _ in misuse_cases()],
)
def test_misuse_raises_and_changes_nothing(
    parser: str, request_bytes: bytes, events: list[object]
) -> None:
    conn = HTTPConnection(HTTPLimits(), parser)
    conn.receive_data(request_bytes)
    conn.events_received()
    *ok, bad = events
    for event in ok:
        conn.send(event)  # type: ignore[arg-type]
    conn.data_to_send()
    state, keep_alive, pending = conn.our_state, conn.keep_alive, conn.pending_requests
    with pytest.raises(LocalProtocolError):
        conn.send(bad)  # type: ignore[arg-type]
    assert (conn.our_state, conn.keep_alive, conn.pending_requests) == (
        state,
        keep_alive,
        pending,
    )
    assert conn.data_to_send() == []


def test_send_response_body_length_mismatch_changes_nothing(parser: str) -> None:
    conn = server(parser)
    with pytest.raises(LocalProtocolError, match="Content-Length is 5"):
        conn.send_response(200, CL, b"four")
    assert conn.our_state is State.IDLE
    conn.send_response(500, [(b"content-length", b"0")])  # the caller can still answer
    assert sent(conn).startswith(b"HTTP/1.1 500 Internal Server Error\r\n")


def test_switched_protocol_data_before_a_switch(parser: str) -> None:
    with pytest.raises(LocalProtocolError):
        server(parser).switched_protocol_data()


def test_nothing_can_be_sent_after_close(parser: str) -> None:
    conn = server(parser)
    conn.close()
    with pytest.raises(LocalProtocolError):
        conn.send_response(200, CL, b"hello")
    conn.receive_data(b"GET / HTTP/1.1\r\n")  # ignored
    conn.receive_eof()  # ignored: no event
    assert conn.events_received() == []


# ------------------------------------------------------------------ their side


def test_remote_error_closes(parser: str) -> None:
    conn = HTTPConnection(HTTPLimits(), parser)
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert conn.our_state is State.CLOSED
    assert not conn.keep_alive


def test_eof_mid_request_raises_and_closes(parser: str) -> None:
    conn = HTTPConnection(HTTPLimits(), parser)
    conn.receive_data(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nab")
    with pytest.raises(RemoteProtocolError):
        conn.receive_eof()
    assert conn.our_state is State.CLOSED


def test_eof_is_reported_once(parser: str) -> None:
    conn = server(parser)
    conn.receive_eof()
    conn.receive_eof()
    assert conn.their_eof
    assert conn.events_received() == [ConnectionClosed()]


def test_eof_after_must_close_ignores_a_partial_request(parser: str) -> None:
    # The app closed (Connection: close) while the client had pipelined half a request.
    conn = server(parser, GET11 + b"GET /next HT")
    conn.send_response(200, [*CL, (b"connection", b"close")], b"hello")
    assert conn.our_state is State.MUST_CLOSE
    conn.receive_data(b"TP/1.1\r\n")  # ignored
    conn.receive_eof()
    assert conn.events_received() == [ConnectionClosed()]


# ------------------------------------------------------------------ header cache


def test_a_bad_header_raises_even_after_a_good_one_was_cached(parser: str) -> None:
    good = [(b"x-thing", b"value"), *CL]
    conn = server(parser)
    conn.send_response(200, good, b"hello")
    assert tuple(good) in connection._HEAD_CACHE
    for bad in (b"value\r\nx-injected: 1", b"val\x00ue", b"value\n"):
        conn = server(parser)
        with pytest.raises(LocalProtocolError):
            conn.send_response(200, [(b"x-thing", bad), *CL], b"hello")
        assert tuple([(b"x-thing", bad), *CL]) not in connection._HEAD_CACHE


def test_header_cache_is_bounded(parser: str) -> None:
    for i in range(connection._HEAD_CACHE_SIZE + 50):
        conn = server(parser)
        conn.send_response(200, [(b"etag", b"%d" % i), *CL], b"hello")
        assert len(connection._HEAD_CACHE) <= connection._HEAD_CACHE_SIZE
    # The newest sets are cached (the cache was emptied when full, not frozen).
    key = ((b"etag", b"%d" % (connection._HEAD_CACHE_SIZE + 49)), *CL)
    assert key in connection._HEAD_CACHE


def test_big_header_blocks_are_not_cached(parser: str) -> None:
    headers = [(b"x-big", b"v" * 3000), *CL]
    conn = server(parser)
    conn.send_response(200, headers, b"hello")
    assert tuple(headers) not in connection._HEAD_CACHE
    assert b"x-big: " + b"v" * 3000 in sent(conn)


def test_malformed_bytes_behind_a_declined_upgrade_close_after_the_response(
    parser: str,
) -> None:
    conn = server(parser, UPGRADE + b"\x00garbage")
    conn.send_response(200, CL, b"hello")
    assert sent(conn).endswith(b"hello")
    assert conn.our_state is State.CLOSED


def test_send_body_elsewhere(parser: str) -> None:
    conn = server(parser)
    assert not conn.sending_body
    with pytest.raises(LocalProtocolError):
        conn.send_body_elsewhere(1)  # no response yet
    conn.send(Response(200, CL))
    assert conn.sending_body
    conn.send_body_elsewhere(3)  # written by the caller (sendfile)
    for count in (-1, 3):
        with pytest.raises(LocalProtocolError):
            conn.send_body_elsewhere(count)
    conn.send(Data(b"lo"))
    conn.send(EndOfMessage())
    assert conn.our_state is State.IDLE
    chunked = server(parser)
    chunked.send(Response(200, []))
    with pytest.raises(LocalProtocolError):
        chunked.send_body_elsewhere(1)
    head = server(parser, HEAD11)
    head.send(Response(200, CL))
    assert not head.sending_body
