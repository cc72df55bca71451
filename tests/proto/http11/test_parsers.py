"""The two request parsers: where they still differ, pipelining, bounded memory."""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

import pytest

from netstack.config import HTTPLimits
from netstack.errors import LimitExceeded, RemoteProtocolError
from netstack.proto.http11 import EndOfMessage, Request
from netstack.proto.http11.parse import check_head, make_parser
from tests.proto.http11.corpus import PARSERS, Server, normalise

H = b"Host: example.com\r\n"
CHUNKED = b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"


def outcome(parser: str, data: bytes) -> tuple[list[tuple[Any, ...]], int | None]:
    server = Server(parser, HTTPLimits())
    try:
        server.feed(data)
        server.eof()
    except RemoteProtocolError as exc:
        return normalise(server.events), exc.status_hint
    return normalise(server.events), None


# Where llhttp and h11 still disagree, on purpose: each is allowed by RFC 9112 (or is a
# normalisation), and bridging it would cost the fast path or mean re-parsing chunk
# framing in Python. None of them is a smuggling vector: both parsers agree on where
# every message ends. The test checks that each difference is still exactly as listed.
KNOWN_DIFFERENCES = [
    pytest.param(
        b"\r\nGET / HTTP/1.1\r\n" + H + b"\r\n",
        "accepted",
        400,
        id="empty-line-before-request: RFC 9112 2.2 SHOULD ignore it (llhttp does)",
    ),
    pytest.param(
        b"FOO / HTTP/1.1\r\n" + H + b"\r\n",
        400,
        "accepted",
        id="unknown-method: llhttp knows a fixed method list, h11 takes any token",
    ),
    pytest.param(
        b"get / HTTP/1.1\r\n" + H + b"\r\n",
        400,
        "accepted",
        id="lower-case-method: a valid token to h11, unknown to llhttp",
    ),
    pytest.param(
        CHUNKED + b"2 \r\nab\r\n0\r\n\r\n",
        400,
        "accepted",
        id="space-after-chunk-size: h11 allows whitespace there",
    ),
    pytest.param(
        CHUNKED + b"2;a\x01\r\nab\r\n0\r\n\r\n",
        400,
        "accepted",
        id="control-char-in-chunk-extension: h11 does not check extensions",
    ),
    pytest.param(
        CHUNKED + b"0\r\nX: 1\n\r\n",
        400,
        "accepted",
        id="bare-LF-in-trailers: h11 accepts LF line ends in trailers",
    ),
]


@pytest.mark.parametrize(("data", "llhttp", "h11"), KNOWN_DIFFERENCES)
def test_known_differences(data: bytes, llhttp: object, h11: object) -> None:
    for parser, expected in (("httptools", llhttp), ("h11", h11)):
        events, status = outcome(parser, data)
        if expected == "accepted":
            assert status is None, parser
            assert any(e[0] == "request" for e in events)
        else:
            assert status == expected, parser


def test_transfer_encoding_value_case_is_normalised_by_h11_only() -> None:
    data = b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: Chunked\r\n\r\n0\r\n\r\n"
    values = {}
    for parser in PARSERS:
        events, status = outcome(parser, data)
        assert status is None
        request = events[0][1]
        assert request.chunked
        values[parser] = dict(request.headers)[b"transfer-encoding"]
    assert values == {"httptools": b"Chunked", "h11": b"chunked"}


# ----------------------------------------------------------------- pipelining

BLOCK = [
    b"GET /get HTTP/1.1\r\n" + H + b"\r\n",
    b"POST /length HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
    CHUNKED.replace(b"POST /", b"POST /chunked") + b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
    b"HEAD /head HTTP/1.1\r\n" + H + b"\r\n",
]
TARGETS = [b"/get", b"/length", b"/chunked", b"/head"]
BODIES = [b"", b"hello", b"abcde", b""]


@pytest.mark.parametrize("parser", PARSERS)
def test_100_pipelined_requests_split_at_every_boundary(parser: str) -> None:
    """25 blocks of 4 requests; for every offset k within a block, the stream is cut at
    k + j * len(block) for all j, so every byte position of every kind of request falls
    on a feed boundary in some run (plus the whole stream, byte by byte)."""
    block = b"".join(BLOCK)
    stream = block * 25
    size = len(block)
    runs = [[stream], [stream[i : i + 1] for i in range(len(stream))]]
    for k in range(1, size):
        cuts = [0, *range(k, len(stream), size), len(stream)]
        runs.append([stream[a:b] for a, b in itertools.pairwise(cuts)])
    for chunks in runs:
        server = Server(parser, HTTPLimits())
        for chunk in chunks:
            server.feed(chunk)
        events = normalise(server.events)
        requests = [e[1] for e in events if e[0] == "request"]
        assert [r.target for r in requests] == TARGETS * 25
        assert len(server.sent) == 100
        bodies = []
        body = b""
        for event in events:
            if event[0] == "data":
                body = event[1]
            elif event[0] == "end":
                bodies.append(body)
                body = b""
        assert bodies == BODIES * 25
        assert server.conn.pending_requests == 0


@pytest.mark.parametrize("parser", PARSERS)
def test_versions_of_pipelined_requests_split_anywhere(parser: str) -> None:
    """The llhttp wrapper reads the version off a request line that a feed holds whole;
    a line cut by a feed, and the second request of a feed, take the other way."""
    ka = b"Connection: keep-alive\r\n"
    stream = b"".join(
        [
            b"GET /a HTTP/1.1\r\n" + H + b"\r\n",
            b"GET /b HTTP/1.0\r\n" + ka + b"\r\n",
            b"GET /c HTTP/1.0\r\n" + H + ka + b"\r\n",
            b"GET /d HTTP/1.1\r\n" + H + b"\r\n",
        ]
    )
    runs = [[stream], [stream[i : i + 1] for i in range(len(stream))]]
    runs += [[stream[:k], stream[k:]] for k in range(1, len(stream))]
    for chunks in runs:
        server = Server(parser, HTTPLimits())
        for chunk in chunks:
            server.feed(chunk)
        requests = [e[1] for e in normalise(server.events) if e[0] == "request"]
        assert [(r.target, r.http_version) for r in requests] == [
            (b"/a", b"1.1"),
            (b"/b", b"1.0"),
            (b"/c", b"1.0"),
            (b"/d", b"1.1"),
        ]


# ----------------------------------------------------------------- bounded memory


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize(
    "prefix",
    [
        b"GET / HTTP/1.1\r\n" + H + b"X-Never-Ends: ",
        b"GET /",
        CHUNKED + b"0\r\nTrailer-Never-Ends: ",
        CHUNKED + b"1;extension-never-ends=",
    ],
    ids=["header", "request-line", "trailer", "chunk-extension"],
)
def test_a_line_that_never_ends_is_refused_within_one_read_of_the_limit(
    parser: str, prefix: bytes
) -> None:
    limits = HTTPLimits()
    events: list[Any] = []
    make = make_parser(parser, events, deque(), limits)
    piece = b"a" * 1024
    make.feed(prefix)
    fed = 0
    while fed <= limits.max_header_bytes + len(piece):
        try:
            make.feed(piece)
        except LimitExceeded as exc:
            assert exc.status_hint in (414, 431)  # noqa: PT017 - also checks when it raised
            return
        fed += len(piece)
    pytest.fail(f"{fed} bytes of one unfinished line accepted")


@pytest.mark.parametrize("parser", PARSERS)
def test_bytes_held_behind_an_undecided_upgrade_are_bounded(parser: str) -> None:
    limits = HTTPLimits(max_header_bytes=1024, max_request_line_bytes=512)
    make = make_parser(parser, [], deque(), limits)
    make.feed(b"GET / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: x\r\n\r\n")
    assert make.paused
    make.feed(b"a" * 1000)
    with pytest.raises(LimitExceeded):
        make.feed(b"a" * 100)


@pytest.mark.parametrize("parser", PARSERS)
def test_after_a_switch_everything_is_held_for_the_caller(parser: str) -> None:
    limits = HTTPLimits(max_header_bytes=1024, max_request_line_bytes=512)
    make = make_parser(parser, [], deque(), limits)
    make.feed(b"GET / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: x\r\n\r\nfirst")
    assert make.resume(switched=True) == b"first"
    make.feed(b"b" * 5000)  # no limit once switched: the bytes are the new protocol's
    assert make.resume(switched=True) == b"b" * 5000
    assert make.feed_eof()


@pytest.mark.parametrize("parser", PARSERS)
def test_bytes_after_a_closing_request_are_dropped(parser: str) -> None:
    events: list[Any] = []
    make = make_parser(parser, events, deque(), HTTPLimits())
    make.feed(b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\nGET /2 HTTP/1.1\r\n")
    make.feed(b"x" * 100_000)
    assert [type(e) for e in events] == [Request, EndOfMessage]
    assert make.feed_eof()


@pytest.mark.parametrize("parser", PARSERS)
def test_empty_feed_is_not_the_end_of_the_stream(parser: str) -> None:
    events: list[Any] = []
    make = make_parser(parser, events, deque(), HTTPLimits())
    make.feed(b"GET / HTTP/1.1\r\n")
    make.feed(b"")
    make.feed(H + b"\r\n")
    assert [type(e) for e in events] == [Request, EndOfMessage]


def test_unknown_parser_name() -> None:
    with pytest.raises(ValueError, match="unknown HTTP parser"):
        make_parser("picohttp", [], deque(), HTTPLimits())


@pytest.mark.parametrize("parser", PARSERS)
def test_head_size_is_measured_exactly_after_a_pipelined_request(parser: str) -> None:
    # The second head arrives in the same read as the end of the first message, so the
    # llhttp wrapper cannot count its bytes as they come: check_head measures it.
    limits = HTTPLimits(max_header_bytes=200, max_request_line_bytes=100)
    make = make_parser(parser, [], deque(), limits)
    big = b"GET /2 HTTP/1.1\r\n" + H + b"X: " + b"v" * 180 + b"\r\n\r\n"
    with pytest.raises(LimitExceeded) as caught:
        make.feed(b"GET /1 HTTP/1.1\r\n" + H + b"\r\n" + big)
    assert caught.value.status_hint == 431


@pytest.mark.parametrize("parser", PARSERS)
def test_eof_behind_an_undecided_upgrade_drops_what_was_held(parser: str) -> None:
    events: list[Any] = []
    make = make_parser(parser, events, deque(), HTTPLimits())
    make.feed(
        b"GET / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: x\r\n\r\n"
        b"GET /held HTTP/1.1\r\n" + H + b"\r\n"
    )
    assert make.feed_eof()
    assert make.feed_eof()
    make.feed(b"GET /late HTTP/1.1\r\n" + H + b"\r\n")
    assert make.resume(switched=False) == b""
    assert [type(e) for e in events] == [Request, EndOfMessage]


def test_check_head_refuses_what_no_parser_lets_through() -> None:
    # Defence in depth: both parsers refuse these first, check_head does too.
    limits = HTTPLimits()
    base = [(b"host", b"h")]
    for headers in (
        [*base, (b"content-length", b"1"), (b"content-length", b"1")],
        [*base, (b"content-length", b"1a")],
    ):
        with pytest.raises(RemoteProtocolError) as caught:
            check_head(b"POST", b"/", b"1.1", headers, True, limits)
        assert caught.value.status_hint == 400
    request = check_head(b"GET", b"/", b"1.1", [*base, (b"expect", b"other")], True, limits)
    assert not request.expect_continue


@pytest.mark.parametrize(
    ("connection", "upgrade"),
    [
        ([b"keep-alive"], None),
        ([b"x-upgrade-later"], None),  # the word, but not the token
        ([b"Keep-Alive, Upgrade"], b"websocket"),
        ([b"keep-alive", b"upgrade"], b"websocket"),  # the token in a second header
        ([b"upgrade", b"upgrade"], b"websocket"),
    ],
)
def test_check_head_finds_the_upgrade_token_in_any_connection_header(
    connection: list[bytes], upgrade: bytes | None
) -> None:
    headers = [(b"host", b"h"), *((b"connection", v) for v in connection)]
    headers.append((b"upgrade", b"WebSocket"))
    request = check_head(b"GET", b"/", b"1.1", headers, True, HTTPLimits())
    assert request.upgrade == upgrade
