"""Every model serves the framed echo protocol the same way (real sockets on 127.0.0.1)."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading

import pytest

from tests.helpers import TIMEOUT, poll_until, splits
from tests.servers.models.support import (
    CONCURRENT_IDS,
    MODEL_IDS,
    closed_by_peer,
    echo,
    frame,
    recv_exact,
    running,
)

PAYLOADS = [b"", b"x", os.urandom(4096), os.urandom(200_000)]


@pytest.fixture
def caplog_netstack(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    # The CLI's log.configure() may have set propagate=False on "netstack" earlier in the
    # session; caplog listens on the root logger.
    monkeypatch.setattr(logging.getLogger("netstack"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="netstack")
    return caplog


@pytest.mark.parametrize("model", CONCURRENT_IDS)
def test_concurrent_clients_interleaved(model: str) -> None:
    with running(model) as srv:
        clients = [srv.connect() for _ in range(4)]
        try:
            for round_ in range(3):
                for i, client in enumerate(clients):
                    payload = f"{model} client {i} round {round_}".encode()
                    assert echo(client, payload) == payload
            for client in clients:
                for payload in PAYLOADS:
                    assert echo(client, payload) == payload
        finally:
            for client in clients:
                client.close()
        poll_until(lambda: srv.server.stats.snapshot().messages == 4 * (3 + len(PAYLOADS)))
        snap = srv.server.stats.snapshot()
        assert snap.connections == 4
        assert snap.payload_bytes == sum(
            len(f"{model} client {i} round {r}") for i in range(4) for r in range(3)
        ) + 4 * sum(map(len, PAYLOADS))


@pytest.mark.parametrize("model", MODEL_IDS)
def test_clients_in_parallel_threads(model: str) -> None:
    """Several clients at once; the blocking model serves them one after another."""
    errors: list[BaseException] = []

    def client(srv, i: int) -> None:
        try:
            with srv.connect() as sock:
                for n in range(20):
                    payload = f"{i}:{n}".encode() * (n + 1)
                    assert echo(sock, payload) == payload
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    with running(model) as srv:
        threads = [threading.Thread(target=client, args=(srv, i)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        assert not errors
        poll_until(lambda: srv.server.stats.snapshot().messages == 100)
        assert srv.server.stats.snapshot().connections == 5


@pytest.mark.parametrize("model", MODEL_IDS)
def test_frames_split_across_sends(model: str) -> None:
    payload = bytes(range(256)) * 3
    with running(model) as srv, srv.connect() as sock:
        for pieces in splits(frame(payload) + frame(b"tail"), seed=3):
            for piece in pieces:
                sock.sendall(piece)
            assert recv_exact(sock, 4 + len(payload)) == frame(payload)
            assert recv_exact(sock, 8) == frame(b"tail")
        # Two frames in one send come back as two frames.
        sock.sendall(frame(b"one") + frame(b"two"))
        assert recv_exact(sock, 14) == frame(b"one") + frame(b"two")


@pytest.mark.parametrize("model", MODEL_IDS)
def test_oversize_frame_closes_only_that_connection(model: str, caplog_netstack) -> None:
    with running(model, max_frame_bytes=1024) as srv:
        good = srv.connect() if model != "blocking" else None
        try:
            if good is not None:
                assert echo(good, b"before") == b"before"
            with srv.connect() as bad:
                # A frame accepted before the bad header is still echoed, then the close.
                bad.sendall(frame(b"ok") + struct.pack("!I", 1025))
                assert recv_exact(bad, 6) == frame(b"ok")
                assert closed_by_peer(bad)
            if good is None:  # blocking: the next client is served once `bad` is gone
                good = srv.connect()
            assert echo(good, b"x" * 1024) == b"x" * 1024
        finally:
            if good is not None:
                good.close()
    warnings = [r for r in caplog_netstack.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "max_frame_bytes" in warnings[0].getMessage()
    assert "1024" in warnings[0].getMessage()
    assert warnings[0].exc_info is None  # a peer fault: no traceback


@pytest.mark.parametrize("model", MODEL_IDS)
def test_idle_timeout_closes_half_frame(model: str, caplog_netstack) -> None:
    with running(model, idle_timeout=0.3) as srv, srv.connect() as sock:
        sock.sendall(struct.pack("!I", 100) + b"half")
        assert closed_by_peer(sock)
        poll_until(lambda: "idle_timeout" in caplog_netstack.text)
    assert "idle_timeout=0.3s" in caplog_netstack.text


@pytest.mark.parametrize("model", MODEL_IDS)
def test_active_connection_outlives_idle_timeout(model: str) -> None:
    """The idle timer measures silence, not connection age."""
    with running(model, idle_timeout=0.6) as srv, srv.connect() as sock:
        sock.settimeout(TIMEOUT)
        for _ in range(4):
            assert echo(sock, b"ping") == b"ping"
            # 0.1 s of silence, 0.4 s in total: never silent for 0.6 s at a stretch.
            threading.Event().wait(0.1)
        assert echo(sock, b"still here") == b"still here"


@pytest.mark.parametrize("model", MODEL_IDS)
def test_eof_inside_frame_is_a_warning(model: str, caplog_netstack) -> None:
    with running(model) as srv:
        with srv.connect() as sock:
            sock.sendall(struct.pack("!I", 10) + b"abc")
        poll_until(lambda: "inside a frame" in caplog_netstack.text)
    assert any(
        "inside a frame" in r.getMessage()
        for r in caplog_netstack.records
        if r.levelno == logging.WARNING
    )


@pytest.mark.parametrize("model", MODEL_IDS)
def test_stop_closes_open_connections(model: str) -> None:
    with running(model, idle_timeout=None) as srv:
        sock = srv.connect()
        try:
            assert echo(sock, b"hi") == b"hi"
            srv.stop.set()
            srv.thread.join(TIMEOUT)
            assert not srv.thread.is_alive()
            assert closed_by_peer(sock)
        finally:
            sock.close()


@pytest.mark.parametrize("model", MODEL_IDS)
def test_client_reset_does_not_kill_server(model: str) -> None:
    with running(model) as srv:
        sock = srv.connect()
        # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(frame(b"x" * 100_000))
        sock.close()
        with srv.connect() as other:
            assert echo(other, b"fine") == b"fine"
