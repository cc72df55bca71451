"""Load tests/data/http11 and run a case through a connection, for the corpus tests.

A case is ``NNN.http`` (raw bytes) plus ``NNN.toml``: ``description``; optional
``eof`` (feed the end of the stream after the bytes), ``switch`` (answer an upgrade or
CONNECT with 101 instead of a 200), a ``[limits]`` table (``HTTPLimits`` fields); then
either ``status`` (invalid cases: the ``status_hint`` of the error) or ``[[events]]``
(valid cases), each with a ``type``: ``request`` (``method``, ``target``, ``headers`` as
``[name, value]`` pairs, and the ``Request`` fields that differ from their defaults:
``version``, ``keep_alive``, ``upgrade``, ``expect_continue``, ``chunked``,
``content_length``), ``data`` (``data``; consecutive pieces are joined before comparing,
since splits cut bodies differently), ``end`` (``trailers``), ``closed``, or ``raw``
(bytes after a protocol switch). Strings are bytes as latin-1.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netstack.config import HTTPLimits
from netstack.errors import RemoteProtocolError
from netstack.proto.http11 import (
    ConnectionClosed,
    Data,
    EndOfMessage,
    HTTPConnection,
    InformationalResponse,
    Request,
    State,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "http11"
PARSERS = ("httptools", "h11")


@dataclass
class Case:
    name: str
    raw: bytes
    description: str
    limits: HTTPLimits
    eof: bool = False
    switch: bool = False
    status: int | None = None
    events: list[tuple[Any, ...]] = field(default_factory=list)


def _b(text: str) -> bytes:
    return text.encode("latin-1")


def _headers(pairs: list[list[str]]) -> list[tuple[bytes, bytes]]:
    return [(_b(n), _b(v)) for n, v in pairs]


def _expected(spec: dict[str, Any]) -> tuple[Any, ...]:
    kind = spec["type"]
    if kind == "request":
        upgrade = spec.get("upgrade")
        return (
            "request",
            Request(
                _b(spec["method"]),
                _b(spec["target"]),
                _headers(spec["headers"]),
                _b(spec.get("version", "1.1")),
                spec.get("keep_alive", True),
                None if upgrade is None else _b(upgrade),
                spec.get("expect_continue", False),
                spec.get("chunked", False),
                spec.get("content_length"),
            ),
        )
    if kind in ("data", "raw"):
        return (kind, _b(spec["data"]))
    if kind == "end":
        return ("end", _headers(spec.get("trailers", [])))
    assert kind == "closed", kind
    return ("closed",)


def load(kind: str) -> list[Case]:
    cases = []
    for path in sorted((DATA / kind).glob("*.toml")):
        spec = tomllib.loads(path.read_text())
        case = Case(
            name=f"{kind}/{path.stem}",
            raw=path.with_suffix(".http").read_bytes(),
            description=spec["description"],
            limits=HTTPLimits(**spec.get("limits", {})),
            eof=spec.get("eof", kind == "invalid"),
            switch=spec.get("switch", False),
            status=spec.get("status"),
            events=[_expected(e) for e in spec.get("events", [])],
        )
        cases.append(case)
    return cases


def normalise(events: list[Any]) -> list[tuple[Any, ...]]:
    """Events as comparable tuples, consecutive Data (and raw) pieces joined."""
    out: list[tuple[Any, ...]] = []
    for event in events:
        if isinstance(event, tuple):  # ("raw", bytes) from the harness
            item: tuple[Any, ...] = event
        elif isinstance(event, Request):
            item = ("request", event)
        elif isinstance(event, Data):
            item = ("data", event.data)
        elif isinstance(event, EndOfMessage):
            item = ("end", list(event.headers))
        else:
            assert isinstance(event, ConnectionClosed)
            item = ("closed",)
        if out and item[0] in ("data", "raw") and out[-1][0] == item[0]:
            out[-1] = (item[0], out[-1][1] + item[1])
        elif item[0] in ("data", "raw") and not item[1]:
            continue
        else:
            out.append(item)
    return out


class Server:
    """A server-role connection answered the way a server would: 200 (or 101 when asked
    to switch and ``switch``) as soon as each request is complete."""

    def __init__(self, parser: str, limits: HTTPLimits, switch: bool = False) -> None:
        self.conn = HTTPConnection(limits, parser)
        self.switch = switch
        self.events: list[Any] = []
        self.sent: list[bytes] = []

    def feed(self, data: bytes) -> None:
        conn = self.conn
        if conn.our_state is State.SWITCHED_PROTOCOL:
            conn.receive_data(data)
            self.events.append(("raw", conn.switched_protocol_data()))
            return
        conn.receive_data(data)
        self._drain()

    def eof(self) -> None:
        self.conn.receive_eof()
        self._drain()

    def _drain(self) -> None:
        conn = self.conn
        while True:
            events = conn.events_received()
            if not events:
                return
            for event in events:
                self.events.append(event)
                if type(event) is EndOfMessage:
                    self._answer()

    def _answer(self) -> None:
        conn = self.conn
        request = conn.current_request
        assert request is not None
        if self.switch and request.upgrade is not None:
            conn.send(InformationalResponse(101, [(b"upgrade", request.upgrade)]))
            self.events.append(("raw", conn.switched_protocol_data()))
        else:
            conn.send_response(200, [(b"content-length", b"2")], b"ok")
        self.sent.extend(conn.data_to_send())


def run(case: Case, parser: str, chunks: list[bytes]) -> tuple[list[Any], int | None]:
    """Feed ``chunks`` (then EOF if the case says so); return (events, error status)."""
    server = Server(parser, case.limits, case.switch)
    try:
        for chunk in chunks:
            server.feed(chunk)
        if case.eof:
            server.eof()
    except RemoteProtocolError as exc:
        assert server.conn.our_state is State.CLOSED
        return normalise(server.events), exc.status_hint
    return normalise(server.events), None
