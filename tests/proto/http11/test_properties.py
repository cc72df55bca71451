"""Hypothesis properties of the server role (shared/STYLE.md §8).

* Any sequence of inputs and sends either leaves the connection in a valid state, or
  raises a ProtocolError: a RemoteProtocolError ends it CLOSED, a LocalProtocolError
  changes nothing. The events always follow the message grammar.
* encode -> parse is the identity for request heads written by write.encode_request_head,
  with both parsers.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from netstack.config import HTTPLimits
from netstack.errors import LocalProtocolError, RemoteProtocolError
from netstack.proto.http11 import (
    ClientState,
    ConnectionClosed,
    Data,
    EndOfMessage,
    HTTPClientConnection,
    HTTPConnection,
    InformationalResponse,
    Request,
    Response,
    State,
)
from netstack.proto.http11.parse import make_parser
from netstack.proto.http11.write import encode_request_head
from tests.proto.http11.corpus import PARSERS

H = b"Host: h\r\n"
PIECES = [
    b"GET / HTTP/1.1\r\n" + H + b"\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"HEAD / HTTP/1.1\r\n" + H + b"\r\n",
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n",
    b"3\r\nabc\r\n",
    b"0\r\n\r\n",
    b"0\r\nT: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: ws\r\n\r\n",
    b"PUT / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n",
    b"CONNECT h:1 HTTP/1.1\r\n" + H + b"\r\n",
    b"\r\n",
    b"X: y\r\n",
    b"Content-Length: 1\r\n",
]
SMALL = HTTPLimits(
    max_request_line_bytes=64, max_header_bytes=256, max_header_count=8, max_body_bytes=64
)
HEADER_SETS = [
    [],
    [(b"content-length", b"2")],
    [(b"content-length", b"2"), (b"connection", b"close")],
    [(b"transfer-encoding", b"chunked")],
    [(b"x", b"bad\r\nvalue")],
]

stream = st.lists(
    st.one_of(st.sampled_from(PIECES), st.binary(max_size=6)), min_size=1, max_size=4
).map(b"".join)


class ServerMachine(RuleBasedStateMachine):
    parser = "httptools"

    def __init__(self) -> None:
        super().__init__()
        self.conn = HTTPConnection(SMALL, self.parser)
        self.in_message = False
        self.closed_seen = False

    def _guard(self, action: Any) -> None:
        conn = self.conn
        before = (conn.our_state, conn.keep_alive, conn.pending_requests)
        try:
            action()
        except RemoteProtocolError:
            assert conn.our_state is State.CLOSED
        except LocalProtocolError:
            assert (conn.our_state, conn.keep_alive, conn.pending_requests) == before
            assert conn.data_to_send() == []
        self._check_events()

    def _check_events(self) -> None:
        for event in self.conn.events_received():
            assert not self.closed_seen
            kind = type(event)
            if kind is Request:
                assert not self.in_message
                self.in_message = True
            elif kind is Data:
                assert self.in_message
            elif kind is EndOfMessage:
                assert self.in_message
                self.in_message = False
            else:
                assert kind is ConnectionClosed
                assert not self.in_message
                self.closed_seen = True

    @rule(data=stream)
    def receive(self, data: bytes) -> None:
        self._guard(lambda: self.conn.receive_data(data))

    @rule()
    def eof(self) -> None:
        self._guard(self.conn.receive_eof)

    @rule(status=st.sampled_from([200, 204, 304, 404]), headers=st.sampled_from(HEADER_SETS))
    def respond(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._guard(lambda: self.conn.send_response(status, headers, b"ok"))

    @rule(status=st.sampled_from([200, 304]), headers=st.sampled_from(HEADER_SETS))
    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._guard(lambda: self.conn.send(Response(status, headers)))

    @rule(data=st.sampled_from([b"", b"o", b"ok", b"too long"]))
    def body(self, data: bytes) -> None:
        self._guard(lambda: self.conn.send(Data(data)))

    @rule()
    def end(self) -> None:
        self._guard(lambda: self.conn.send(EndOfMessage()))

    @rule(status=st.sampled_from([100, 101, 103]))
    def informational(self, status: int) -> None:
        self._guard(lambda: self.conn.send(InformationalResponse(status)))

    @rule()
    def switched(self) -> None:
        self._guard(self.conn.switched_protocol_data)

    @invariant()
    def valid_state(self) -> None:
        conn = self.conn
        assert conn.our_state in State
        assert conn.pending_requests >= 0
        if conn.our_state in (State.MUST_CLOSE, State.CLOSED, State.SWITCHED_PROTOCOL):
            assert not conn.keep_alive
        for chunk in conn.data_to_send():
            assert chunk


class H11ServerMachine(ServerMachine):
    parser = "h11"


_SETTINGS = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestServerMachineHttptools = ServerMachine.TestCase
TestServerMachineHttptools.settings = _SETTINGS
TestServerMachineH11 = H11ServerMachine.TestCase
TestServerMachineH11.settings = _SETTINGS


# ------------------------------------------------------------------ encode -> parse

_SPECIAL = {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect"}
token = st.text("abcdefghijklmnopqrstuvwxyz0123456789-!#$%&'*+.^_`|~", min_size=1, max_size=12)
value = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=20).map(
    lambda s: s.encode("ascii")
)
inner_space = st.tuples(value, value).map(lambda p: p[0] + b" \t" + p[1] if p[0] and p[1] else p[0])
headers = st.lists(
    st.tuples(token.map(lambda s: s.encode("ascii")), inner_space).filter(
        lambda h: h[0] not in _SPECIAL
    ),
    max_size=6,
)
target = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/?%",
    max_size=30,
).map(lambda s: b"/" + s.encode("ascii"))
method = st.sampled_from([b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH"])


@pytest.mark.parametrize("parser", PARSERS)
@settings(max_examples=150, deadline=None)
@given(method=method, target=target, headers=headers, host=value.filter(bool))
def test_encode_then_parse_is_identity(
    parser: str, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], host: bytes
) -> None:
    all_headers = [(b"host", host), *headers]
    events: list[Any] = []
    make_parser(parser, events, deque(), HTTPLimits()).feed(
        encode_request_head(method, target, all_headers)
    )
    assert events == [Request(method, target, all_headers), EndOfMessage()]


# ------------------------------------------------------------------ client role

RESPONSE_PIECES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"2\r\nab\r\n",
    b"0\r\n\r\n",
    b"0\r\nT: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\nConnection: upgrade\r\n\r\n",
    b"abc",
    b"\r\n",
]
# Pieces only, no random bytes: on arbitrary garbage the two parsers may fail at
# different points (llhttp at the first bad byte, h11 at the end of the line), or
# differ where test_parsers.KNOWN_DIFFERENCES says.
response_stream = st.lists(st.sampled_from(RESPONSE_PIECES), min_size=1, max_size=3).map(b"".join)
CLIENT_REQUESTS = [
    Request(b"GET", b"/", [(b"host", b"b")]),
    Request(b"HEAD", b"/", [(b"host", b"b")]),
    Request(b"POST", b"/", [(b"host", b"b")], content_length=2),
    Request(b"POST", b"/", [(b"host", b"b")], chunked=True),
    Request(b"GET", b"/", [(b"host", b"b"), (b"connection", b"upgrade"), (b"upgrade", b"ws")]),
    Request(b"GET", b"/", [(b"host", b"b")], keep_alive=False),
    Request(b"GET", b"/", []),  # no Host: refused
]


def _merged(events: list[Any]) -> list[Any]:
    out: list[Any] = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + event.data)
        else:
            out.append(event)
    return out


class ClientMachine(RuleBasedStateMachine):
    """Both parsers in lock-step: the same outcome for every step (h11 is the
    reference), and the usual rules: a RemoteProtocolError ends CLOSED, a
    LocalProtocolError changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.conns = [HTTPClientConnection(SMALL, p) for p in PARSERS]
        self.failed = [False, False]
        self.compare = True

    def _step(self, action: Any) -> None:
        outcomes = []
        for conn in self.conns:
            before = (conn.our_state, conn.their_state)
            error: type[Exception] | None = None
            try:
                action(conn)
            except RemoteProtocolError:
                error = RemoteProtocolError
                assert conn.their_state is ClientState.CLOSED
            except LocalProtocolError:
                error = LocalProtocolError
                assert (conn.our_state, conn.their_state) == before
            outcomes.append(
                (
                    error,
                    conn.our_state,
                    conn.their_state,
                    _merged(conn.events_received()),
                    b"".join(conn.data_to_send()),
                )
            )
        if any(self.failed) or not self.compare:
            return  # (see teardown)
        errors = [o[0] is RemoteProtocolError for o in outcomes]
        if errors[0] != errors[1]:
            # Malformed input found by one parser before the other (llhttp rejects at
            # the first bad byte, h11 at the end of a line): the other must follow.
            self.failed = errors
            return
        # When both failed, the events parsed before the failure may differ (a leading
        # empty line is skipped by llhttp, refused by h11); they are discarded.
        compared = [o[:3] if errors[0] else o for o in outcomes]
        assert compared[0] == compared[1]

    def teardown(self) -> None:
        if any(self.failed) and self.compare:
            laggard = self.conns[self.failed.index(False)]
            if laggard.their_state is not ClientState.CLOSED:
                with pytest.raises(RemoteProtocolError):
                    laggard.receive_eof()

    @rule(request=st.sampled_from(CLIENT_REQUESTS))
    def request(self, request: Request) -> None:
        self._step(lambda c: c.send(request))

    @rule(data=st.sampled_from([b"", b"x", b"xy", b"xyz"]))
    def body(self, data: bytes) -> None:
        self._step(lambda c: c.send(Data(data)))

    @rule()
    def end(self) -> None:
        self._step(lambda c: c.send(EndOfMessage()))

    @rule(data=response_stream)
    def receive(self, data: bytes) -> None:
        self._step(lambda c: c.receive_data(data))

    @rule()
    def eof(self) -> None:
        self._step(lambda c: c.receive_eof())

    @rule(data=st.binary(min_size=1, max_size=8))
    def garbage(self, data: bytes) -> None:
        # Anything at all: each connection stays valid or raises, but the two may
        # legitimately part ways from here (see response_stream).
        self.compare = False
        self._step(lambda c: c.receive_data(data))

    @rule()
    def switched(self) -> None:
        self._step(lambda c: c.switched_protocol_data())

    @invariant()
    def reusable_means_idle(self) -> None:
        for conn in self.conns:
            assert conn.reusable is (
                conn.our_state is ClientState.IDLE and conn.their_state is ClientState.IDLE
            )


TestClientMachine = ClientMachine.TestCase
TestClientMachine.settings = settings(
    max_examples=300,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
