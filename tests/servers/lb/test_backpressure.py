"""Backpressure both ways: a slow reader pauses the other side; memory stays bounded."""

from __future__ import annotations

import asyncio
import socket
import threading

from netstack.config import BalancerLimits
from netstack.servers.lb import Balancer
from netstack.servers.lb.relay import REPLAY_MAX_BYTES, BackendConnection, ClientConnection
from tests.helpers import TIMEOUT, apoll_until
from tests.servers.lb.support import TCPBackend, lb_config, sink_digest
from tests.transport.fakes import RecordingTransport

TOTAL = 16 << 20
HIGH = 64 * 1024
# A paused reader may still have one read in hand: asyncio and uvloop read 256 KiB at most.
SLACK = 256 * 1024


def the_relay(lb: Balancer):
    assert len(lb.connections) == 1
    return next(iter(lb.connections))


def send_total(sock: socket.socket, fill: bytes) -> None:
    """Send TOTAL bytes of ``fill`` in 1 MiB blocks, then half-close."""
    block = fill * (1 << 20)
    for _ in range(TOTAL // len(block)):
        sock.sendall(block)
    sock.shutdown(socket.SHUT_WR)


def receive_all(sock: socket.socket, fill: bytes) -> int:
    """Read to EOF, checking every byte is ``fill``; return how many arrived."""
    got = 0
    while chunk := sock.recv(1 << 20):
        assert chunk == fill * len(chunk)
        got += len(chunk)
    return got


def backend_backed_up(relay) -> bool:
    """The client is paused *because the backend is*: attached, and the client not read.

    Not reading alone is not enough: while the backend connects, the relay also stops
    reading the client once it holds REPLAY_MAX_BYTES for a replay (and resumes on attach).
    """
    return relay.backend_transport is not None and not relay.transport.is_reading()


async def test_slow_client_pauses_the_backend() -> None:
    block = b"\xab" * (1 << 20)

    def flood(conn: socket.socket, backend: TCPBackend) -> None:
        conn.recv(2)
        for _ in range(TOTAL // len(block)):
            conn.sendall(block)

    with TCPBackend(flood) as backend:
        cfg = lb_config(backend.port, limits=BalancerLimits(relay_buffer_bytes=HIGH))
        async with Balancer(cfg) as lb:
            sock = socket.create_connection(lb.address(), timeout=TIMEOUT)
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.sendall(b"go")
                await apoll_until(lambda: lb.connections)
                relay = the_relay(lb)
                await apoll_until(
                    lambda: (
                        relay.backend_transport is not None
                        and not relay.backend_transport.is_reading()
                    )
                )
                assert relay.transport.get_write_buffer_size() <= HIGH + SLACK
                assert await asyncio.to_thread(receive_all, sock, b"\xab") == TOTAL


async def test_slow_backend_pauses_the_client() -> None:
    go = threading.Event()
    received: list[int] = []

    def slow_sink(conn: socket.socket, backend: TCPBackend) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        go.wait(TIMEOUT * 2)
        got = 0
        while chunk := conn.recv(1 << 20):
            got += len(chunk)
        received.append(got)
        conn.sendall(b"%d" % got)

    with TCPBackend(slow_sink) as backend:
        cfg = lb_config(backend.port, limits=BalancerLimits(relay_buffer_bytes=HIGH))
        async with Balancer(cfg) as lb:
            sock = socket.create_connection(lb.address(), timeout=TIMEOUT * 2)
            with sock:
                sender = asyncio.create_task(asyncio.to_thread(send_total, sock, b"\xcd"))
                await apoll_until(lambda: lb.connections)
                relay = the_relay(lb)
                await apoll_until(lambda: backend_backed_up(relay))
                assert relay.backend_transport is not None
                assert relay.backend_transport.get_write_buffer_size() <= HIGH + SLACK
                assert not sender.done()  # the client is blocked, not buffered in us
                go.set()
                await sender
                answer = await asyncio.to_thread(sock.recv, 64)
            assert answer == b"%d" % TOTAL
            assert received == [TOTAL]


async def test_backend_connecting_late_still_pauses_the_client() -> None:
    # The state the flaky wait above mistook for backpressure, made certain: the backend's
    # accept queue is full (listen(0) and one connection nobody accepted), so the
    # balancer's SYN is dropped and its connect waits for the retransmission while the
    # client fills the replay buffer and is paused with no backend. Once attached, the
    # client resumes and is paused again by the backend's backpressure alone.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # what accept() inherits
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    high = 16 * 1024  # well below the REPLAY_MAX_BYTES the client fills while it waits
    cfg = lb_config(port, limits=BalancerLimits(relay_buffer_bytes=high))
    with listener, filler:
        async with Balancer(cfg) as lb:
            sock = socket.create_connection(lb.address(), timeout=TIMEOUT * 2)
            with sock:
                sender = asyncio.create_task(asyncio.to_thread(send_total, sock, b"\xef"))
                await apoll_until(lambda: lb.connections)
                relay = the_relay(lb)
                # Paused at the replay cap, no backend yet.
                await apoll_until(lambda: not relay.transport.is_reading())
                assert relay.backend_transport is None
                assert relay.kept_bytes >= REPLAY_MAX_BYTES
                listener.accept()[0].close()  # room in the queue: the retransmitted SYN lands
                await apoll_until(lambda: backend_backed_up(relay), TIMEOUT * 2)
                # The kept bytes, at most the cap plus one read, and nothing read after them.
                assert relay.backend_transport.get_write_buffer_size() > high
                assert relay.backend_transport.get_write_buffer_size() <= REPLAY_MAX_BYTES + SLACK
                assert not sender.done()
                conn, _ = await asyncio.to_thread(listener.accept)
                with conn:
                    conn.settimeout(TIMEOUT * 2)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                    assert await asyncio.to_thread(receive_all, conn, b"\xef") == TOTAL
                    await sender


class ClientTransport(RecordingTransport):
    """Pausing a paused transport (or resuming a reading one) does nothing, as in asyncio."""

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class BackingUpTransport(RecordingTransport):
    """Sends nothing: past the high-water mark it pauses its protocol, as asyncio does."""

    def write(self, data: bytes) -> None:
        super().write(data)
        self.buffered += len(data)
        assert self.limits is not None
        assert self.protocol is not None
        if self.buffered > self.limits[0]:
            self.protocol.pause_writing()


async def test_kept_bytes_that_back_up_the_backend_keep_the_client_paused() -> None:
    # Off loopback the kept bytes need not fit in the kernel's send buffer: attach() then
    # pauses the client through pause_writing, and must not resume it right after.
    with TCPBackend(sink_digest) as backend:
        high = 16 * 1024
        cfg = lb_config(backend.port, limits=BalancerLimits(relay_buffer_bytes=high))
        async with Balancer(cfg) as lb:
            state = next(iter(lb.listeners.values())).state
            client = ClientConnection(state)
            ct = ClientTransport()
            client.connection_made(ct)  # type: ignore[arg-type]
            try:
                assert client._connect_task is not None
                client._connect_task.cancel()  # the test plays the backend side itself
                client.data_received(b"k" * REPLAY_MAX_BYTES)
                assert not ct.reading  # the replay cap, while "connecting"
                client.backend = state.pool.acquire(0.0)
                side = BackendConnection(client)
                bt = BackingUpTransport()
                bt.protocol = side  # type: ignore[assignment]
                side.connection_made(bt)  # type: ignore[arg-type]
                assert bt.buffered == REPLAY_MAX_BYTES > high
                assert not ct.reading
                side.resume_writing()  # the backend drained
                assert ct.reading
            finally:
                client.connection_lost(None)  # a fake transport reports no loss
