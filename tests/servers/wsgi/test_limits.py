"""Limits, timeouts and hostile input: each gets its status, and everyone else is served."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.helpers import TIMEOUT, apoll_until
from tests.servers.wsgi.support import echo, exchange, get, hello, port_of, responses, serve


def counting(app: Any) -> tuple[Any, list[str]]:
    calls: list[str] = []

    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        calls.append(environ["PATH_INFO"])
        return app(environ, start_response)

    return wrapped, calls


async def status_of(server: Any, raw: bytes) -> tuple[int, bytes]:
    data = await exchange(server, raw)
    (reply,) = responses(data)
    return reply.status, reply.body


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", 413),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"100000\r\n"
            + b"a" * 0x100000
            + b"\r\n"
            + b"10\r\n"
            + b"a" * 16
            + b"\r\n0\r\n\r\n",
            413,
        ),
        # Smuggling and malformed framing (as strict as gunicorn 25+).
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: x\n\n", 400),
        (b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ],
    ids=[
        "414-request-line",
        "431-header-bytes",
        "431-header-count",
        "413-content-length",
        "413-chunked",
        "400-cl-and-te",
        "400-differing-cl",
        "400-bad-chunk-size",
        "400-obs-fold",
        "400-bad-header-name",
        "400-bare-lf",
        "400-non-ascii-target",
        "400-no-host",
        "505-http2",
        "400-te-in-http10",
        "501-unknown-coding",
    ],
)
async def test_bad_requests_get_their_status_and_never_reach_the_app(
    raw: bytes, status: int
) -> None:
    app, calls = counting(echo)
    # Inline mode collects the whole body first, so nothing bad ever reaches the app.
    async with serve(app, threads=0) as server:
        got, body = await status_of(server, raw)
        assert got == status
        assert body.startswith(str(status).encode())  # a short body naming the problem
        assert calls == []
        # The server keeps serving everyone else.
        again, _ = await status_of(server, get(extra="Connection: close\r\n"))
        assert again == 200
        assert server.rejected == 1


async def test_chunked_body_over_the_limit_while_a_thread_reads_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"100000\r\n"
        + b"a" * 0x100000
        + b"\r\n"
        + b"10\r\n"
        + b"a" * 16
        + b"\r\n0\r\n\r\n"
    )
    async with serve(echo, threads=2) as server:
        data = await exchange(server, raw)
        await apoll_until(lambda: "request body failed" in caplog.text)
        assert server.app_errors == 0
    assert [r.status for r in responses(data)] == [413]
    assert "ERROR" not in caplog.text


async def test_header_that_never_ends_is_refused_without_growing_memory() -> None:
    """The 431 arrives while the client is still sending: the server did not wait for
    (or buffer) the endless header, it stopped once max_header_bytes was passed."""
    async with serve(hello) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        reply = asyncio.ensure_future(reader.read())  # everything until the server's EOF
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        sent = 0
        async with asyncio.timeout(TIMEOUT):
            while not reply.done() and sent < 4 << 20:  # bounded: 4 MiB at most
                writer.write(b"a" * 4096)
                sent += 4096
                await writer.drain()
                await asyncio.sleep(0)
            data = await reply
        writer.close()
    assert data.startswith(b"HTTP/1.1 431 ")
    assert sent < 1 << 20


async def test_header_timeout_answers_408_and_closes() -> None:
    async with serve(hello, header_timeout=0.2) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
        start = time.monotonic()
        async with asyncio.timeout(TIMEOUT):
            data = await reader.read()
        elapsed = time.monotonic() - start
        writer.close()
        assert server.timed_out == 1
    assert data.startswith(b"HTTP/1.1 408 ")
    assert 0.2 <= elapsed < 0.2 * 1.25 + 1.0


async def test_keepalive_timeout_closes_idle_connections_silently() -> None:
    async with serve(hello, keepalive_timeout=0.2) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(get())
        async with asyncio.timeout(TIMEOUT):
            data = await reader.read()  # the response, then EOF once idle
        writer.close()
    assert len(responses(data)) == 1
    assert data.endswith(b"Hello, world!")


async def test_stalled_body_gets_408() -> None:
    async with serve(echo, body_timeout=0.2, threads=2) as server:
        data = await exchange(
            server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234"
        )
    assert data.startswith(b"HTTP/1.1 408 ")


async def test_connections_above_max_get_503_and_the_listener_keeps_going() -> None:
    async with serve(hello, max_connections=2) as server:
        held = [await asyncio.open_connection("127.0.0.1", port_of(server)) for _ in range(2)]
        await apoll_until(lambda: len(server.connections) == 2)
        refused = await exchange(server, get())
        assert responses(refused)[0].status == 503
        for _, writer in held:
            writer.close()
        await apoll_until(lambda: len(server.connections) == 0)
        ok = await exchange(server, get(extra="Connection: close\r\n"))
    assert responses(ok)[0].status == 200


async def test_slowloris_does_not_stop_a_normal_client() -> None:
    """Hundreds of clients dribbling a head byte by byte; a normal client is served fast."""
    async with serve(hello, header_timeout=5.0) as server:
        port = port_of(server)
        slow = []
        for _ in range(200):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\n")
            slow.append((reader, writer))
        for i in range(3):  # each slow client sends one more byte, several times
            for _, writer in slow:
                writer.write(b"X-a: b\r\n"[i : i + 1])
            start = time.monotonic()
            data = await exchange(server, get(extra="Connection: close\r\n"))
            assert responses(data)[0].status == 200
            assert time.monotonic() - start < 1.0
        assert len(server.connections) >= 200
        for _, writer in slow:
            writer.close()


@pytest.mark.parametrize("threads", [0, 2], ids=["inline", "threaded"])
async def test_a_client_that_does_not_read_pauses_a_streaming_response(threads: int) -> None:
    produced = 0

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        nonlocal produced
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        for _ in range(10_000):  # 640 MiB if nothing stopped it
            produced += 1
            yield b"x" * 65536

    async with serve(app, validate=False, threads=threads, write_timeout=None) as server:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.transport.pause_reading()  # type: ignore[attr-defined]
        writer.write(get())
        await apoll_until(lambda: produced > 0)
        await apoll_until(lambda: any(c.write_paused for c in server.connections))
        at_pause = produced
        await asyncio.sleep(0.2)  # not synchronisation: checks that nothing moves meanwhile
        assert produced == at_pause < 200  # bounded by the socket buffers, not the body
        writer.close()


async def test_abort_ends_a_graceful_close_stuck_behind_a_client_that_does_not_read() -> None:
    """A graceful close waits for the write buffer to drain; with a client that does not
    read it never does. The write timeout and the shutdown deadline then abort, which must
    not be a no-op because a close was already asked for (a race between an app thread's
    write timeout and the server's: the connection, and a uvloop loop.close(), hung)."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        for _ in range(10_000):
            yield b"x" * 65536

    async with serve(app, validate=False, threads=0, write_timeout=None) as server:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.transport.pause_reading()  # type: ignore[attr-defined]
        writer.write(get())
        await apoll_until(lambda: any(c.write_paused for c in server.connections))
        (conn,) = server.connections
        conn._close()  # graceful: stays open while unsent bytes wait for the client
        assert server.connections == {conn}
        conn.abort()
        await apoll_until(lambda: not server.connections)
        writer.close()


@pytest.mark.parametrize("streamed", [False, True], ids=["list", "generator"])
async def test_a_client_that_half_closes_mid_body_is_no_app_error(
    streamed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The app answers without reading the body, but only after the client has cut its
    request short (EOF mid-body): nothing is owed, and it is not the app's error."""
    import threading

    go = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        go.wait(TIMEOUT)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b for b in [b"late"]) if streamed else [b"late"]

    async with serve(app, validate=False, threads=2) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
        writer.write_eof()
        await apoll_until(
            lambda: any(c.conn is not None and c.conn.their_eof for c in server.connections)
        )
        go.set()
        async with asyncio.timeout(TIMEOUT):
            await reader.read()
        writer.close()
        await apoll_until(lambda: not server.connections)
        assert server.app_errors == 0
    assert "ERROR" not in caplog.text
