"""The client role (HTTPClientConnection): a response table through both parsers, fed
whole, byte by byte and in random splits; request writing; misuse; limits."""

from __future__ import annotations

from typing import Any

import pytest

from netstack.config import HTTPLimits
from netstack.errors import LimitExceeded, LocalProtocolError, RemoteProtocolError
from netstack.proto.http11 import (
    ClientState,
    ConnectionClosed,
    Data,
    EndOfMessage,
    HTTPClientConnection,
    InformationalResponse,
    Request,
    Response,
)
from netstack.proto.http11.client import check_response_head, make_response_parser
from tests.helpers import splits
from tests.proto.http11.corpus import PARSERS

HOST = [(b"host", b"backend")]
UPGRADE = [*HOST, (b"connection", b"upgrade"), (b"upgrade", b"websocket")]
LIMITS = HTTPLimits(
    max_header_bytes=256, max_request_line_bytes=64, max_header_count=5, max_body_bytes=32
)
R = Response
Info = InformationalResponse
E = EndOfMessage()


def D(data: bytes) -> Data:
    return Data(data)


def normalise(events: list[Any]) -> list[Any]:
    out: list[Any] = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + event.data)
        else:
            out.append(event)
    return out


# (id, method, request headers, response bytes, eof, expected events, final state, raw)
VALID = [
    (
        "length",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        False,
        [R(200, [(b"content-length", b"5")], b"OK"), D(b"hello"), E],
        ClientState.IDLE,
        b"",
    ),
    (
        "chunked-trailers",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n0\r\nT: 1 \r\n\r\n",
        False,
        [
            R(200, [(b"transfer-encoding", b"chunked")], b"OK"),
            D(b"abc"),
            EndOfMessage([(b"t", b"1")]),
        ],
        ClientState.IDLE,
        b"",
    ),
    (
        "head-ignores-length",
        b"HEAD",
        HOST,
        b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n",
        False,
        [R(200, [(b"content-length", b"500")], b"OK"), E],
        ClientState.IDLE,
        b"",
    ),
    (
        "head-after-100",
        b"HEAD",
        HOST,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
        False,
        [Info(100, [], b"Continue"), R(200, [(b"content-length", b"9")], b"OK"), E],
        ClientState.IDLE,
        b"",
    ),
    (
        "204-ignores-length",
        b"GET",
        HOST,
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        False,
        [R(204, [(b"content-length", b"5")], b"No Content"), E],
        ClientState.IDLE,
        b"",
    ),
    (
        "304",
        b"GET",
        HOST,
        b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
        False,
        [R(304, [(b"etag", b"x")], b"Not Modified"), E],
        ClientState.IDLE,
        b"",
    ),
    (
        "1xx-then-final",
        b"POST",
        HOST,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        False,
        [
            Info(100, [], b"Continue"),
            Info(103, [(b"link", b"</a>")], b"Early Hints"),
            R(201, [(b"content-length", b"2")], b"Created"),
            D(b"ok"),
            E,
        ],
        ClientState.IDLE,
        b"",
    ),
    (
        "close-delimited",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
        True,
        [R(200, [], b"OK"), D(b"until the end"), E, ConnectionClosed()],
        ClientState.CLOSED,
        b"",
    ),
    (
        "http10-close-delimited",
        b"GET",
        HOST,
        b"HTTP/1.0 200 OK\r\n\r\nold",
        True,
        [R(200, [], b"OK", b"1.0"), D(b"old"), E, ConnectionClosed()],
        ClientState.CLOSED,
        b"",
    ),
    (
        "http10-keep-alive",
        b"GET",
        HOST,
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx",
        False,
        [
            R(200, [(b"connection", b"keep-alive"), (b"content-length", b"1")], b"OK", b"1.0"),
            D(b"x"),
            E,
        ],
        ClientState.IDLE,
        b"",
    ),
    (
        "http10-length-no-keep-alive",
        b"GET",
        HOST,
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
        False,
        [R(200, [(b"content-length", b"1")], b"OK", b"1.0"), D(b"x"), E],
        ClientState.MUST_CLOSE,
        b"",
    ),
    (
        "connection-close",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
        False,
        [R(200, [(b"connection", b"close"), (b"content-length", b"1")], b"OK"), D(b"x"), E],
        ClientState.MUST_CLOSE,
        b"",
    ),
    (
        "custom-reason-and-status",
        b"GET",
        HOST,
        b"HTTP/1.1 299 All Good Here\r\nContent-Length: 0\r\n\r\n",
        False,
        [R(299, [(b"content-length", b"0")], b"All Good Here"), E],
        ClientState.IDLE,
        b"",
    ),
    (
        "101-switch",
        b"GET",
        UPGRADE,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"\x81\x02hi",
        False,
        [
            Info(
                101,
                [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")],
                b"Switching Protocols",
            )
        ],
        ClientState.SWITCHED_PROTOCOL,
        b"\x81\x02hi",
    ),
    (
        "upgrade-refused",
        b"GET",
        UPGRADE,
        b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n",
        False,
        [R(426, [(b"content-length", b"0")], b"Upgrade Required"), E],
        ClientState.IDLE,
        b"",
    ),
    (
        "body-at-limit",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n"
        + b"b" * 16
        + b"\r\n10\r\n"
        + b"c" * 16
        + b"\r\n0\r\n\r\n",
        False,
        [R(200, [(b"transfer-encoding", b"chunked")], b"OK"), D(b"b" * 16 + b"c" * 16), E],
        ClientState.IDLE,
        b"",
    ),
]

# (id, method, request headers, response bytes, eof, status-hint-or-limit)
INVALID = [
    ("garbage", b"GET", HOST, b"NOT HTTP\r\n\r\n", True),
    ("bad-status", b"GET", HOST, b"HTTP/1.1 2000 OK\r\n\r\n", True),
    ("http2", b"GET", HOST, b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", True),
    (
        "cl-and-te",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        True,
    ),
    (
        "two-cl",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        True,
    ),
    ("te-gzip", b"GET", HOST, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nx", True),
    (
        "bad-chunk",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        True,
    ),
    ("bad-header-name", b"GET", HOST, b"HTTP/1.1 200 OK\r\nBad Header: 1\r\n\r\n", True),
    ("cut-in-head", b"GET", HOST, b"HTTP/1.1 200 OK\r\nContent-Le", True),
    ("cut-in-body", b"GET", HOST, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", True),
    (
        "cut-in-chunks",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
        True,
    ),
    ("cut-in-head-of-head", b"HEAD", HOST, b"HTTP/1.1 200 OK\r\n", True),
    ("no-response", b"GET", HOST, b"", True),
    ("101-unasked", b"GET", HOST, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", True),
    (
        "bytes-after-response",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
        False,
    ),
    (
        "bytes-after-head-response",
        b"HEAD",
        HOST,
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        False,
    ),
    (
        "header-bytes-limit",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nX: " + b"v" * 300 + b"\r\n\r\n",
        True,
    ),
    ("header-never-ends", b"GET", HOST, b"HTTP/1.1 200 OK\r\nX: " + b"v" * 300, True),
    ("head-header-never-ends", b"HEAD", HOST, b"HTTP/1.1 200 OK\r\nX: " + b"v" * 300, True),
    (
        "header-count-limit",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(6)) + b"\r\n",
        True,
    ),
    (
        "trailer-count-limit",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
        + b"".join(b"T-%d: v\r\n" % i for i in range(6))
        + b"\r\n",
        True,
    ),
    (
        "trailers-never-end",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: " + b"v" * 400,
        True,
    ),
    (
        "chunk-extension-never-ends",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;e=" + b"v" * 400,
        True,
    ),
    (
        "length-over-body-limit",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nContent-Length: 33\r\n\r\n",
        True,
    ),
    (
        "chunks-over-body-limit",
        b"GET",
        HOST,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n21\r\n" + b"x" * 33 + b"\r\n",
        True,
    ),
    ("until-close-over-body-limit", b"GET", HOST, b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 33, True),
]
# The h11 wrapper sees the trailing bytes of a response that asked nothing more only as
# "rest"; both report them, as a MUST_CLOSE (after a complete response) or an error.
AFTER_RESPONSE = {"bytes-after-response", "bytes-after-head-response"}


def exchange(
    parser: str, method: bytes, headers: list[tuple[bytes, bytes]]
) -> HTTPClientConnection:
    conn = HTTPClientConnection(LIMITS, parser)
    conn.send(Request(method, b"/", headers))
    conn.send(EndOfMessage())
    assert conn.data_to_send()[0].startswith(method + b" / HTTP/1.1\r\n")
    return conn


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize(
    ("method", "headers", "raw", "eof", "expected", "state", "switched"),
    [pytest.param(*case[1:], id=case[0]) for case in VALID],
)
def test_valid_responses(
    parser: str,
    method: bytes,
    headers: list[tuple[bytes, bytes]],
    raw: bytes,
    eof: bool,
    expected: list[Any],
    state: ClientState,
    switched: bytes,
) -> None:
    for chunks in splits(raw, seed=len(raw)):
        conn = exchange(parser, method, headers)
        events: list[Any] = []
        for chunk in chunks:
            conn.receive_data(chunk)
            events += conn.events_received()
        if eof:
            conn.receive_eof()
            events += conn.events_received()
        assert normalise(events) == expected
        assert conn.their_state is state
        assert conn.reusable is (state is ClientState.IDLE)
        if state is ClientState.SWITCHED_PROTOCOL:
            assert conn.switched_protocol_data() == switched
            conn.receive_data(b"more")
            assert conn.switched_protocol_data() == b"more"
            conn.receive_eof()
            assert conn.events_received() == [ConnectionClosed()]


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize(
    ("name", "method", "headers", "raw", "eof"),
    [pytest.param(*case, id=case[0]) for case in INVALID],
)
def test_invalid_responses(
    parser: str, name: str, method: bytes, headers: list[tuple[bytes, bytes]], raw: bytes, eof: bool
) -> None:
    for chunks in splits(raw, seed=len(raw)):
        conn = exchange(parser, method, headers)
        try:
            for chunk in chunks:
                conn.receive_data(chunk)
            if eof:
                conn.receive_eof()
        except RemoteProtocolError as exc:
            assert exc.status_hint == 502  # noqa: PT017 - each split may fail elsewhere
            assert conn.their_state is ClientState.CLOSED
            conn.receive_data(b"ignored")
            conn.receive_eof()
            continue
        # Stray bytes after a complete response, all in the same read: not reusable.
        assert name in AFTER_RESPONSE
        assert conn.their_state is ClientState.MUST_CLOSE


# ------------------------------------------------------------------ keep-alive reuse


@pytest.mark.parametrize("parser", PARSERS)
def test_keep_alive_reuse_for_many_requests(parser: str) -> None:
    conn = HTTPClientConnection(LIMITS, parser)
    for i in range(20):
        assert conn.reusable
        method = b"HEAD" if i % 3 == 0 else b"GET"
        conn.send(Request(method, b"/%d" % i, HOST))
        conn.send(EndOfMessage())
        assert conn.data_to_send() == [method + b" /%d HTTP/1.1\r\nhost: backend\r\n\r\n" % i]
        conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        if method == b"GET":
            conn.receive_data(b"ok")
        events = conn.events_received()
        assert isinstance(events[0], Response)
        assert events[-1] == EndOfMessage()
    conn.receive_eof()  # the backend closes an idle connection
    assert conn.events_received() == [ConnectionClosed()]
    assert conn.our_state is ClientState.CLOSED
    assert not conn.reusable


@pytest.mark.parametrize("parser", PARSERS)
def test_request_bodies(parser: str) -> None:
    conn = HTTPClientConnection(LIMITS, parser)
    conn.send(Request(b"POST", b"/", HOST, content_length=5))
    conn.send(Data(b"he"))
    conn.send(Data(b""))
    conn.send(Data(b"llo"))
    conn.send(EndOfMessage())
    assert b"".join(conn.data_to_send()) == (
        b"POST / HTTP/1.1\r\nhost: backend\r\ncontent-length: 5\r\n\r\nhello"
    )
    conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn.send(Request(b"PUT", b"/c", HOST, chunked=True, keep_alive=False))
    conn.send(Data(b"abc"))
    conn.send(EndOfMessage([(b"t", b"1")]))
    assert b"".join(conn.data_to_send()) == (
        b"PUT /c HTTP/1.1\r\nhost: backend\r\ntransfer-encoding: chunked\r\n"
        b"connection: close\r\n\r\n3\r\nabc\r\n0\r\nt: 1\r\n\r\n"
    )
    conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert conn.our_state is ClientState.MUST_CLOSE  # we asked to close


@pytest.mark.parametrize("parser", PARSERS)
def test_early_response_while_sending_the_body(parser: str) -> None:
    conn = HTTPClientConnection(LIMITS, parser)
    conn.send(Request(b"POST", b"/", [*HOST, (b"connection", b"close")], content_length=100))
    conn.receive_data(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    assert conn.their_state is ClientState.DONE
    assert conn.our_state is ClientState.SEND_BODY
    conn.receive_eof()
    assert conn.their_state is ClientState.CLOSED
    assert conn.our_state is ClientState.SEND_BODY  # the caller decides to stop sending


# ------------------------------------------------------------------ misuse


@pytest.mark.parametrize("parser", PARSERS)
def test_misuse(parser: str) -> None:
    def fresh() -> HTTPClientConnection:
        return HTTPClientConnection(LIMITS, parser)

    bad_requests = [
        Request(b"GET", b"/", []),  # no Host
        Request(b"GET", b"/", [*HOST, *HOST]),
        Request(b"GET", b"/", [*HOST, (b"content-length", b"1")]),
        Request(b"GET", b"/", [*HOST, (b"transfer-encoding", b"chunked")]),
        Request(b"GET", b"/", HOST, chunked=True, content_length=1),
        Request(b"CONNECT", b"h:443", HOST),
        Request(b"GET", b"/", [*HOST, (b"x", b"a\r\nb")]),
        Request(b"G T", b"/", HOST),
    ]
    for request in bad_requests:
        conn = fresh()
        with pytest.raises(LocalProtocolError):
            conn.send(request)
        assert conn.reusable
        assert conn.data_to_send() == []
    conn = fresh()
    for event in (Data(b"x"), EndOfMessage(), Response(200, [])):
        with pytest.raises(LocalProtocolError):
            conn.send(event)
    with pytest.raises(LocalProtocolError):
        conn.switched_protocol_data()
    conn.send(Request(b"POST", b"/", HOST, content_length=2))
    with pytest.raises(LocalProtocolError):
        conn.send(Request(b"GET", b"/", HOST))  # one at a time
    with pytest.raises(LocalProtocolError):
        conn.send(Data(b"abc"))
    with pytest.raises(LocalProtocolError):
        conn.send(EndOfMessage())
    conn.send(Data(b"ab"))
    with pytest.raises(LocalProtocolError):
        conn.send(EndOfMessage([(b"bad name", b"v")]))
    conn = fresh()
    conn.send(Request(b"GET", b"/", HOST))
    with pytest.raises(LocalProtocolError):
        conn.send(Data(b"no body declared"))


@pytest.mark.parametrize("parser", PARSERS)
def test_unsolicited_bytes(parser: str) -> None:
    conn = HTTPClientConnection(LIMITS, parser)
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"HTTP/1.1 200 OK\r\n\r\n")
    assert conn.their_state is ClientState.CLOSED


def test_unknown_parser() -> None:
    with pytest.raises(ValueError, match="unknown HTTP parser"):
        HTTPClientConnection(LIMITS, "nope")
    with pytest.raises(ValueError, match="unknown HTTP parser"):
        make_response_parser("nope", [], LIMITS)


def test_check_response_head_defence_in_depth() -> None:
    with pytest.raises(RemoteProtocolError):
        check_response_head(200, [(b"content-length", b"x")], b"1.1", False, LIMITS)
    with pytest.raises(LimitExceeded):
        check_response_head(200, [(b"content-length", b"99")], b"1.1", False, LIMITS)
    # No body expected: a large Content-Length is only a description (HEAD, 304).
    assert check_response_head(304, [(b"content-length", b"99")], b"1.1", True, LIMITS) == (
        True,
        False,
    )


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize(
    ("method", "prefix"),
    [
        (b"GET", b"HTTP/1.1 200 OK\r\nX-Never-Ends: "),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nX-Never-Ends: "),
        (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: "),
        (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;e="),
    ],
    ids=["header", "head-header", "trailer", "chunk-extension"],
)
def test_a_response_line_that_never_ends_is_refused_within_one_read_of_the_limit(
    parser: str, method: bytes, prefix: bytes
) -> None:
    limits = HTTPLimits()
    conn = HTTPClientConnection(limits, parser)
    conn.send(Request(method, b"/", HOST))
    conn.send(EndOfMessage())
    conn.receive_data(prefix)
    piece = b"a" * 1024
    fed = 0
    while fed <= limits.max_header_bytes + len(piece):
        try:
            conn.receive_data(piece)
        except LimitExceeded as exc:
            assert exc.status_hint == 502  # noqa: PT017 - also checks when it raised
            assert conn.their_state is ClientState.CLOSED
            return
        fed += len(piece)
    pytest.fail(f"{fed} bytes of one unfinished line accepted")
