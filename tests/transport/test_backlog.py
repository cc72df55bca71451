"""Closing a listener without resetting its accept queue: real sockets on 127.0.0.1."""

from __future__ import annotations

import errno
import socket
import sys

import pytest

from netstack.transport.backlog import accept_pending, refuse_new_connections
from tests.helpers import TIMEOUT

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SO_ATTACH_FILTER is Linux's"
)


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def connect_nowait(port: int) -> socket.socket:
    """A non-blocking connect: on loopback the handshake is done (or dropped) on return."""
    client = socket.socket()
    client.setblocking(False)
    assert client.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
    return client


def test_accept_pending_takes_every_queued_connection_and_returns_when_empty() -> None:
    with listener() as lsock:
        port = lsock.getsockname()[1]
        clients = [connect_nowait(port) for _ in range(3)]
        try:
            accepted = accept_pending(lsock)
            assert sorted(c.getpeername() for c in accepted) == sorted(
                c.getsockname() for c in clients
            )
            assert all(not c.getblocking() for c in accepted)
            assert accept_pending(lsock) == []
        finally:
            for s in [*clients, *accepted]:
                s.close()


@linux_only
def test_refused_listener_keeps_its_queue_but_completes_no_new_handshake() -> None:
    with listener() as lsock:
        port = lsock.getsockname()[1]
        queued = connect_nowait(port)
        assert refuse_new_connections(lsock)
        late = connect_nowait(port)  # its SYN is dropped: no connection to accept
        try:
            accepted = accept_pending(lsock)
            assert [c.getpeername() for c in accepted] == [queued.getsockname()]
            accepted[0].sendall(b"served")
            queued.settimeout(TIMEOUT)
            assert queued.recv(16) == b"served"
            with pytest.raises(OSError, match="not connected"):
                late.getpeername()  # still connecting: SYN_SENT
        finally:
            for s in [queued, late, *accepted]:
                s.close()


def test_refuse_new_connections_leaves_other_sockets_alone() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        assert not refuse_new_connections(unix)
