"""TCP echo server over real loopback sockets, on both loops."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from netstack.config import TLS, Limits, Timeouts
from tests.helpers import TIMEOUT, apoll_until
from tests.transport.support import (
    client,
    echo_server,
    frame,
    read_eof,
    read_frame,
    server_config,
)


@pytest.mark.parametrize("framing", ["length", "line"])
async def test_echo_many_frames_in_one_write_and_split_across_writes(framing):
    payloads = [b"hello", b"", b"x" * 5000, b"last one"]
    if framing == "length":
        wire = b"".join(frame(p) for p in payloads)
    else:
        payloads = [p for p in payloads if p] + [b"crlf"]
        wire = b"".join(p + b"\n" for p in payloads[:-1]) + b"crlf\r\n"
    async with (
        echo_server(server_config(framing=framing)) as srv,
        client(srv.addresses[0]) as (
            reader,
            writer,
        ),
    ):
        writer.write(wire)  # many frames in one write
        # then the same frames cut at awkward points
        for i in range(0, len(wire), 7):
            writer.write(wire[i : i + 7])
            await writer.drain()
        expected = payloads * 2
        if framing == "length":
            got = [await read_frame(reader) for _ in expected]
            assert got == expected
        else:
            async with asyncio.timeout(TIMEOUT):
                got = [(await reader.readline()).rstrip(b"\n") for _ in expected]
            assert got == expected


async def test_ipv6():
    async with echo_server(server_config("[::1]:0")) as srv:
        host, port = srv.addresses[0]
        assert host == "::1"
        async with client((host, port)) as (reader, writer):
            writer.write(frame(b"over v6"))
            assert await read_frame(reader) == b"over v6"


async def test_tls(tls_certs):
    cfg = server_config(tls=TLS(certfile=tls_certs.certfile, keyfile=tls_certs.keyfile))
    ctx = ssl.create_default_context(cafile=tls_certs.cafile)
    async with echo_server(cfg) as srv:
        assert srv.name == "tls"
        async with client(srv.addresses[0], ssl=ctx) as (reader, writer):
            writer.write(frame(b"secret"))
            assert await read_frame(reader) == b"secret"


async def test_oversize_frame_closes_that_connection_only(logs):
    cfg = server_config(limits=Limits(max_frame_bytes=100))
    async with (
        echo_server(cfg) as srv,
        client(srv.addresses[0]) as (r1, w1),
        client(srv.addresses[0]) as (r2, w2),
    ):
        # A frame accepted before the bad header is still echoed: nothing accepted is lost.
        w1.write(frame(b"ok") + frame(b"y" * 101))
        assert await read_frame(r1) == b"ok"
        assert await read_eof(r1) == b""
        warnings = logs.messages()
        assert any("max_frame_bytes" in m for m in warnings), warnings
        assert not any(r.exc_info for r in logs.records)
        for i in range(3):
            w2.write(frame(b"still here %d" % i))
            assert await read_frame(r2) == b"still here %d" % i


async def test_line_too_long_closes(logs):
    cfg = server_config(framing="line", limits=Limits(max_line_bytes=10))
    async with echo_server(cfg) as srv, client(srv.addresses[0]) as (reader, writer):
        writer.write(b"short\n" + b"z" * 50)
        assert await reader.readline() == b"short\n"
        assert await read_eof(reader) == b""
    assert any("max_line_bytes" in m for m in logs.messages())


async def test_half_frame_then_silence_hits_idle_timeout(logs):
    cfg = server_config(timeouts=Timeouts(idle_timeout=0.2, graceful_timeout=TIMEOUT))
    async with echo_server(cfg) as srv, client(srv.addresses[0]) as (reader, writer):
        writer.write(frame(b"complete") + frame(b"0123456789")[:7])
        assert await read_frame(reader) == b"complete"
        assert await read_eof(reader) == b""
        await apoll_until(lambda: not srv.connections)
    assert any("idle" in m and "inside a frame" in m for m in logs.messages())


async def test_truncated_frame_at_eof_is_a_warning(logs):
    async with echo_server() as srv, client(srv.addresses[0]) as (reader, writer):
        writer.write(frame(b"abc")[:5])
        writer.write_eof()
        assert await read_eof(reader) == b""
    assert any("inside a frame" in m for m in logs.messages())


async def test_client_that_never_reads_pauses_server_reading():
    high, low = 64 * 1024, 16 * 1024
    cfg = server_config(limits=Limits(write_buffer_high_bytes=high, write_buffer_low_bytes=low))
    async with echo_server(cfg) as srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, srv.addresses[0])
            await apoll_until(lambda: len(srv.connections) == 1)
            (conn,) = srv.connections
            chunk = frame(b"p" * 4092) * 16  # 64 KiB of frames per send
            sent = 0

            async def pump_until_blocked() -> None:
                nonlocal sent
                while True:
                    try:
                        # resume mid-frame after a partial send: the stream is 4 KiB frames
                        sent += sock.send(chunk[sent % 4096 :])
                    except BlockingIOError:
                        if conn.flow.reading_paused:
                            return
                        await asyncio.sleep(0.005)

            async with asyncio.timeout(TIMEOUT):
                await pump_until_blocked()
            assert conn.flow.pauses >= 1
            # Bounded: the unsent echo stays near the high-water mark (plus one read's worth).
            bound = high + 512 * 1024
            assert conn.transport.get_write_buffer_size() <= bound
            assert conn.codec.buffered <= bound
            # Reading the echoes resumes the server; every byte comes back once the last
            # (partly sent) frame is completed.
            tail = chunk[sent % 4096 : 4096] if sent % 4096 else b""
            finish = asyncio.create_task(loop.sock_sendall(sock, tail))
            sent += len(tail)
            received = 0
            async with asyncio.timeout(TIMEOUT):
                await finish
                while received < sent:
                    data = await loop.sock_recv(sock, 1 << 16)
                    assert data
                    received += len(data)
            assert received == sent
            assert not conn.flow.reading_paused
        finally:
            sock.close()


async def test_max_connections_refuses_extra(logs):
    cfg = server_config(limits=Limits(max_connections=1))
    async with echo_server(cfg) as srv, client(srv.addresses[0]) as (r1, w1):
        w1.write(frame(b"first"))
        assert await read_frame(r1) == b"first"
        async with client(srv.addresses[0]) as (r2, _w2):
            assert await read_eof(r2) == b""
        assert srv.refused == 1
        w1.write(frame(b"first still served"))
        assert await read_frame(r1) == b"first still served"
    assert any("max_connections=1" in m for m in logs.messages())


async def test_graceful_close_finishes_in_flight_frame_then_closes():
    srv_cm = echo_server()
    srv = await srv_cm.__aenter__()
    try:
        async with (
            client(srv.addresses[0]) as (busy_r, busy_w),
            client(srv.addresses[0]) as (
                idle_r,
                _idle_w,
            ),
        ):
            await apoll_until(lambda: len(srv.connections) == 2)
            whole = frame(b"in flight")
            busy_w.write(whole[:6])
            await apoll_until(lambda: any(c.busy() for c in srv.connections))
            srv.close()
            assert await read_eof(idle_r) == b""  # idle connection closed at once
            assert len(srv.connections) == 1  # the busy one is still being served
            busy_w.write(whole[6:])
            assert await read_frame(busy_r) == b"in flight"
            assert await read_eof(busy_r) == b""
            async with asyncio.timeout(TIMEOUT):
                await srv.wait_closed()
            assert not srv.connections
    finally:
        await srv_cm.__aexit__(None, None, None)


async def test_graceful_timeout_aborts_stragglers(logs):
    cfg = server_config(timeouts=Timeouts(graceful_timeout=0.1))
    async with echo_server(cfg) as srv, client(srv.addresses[0]) as (reader, writer):
        writer.write(frame(b"never finished")[:5])
        await apoll_until(lambda: any(c.busy() for c in srv.connections))
        srv.close()
        async with asyncio.timeout(TIMEOUT):
            await srv.wait_closed()
        assert await read_eof(reader) == b""
    assert any("graceful_timeout" in m for m in logs.messages())


async def test_serve_forever_returns_after_request_stop():
    async with echo_server() as srv:
        addr = srv.addresses[0]
        task = asyncio.create_task(srv.serve_forever())
        srv.request_stop()
        async with asyncio.timeout(TIMEOUT):
            await task
        assert srv.addresses == []
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*addr)


async def test_bind_in_use_raises_oserror():
    async with echo_server() as srv:
        host, port = srv.addresses[0]
        other = echo_server(server_config(f"{host}:{port}"))
        with pytest.raises(OSError, match="in use"):
            await other.__aenter__()
