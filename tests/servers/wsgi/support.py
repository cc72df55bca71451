"""Helpers for the WSGI server tests: an in-process server on 127.0.0.1:0 and a raw client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any
from wsgiref.validate import validator

import h11

from netstack.config import TLS, HTTPLimits, HTTPTimeouts, Limits, Timeouts, WSGIServerConfig
from netstack.servers.wsgi import WSGIServer
from tests.helpers import TIMEOUT


def config(**overrides: Any) -> WSGIServerConfig:
    """A test config: port 0, no access log, short timeouts unless overridden."""
    groups: dict[str, dict[str, Any]] = {
        "limits": {},
        "http_limits": {},
        "timeouts": {},
        "http_timeouts": {},
        "tls": {},
    }
    classes = {
        "tls": TLS,
        "limits": Limits,
        "http_limits": HTTPLimits,
        "timeouts": Timeouts,
        "http_timeouts": HTTPTimeouts,
    }
    top: dict[str, Any] = {"bind": ("127.0.0.1:0",), "access_log": False}
    for key, value in overrides.items():
        for group, cls in classes.items():
            if key in {f.name for f in dataclasses.fields(cls)}:
                groups[group][key] = value
                break
        else:
            top[key] = value
    return WSGIServerConfig(**top, **{g: classes[g](**v) for g, v in groups.items()})


@contextlib.asynccontextmanager
async def serve(
    app: Callable[..., Any], *, validate: bool = True, **overrides: Any
) -> AsyncIterator[WSGIServer]:
    """Run ``app`` (wrapped in wsgiref.validate unless told not to) on 127.0.0.1:0."""
    server = WSGIServer(config(**overrides), validator(app) if validate else app)
    await server.start()
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


def port_of(server: WSGIServer) -> int:
    return int(server.addresses[0][1])


async def exchange(
    server: WSGIServer, raw: bytes, *, until_close: bool = True, expect: int = 1
) -> bytes:
    """Send ``raw`` and return everything read until the server closes (or ``expect``
    complete responses arrived, when ``until_close`` is False)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
    try:
        writer.write(raw)
        await writer.drain()
        data = b""
        async with asyncio.timeout(TIMEOUT):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return data
                data += chunk
                if not until_close and len(responses(data)) >= expect:
                    return data
    finally:
        writer.close()


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_headers: list[tuple[bytes, bytes]]


def responses(data: bytes, methods: list[bytes] | None = None) -> list[Reply]:
    """Parse the complete responses in ``data`` with h11 (the reference parser).

    ``methods`` gives the request method of each response (HEAD has no body).
    """
    out: list[Reply] = []
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    index = 0
    while True:
        method = methods[index] if methods and index < len(methods) else b"GET"
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return out  # the rest (if any) is an incomplete response
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = [(bytes(n), bytes(v)) for n, v in event.headers]
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                out.append(
                    Reply(
                        status,
                        {n.decode(): v.decode("latin-1") for n, v in headers},
                        body,
                        headers,
                    )
                )
                break
            elif isinstance(event, h11.ConnectionClosed):
                return out
        index += 1
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return out
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return out


def get(path: str = "/", *, host: str = "x", extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: {host}\r\n{extra}\r\n".encode("latin-1")


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [b"Hello, world!"]


def echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Answers with the method, path, query and body it saw."""
    parts = []
    while chunk := environ["wsgi.input"].read(65536):  # validate wants a size
        parts.append(chunk)
    body = b"".join(parts)
    text = (
        f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} "
        f"{environ['QUERY_STRING']} {len(body)}\n"
    ).encode("latin-1") + body
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [text]
