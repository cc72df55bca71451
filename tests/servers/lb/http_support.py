"""L7 test helpers: an h11 client for the proxy and raw-socket HTTP backends."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Callable
from typing import Any

import h11

from netstack.config import BalancerConfig, BalancerTimeouts, HealthConfig
from tests.helpers import TIMEOUT
from tests.servers.lb.support import TCPBackend, lb_config


def http_config(
    *ports: int,
    timeouts: BalancerTimeouts | None = None,
    health: HealthConfig | None = None,
    **frontend: Any,
) -> BalancerConfig:
    cfg = lb_config(*ports, mode="http", timeouts=timeouts, health=health)
    if frontend:
        fe = dataclasses.replace(cfg.frontends[0], **frontend)
        cfg = dataclasses.replace(cfg, frontends=(fe,))
    return cfg


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """One keep-alive client connection to the proxy, parsed with h11."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = h11.Connection(h11.CLIENT)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Client:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.writer is not None
        self.writer.close()

    async def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> Reply:
        assert self.writer is not None
        conn = self.conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        hdrs = list(headers or [])
        if not any(n.lower() == "host" for n, _ in hdrs):
            hdrs.insert(0, ("host", "example.test"))
        if body:
            hdrs.append(("content-length", str(len(body))))
        self.writer.write(conn.send(h11.Request(method=method, target=target, headers=hdrs)))
        if body:
            self.writer.write(conn.send(h11.Data(data=body)))
        self.writer.write(conn.send(h11.EndOfMessage()))
        return await self.read_reply()

    async def read_reply(self) -> Reply:
        assert self.reader is not None
        conn = self.conn
        status = 0
        headers: dict[str, str] = {}
        body = b""
        async with asyncio.timeout(TIMEOUT):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await self.reader.read(65536))
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {n.decode(): v.decode() for n, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return Reply(status, headers, body)
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionResetError("closed before a response")


async def get(port: int, target: str = "/", **kw: Any) -> Reply:
    async with Client(port) as client:
        return await client.request("GET", target, **kw)


async def raw(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        out = b""
        async with asyncio.timeout(TIMEOUT):
            while chunk := await reader.read(65536):
                out += chunk
        return out
    finally:
        writer.close()


Responder = Callable[[h11.Request, bytes, "TCPBackend"], tuple[int, list[tuple[str, str]], bytes]]


def http_backend(respond: Responder, name: str = "b") -> TCPBackend:
    """A thread-per-connection keep-alive HTTP/1.1 server (h11) answering with ``respond``.

    ``backend.requests`` counts the requests that reached it.
    """

    def handler(sock: socket.socket, backend: TCPBackend) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return
                continue
            if isinstance(event, h11.Request):
                request, body = event, b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                with backend.lock:
                    backend.requests += 1  # type: ignore[attr-defined]
                status, headers, out = respond(request, body, backend)
                headers = [*headers, ("content-length", str(len(out)))]
                head = conn.send(h11.Response(status_code=status, headers=headers))
                sock.sendall(head + conn.send(h11.Data(data=out)) + conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return

    backend = TCPBackend(handler, name=name)
    backend.requests = 0  # type: ignore[attr-defined]
    return backend


def name_and_path(request: h11.Request, body: bytes, backend: TCPBackend):
    return 200, [("content-type", "text/plain")], backend.name.encode() + b" " + request.target
