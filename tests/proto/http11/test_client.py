"""The client role (HTTPClientConnection): a response table through both parsers, fed
whole, byte by byte and in random splits; request writing; misuse; limits."""

from __future__ import annotations

import tomllib
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
from tests.proto.http11.corpus import DATA, PARSERS

HOST = [(b"host", b"backend")]
UPGRADE = [*HOST, (b"connection", b"upgrade"), (b"upgrade", b"websocket")]
LIMITS = HTTPLimits(
    max_header_bytes=256, max_request_line_bytes=64, max_header_count=5, max_body_bytes=32
)
R = Response
Info = InformationalResponse


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


RESPONSES = DATA / "responses"


def _b(text: str) -> bytes:
    return text.encode("latin-1")


def _headers(pairs: list[list[str]]) -> list[tuple[bytes, bytes]]:
    return [(_b(n), _b(v)) for n, v in pairs]


def _event(spec: dict[str, Any]) -> Any:
    kind = spec["type"]
    if kind == "response":
        headers = _headers(spec["headers"])
        return R(spec["status"], headers, _b(spec["reason"]), _b(spec.get("version", "1.1")))
    if kind == "informational":
        return Info(spec["status"], _headers(spec["headers"]), _b(spec["reason"]))
    if kind == "data":
        return D(_b(spec["data"]))
    if kind == "end":
        return EndOfMessage(_headers(spec.get("trailers", [])))
    assert kind == "closed", kind
    return ConnectionClosed()


def load(kind: str) -> list[Any]:
    """tests/data/http11/responses/{valid,invalid}: ``NNN.http`` (the response bytes) and
    ``NNN.toml``: ``description``, ``method`` and ``request_headers`` of the request it
    answers, ``eof`` (the server closes after the bytes); valid cases: ``state`` (their
    state at the end), ``switched`` (raw bytes after a 101) and ``[[events]]`` (types
    ``informational``, ``response``, ``data``, ``end``, ``closed``); invalid cases:
    ``after_response`` (the bytes follow a complete response: not an error when they
    arrive in the same read, only the end of reuse). Limits are ``LIMITS`` below."""
    cases = []
    for path in sorted((RESPONSES / kind).glob("*.toml")):
        spec = tomllib.loads(path.read_text())
        raw = path.with_suffix(".http").read_bytes()
        common = (
            _b(spec["method"]),
            _headers(spec["request_headers"]),
            raw,
            spec.get("eof", False),
        )
        if kind == "valid":
            values: tuple[Any, ...] = (
                *common,
                [_event(e) for e in spec["events"]],
                ClientState(spec["state"]),
                _b(spec.get("switched", "")),
            )
        else:
            values = (*common, spec.get("after_response", False))
        cases.append(pytest.param(*values, id=f"{kind}/{path.stem}: {spec['description']}"))
    return cases


VALID = load("valid")
INVALID = load("invalid")


def test_response_corpus_is_there() -> None:
    assert len(VALID) >= 15
    assert len(INVALID) >= 25


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
    ("method", "headers", "raw", "eof", "expected", "state", "switched"), VALID
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
@pytest.mark.parametrize(("method", "headers", "raw", "eof", "after_response"), INVALID)
def test_invalid_responses(
    parser: str,
    method: bytes,
    headers: list[tuple[bytes, bytes]],
    raw: bytes,
    eof: bool,
    after_response: bool,
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
        assert after_response
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
    assert (conn.our_state, conn.their_state) == (ClientState.SEND_BODY, ClientState.DONE)
    conn.receive_eof()
    # The caller decides to stop sending.
    assert (conn.our_state, conn.their_state) == (ClientState.SEND_BODY, ClientState.CLOSED)


@pytest.mark.parametrize("parser", PARSERS)
def test_send_request_head_writes_what_send_request_writes(parser: str) -> None:
    # The proxy's fast path: the same bytes and the same states as send(Request(...)).
    cases: list[tuple[Request, dict[str, Any]]] = [
        (Request(b"GET", b"/a?b", [*HOST, (b"x-a", b"1")]), {"end": True}),
        (Request(b"GET", b"/", HOST, content_length=0), {"content_length": 0, "end": True}),
        (Request(b"POST", b"/p", HOST, content_length=5), {"content_length": 5}),
        (Request(b"PUT", b"/c", HOST, chunked=True), {"chunked": True}),
    ]
    for request, kwargs in cases:
        slow, fast = HTTPClientConnection(LIMITS, parser), HTTPClientConnection(LIMITS, parser)
        slow.send(request)
        block = b"".join(n + b": " + v + b"\r\n" for n, v in request.headers)
        fast.send_request_head(request.method, request.target, block, **kwargs)
        sent = fast.data_to_send()
        assert sent == slow.data_to_send()
        # The same head again, vouched for as checked: the same bytes.
        again = HTTPClientConnection(LIMITS, parser)
        again.send_request_head(request.method, request.target, block, **kwargs, checked=True)
        assert again.data_to_send() == sent
        if kwargs.get("end"):
            slow.send(EndOfMessage())
        assert (fast.our_state, fast.their_state) == (slow.our_state, slow.their_state)
        for conn in (slow, fast):
            if conn.our_state is ClientState.SEND_BODY:
                conn.send(Data(b"hello"))
                conn.send(EndOfMessage())
            conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            assert conn.reusable
        assert slow.data_to_send() == fast.data_to_send()
        assert normalise(slow.events_received()) == normalise(fast.events_received())


@pytest.mark.parametrize("parser", PARSERS)
def test_send_request_head_upgrade_and_head(parser: str) -> None:
    conn = HTTPClientConnection(LIMITS, parser)
    block = b"host: backend\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
    conn.send_request_head(b"GET", b"/ws", block, upgrade=True, end=True)
    conn.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nraw"
    )
    assert conn.our_state is ClientState.SWITCHED_PROTOCOL
    assert conn.switched_protocol_data() == b"raw"
    # HEAD: the response has no body whatever its Content-Length says.
    conn = HTTPClientConnection(LIMITS, parser)
    conn.send_request_head(b"HEAD", b"/", b"host: backend\r\n", end=True)
    conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")
    assert conn.events_received()[-1] == EndOfMessage()
    assert conn.reusable


@pytest.mark.parametrize("parser", PARSERS)
def test_send_request_head_refusals_change_nothing(parser: str) -> None:
    host = b"host: backend\r\n"
    bad: list[tuple[bytes, bytes, bytes, dict[str, Any]]] = [
        (b"CONNECT", b"h:443", host, {}),
        (b"G T", b"/", host, {}),
        (b"GET", b"/a b", host, {}),
        (b"GET", b"/", host + b"x: a\nb: c\r\n", {}),
        (b"POST", b"/", host, {"content_length": 1, "chunked": True}),
        (b"POST", b"/", host, {"content_length": 1, "end": True}),
        (b"POST", b"/", host, {"chunked": True, "end": True}),
    ]
    for method, target, block, kwargs in bad:
        conn = HTTPClientConnection(LIMITS, parser)
        with pytest.raises(LocalProtocolError):
            conn.send_request_head(method, target, block, **kwargs)
        assert conn.reusable
        assert conn.data_to_send() == []
    conn = HTTPClientConnection(LIMITS, parser)
    conn.send_request_head(b"GET", b"/", host, end=True)
    with pytest.raises(LocalProtocolError):
        conn.send_request_head(b"GET", b"/", host, end=True)  # one at a time


@pytest.mark.parametrize("parser", PARSERS)
def test_response_before_the_request_body_ended_with_keep_alive(parser: str) -> None:
    conn = HTTPClientConnection(LIMITS, parser)
    conn.send(Request(b"POST", b"/", HOST, content_length=2))
    conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert (conn.our_state, conn.their_state) == (ClientState.SEND_BODY, ClientState.DONE)
    conn.send(Data(b"ab"))
    conn.send(EndOfMessage())
    assert conn.reusable


@pytest.mark.parametrize("parser", PARSERS)
def test_response_before_the_request_body_ended_without_keep_alive(parser: str) -> None:
    conn = HTTPClientConnection(LIMITS, parser)
    conn.send(Request(b"POST", b"/", HOST, content_length=2))
    conn.receive_data(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    conn.send(Data(b"ab"))
    conn.send(EndOfMessage())
    assert (conn.our_state, conn.their_state) == (ClientState.MUST_CLOSE, ClientState.MUST_CLOSE)


@pytest.mark.parametrize("parser", PARSERS)
def test_repeated_response_heads_keep_their_own_verdict(parser: str) -> None:
    # The llhttp wrapper reuses the verdict of an identical header list: a change of
    # any header (or of the version) must be judged afresh.
    conn = HTTPClientConnection(LIMITS, parser)
    answers = [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    ]
    for answer, reusable in answers:
        conn.send(Request(b"GET", b"/", HOST))
        conn.send(EndOfMessage())
        conn.receive_data(answer)
        assert conn.reusable is reusable
    conn = HTTPClientConnection(LIMITS, parser)
    for close in (b"keep-alive", b"close"):
        conn.send(Request(b"GET", b"/", HOST))
        conn.send(EndOfMessage())
        conn.receive_data(b"HTTP/1.1 200 OK\r\nConnection: %s\r\nContent-Length: 0\r\n\r\n" % close)
        assert conn.reusable is (close == b"keep-alive")


@pytest.mark.parametrize("parser", PARSERS)
def test_malformed_answer_to_head(parser: str) -> None:
    conn = HTTPClientConnection(LIMITS, parser)
    conn.send(Request(b"HEAD", b"/", HOST))
    conn.send(EndOfMessage())
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"HTTP/1.1 2x0 OK\r\n\r\n")
    assert conn.their_state is ClientState.CLOSED


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
    # Connection as a list of tokens (HTTP/1.0 keep-alive needs it named).
    both = [(b"connection", b"Upgrade, Keep-Alive")]
    assert check_response_head(200, both, b"1.0", True, LIMITS) == (True, False)
    closing = [(b"connection", b"keep-alive , close")]
    assert check_response_head(200, closing, b"1.1", True, LIMITS) == (False, False)
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
