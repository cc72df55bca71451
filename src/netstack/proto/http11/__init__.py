"""The HTTP/1.1 core shared by the WSGI server and the L7 balancer (sans I/O).

``events`` (what is parsed and sent), ``parse`` (two parsers, httptools and h11, behind
one interface), ``write`` (serialising heads and chunks) and ``connection`` (the
server-role state machine), ``client`` (the client role, for the balancer).
"""

from netstack.proto.http11.client import ClientState, HTTPClientConnection
from netstack.proto.http11.connection import Framing, HTTPConnection, State
from netstack.proto.http11.events import (
    END_OF_MESSAGE,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    Headers,
    InformationalResponse,
    Request,
    Response,
)

__all__ = [
    "END_OF_MESSAGE",
    "ClientState",
    "ConnectionClosed",
    "Data",
    "EndOfMessage",
    "Event",
    "Framing",
    "HTTPClientConnection",
    "HTTPConnection",
    "Headers",
    "InformationalResponse",
    "Request",
    "Response",
    "State",
]
