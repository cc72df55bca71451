"""The floor: a minimal inline WSGI server on uvloop + httptools (no limits, no timers).

Not a product: the yardstick bench/cpu.py measures ``netstack serve --threads 0``
against (issue 4). Keep-alive and pipelining only; no body, no checks, no chunking.

    python bench/sketch_wsgi.py MODULE:APP PORT
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from email.utils import formatdate
from typing import Any

import httptools
import uvloop


class Sketch(asyncio.Protocol):
    def __init__(self, app: Any) -> None:
        self.app = app
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        path, _, query = self.url.decode("latin-1").partition("?")
        environ = {
            "REQUEST_METHOD": self.parser.get_method().decode("ascii"),
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.input": None,
        }
        for name, value in self.headers:
            key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
            environ[key] = value.decode("latin-1")
        self.url = b""
        self.headers = []
        status_headers: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc: Any = None) -> None:
            status_headers[:] = [status, headers]

        body = b"".join(self.app(environ, start_response))
        status, headers = status_headers
        lines = [f"HTTP/1.1 {status}\r\n", "server: sketch\r\n", f"date: {DATE}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        self.transport.write("".join(lines).encode("latin-1") + b"\r\n" + body)
        if not self.parser.should_keep_alive():
            self.transport.close()


DATE = formatdate(usegmt=True)


def main() -> None:
    module, _, name = sys.argv[1].partition(":")
    app = getattr(importlib.import_module(module), name)
    loop = uvloop.new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(lambda: Sketch(app), "127.0.0.1", int(sys.argv[2]), backlog=2048)
    )
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
