"""Pipelining under arbitrary splits, slow readers and graceful close, in process."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from typing import Any

import pytest

from tests.helpers import TIMEOUT, apoll_until
from tests.servers.wsgi.support import echo, get, port_of, responses, serve


async def test_100_pipelined_requests_in_random_pieces_are_answered_in_order() -> None:
    raw = b"".join(get(f"/{i}") for i in range(99)) + get("/99", extra="Connection: close\r\n")
    rng = random.Random(4)
    async with serve(echo, threads=0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        position = 0
        while position < len(raw):  # bounded by len(raw)
            step = rng.choice([1, 2, 3, 7, 50, 400])
            writer.write(raw[position : position + step])
            position += step
            await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            data = await reader.read()
        writer.close()
    paths = [r.body.split(b" ")[1] for r in responses(data)]
    assert paths == [f"/{i}".encode() for i in range(100)]


@pytest.mark.parametrize("threads", [0, 2], ids=["inline", "threaded"])
async def test_a_client_that_stops_reading_is_cut_after_write_timeout(threads: int) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        for _ in range(10_000):  # far more than the socket buffers hold
            yield b"x" * 65536

    async with serve(app, validate=False, threads=threads, write_timeout=0.3) as server:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.transport.pause_reading()  # type: ignore[attr-defined]
        writer.write(get())
        await apoll_until(lambda: server.timed_out == 1)
        await apoll_until(lambda: not server.connections)
        writer.close()


async def test_graceful_close_finishes_in_flight_requests_and_closes_idle_ones() -> None:
    release = threading.Event()
    started = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/slow":
            started.set()
            release.wait(TIMEOUT)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]

    server_cm = serve(app, threads=2)
    server = await server_cm.__aenter__()
    try:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        idle_writer.write(get("/fast"))
        async with asyncio.timeout(TIMEOUT):
            await idle_reader.readuntil(b"done\r\n0\r\n\r\n")  # validate makes it chunked
        busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        busy_writer.write(get("/slow"))
        await apoll_until(started.is_set)
        server.close()
        async with asyncio.timeout(TIMEOUT):
            assert await idle_reader.read() == b""  # the idle keep-alive connection is closed
        release.set()
        async with asyncio.timeout(TIMEOUT):
            data = await busy_reader.read()  # the in-flight response, then close
        assert responses(data)[0].body == b"done"
        assert responses(data)[0].headers["connection"] == "close"
        idle_writer.close()
        busy_writer.close()
    finally:
        release.set()
        await server_cm.__aexit__(None, None, None)


async def test_connections_still_in_the_accept_queue_at_close_are_answered() -> None:
    # Closing a listener resets what its accept queue holds: a client that connected and
    # sent its request would see ECONNRESET on a fresh connection (the SIGTERM-under-load
    # flake). The loop gets no turn between these connects and close(), so both are still
    # queued when _shutdown runs; each is answered once, with Connection: close.
    async with serve(echo, threads=0) as server:
        port = port_of(server)
        clients = []
        for i in range(2):
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            sock.sendall(get(f"/queued{i}"))
            clients.append(sock)
        server.close()

        def read_all(sock: socket.socket) -> bytes:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

        for i, sock in enumerate(clients):
            with sock:
                data = await asyncio.to_thread(read_all, sock)
            (response,) = responses(data)
            assert response.status == 200
            assert response.body.startswith(f"GET /queued{i} ".encode())
            assert b"connection: close" in data.lower()
        await server.wait_closed()
