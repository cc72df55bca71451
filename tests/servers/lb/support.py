"""Raw-socket backends in threads (so the balancer's loop is the only loop) and configs."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from collections.abc import Callable, Iterator

from netstack.config import (
    BalancerConfig,
    BalancerLimits,
    BalancerQuickConfig,
    BalancerTimeouts,
    HealthConfig,
)
from tests.helpers import TIMEOUT

Handler = Callable[[socket.socket, "TCPBackend"], None]


def lb_config(
    *ports: int,
    mode: str = "tcp",
    algorithm: str = "round_robin",
    health: HealthConfig | None = None,
    limits: BalancerLimits | None = None,
    timeouts: BalancerTimeouts | None = None,
) -> BalancerConfig:
    """Quick-form config: listen on 127.0.0.1:0, one pool of 127.0.0.1 backends."""
    return BalancerQuickConfig(
        listen="127.0.0.1:0",
        backend=tuple(f"127.0.0.1:{p}" for p in ports),
        mode=mode,  # type: ignore[arg-type]
        algorithm=algorithm,  # type: ignore[arg-type]
        health=health or HealthConfig(check_interval=None),
        limits=limits or BalancerLimits(),
        timeouts=timeouts or BalancerTimeouts(),
    ).to_balancer()


def echo_until_eof(conn: socket.socket, backend: TCPBackend) -> None:
    """Echo every byte; on EOF, close (the client then sees EOF after the last byte)."""
    while chunk := conn.recv(1 << 18):
        conn.sendall(chunk)


def reply_line(conn: socket.socket, backend: TCPBackend) -> None:
    """Read one line, answer ``NAME LINE``, close."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    conn.sendall(backend.name.encode() + b" " + data)


def sink_digest(conn: socket.socket, backend: TCPBackend) -> None:
    """Read to EOF, then answer the sha256 of what arrived (one-way upload + half-close)."""
    digest = hashlib.sha256()
    while chunk := conn.recv(1 << 18):
        digest.update(chunk)
    conn.sendall(digest.hexdigest().encode())


class TCPBackend:
    """A thread-per-connection TCP server on 127.0.0.1:0 running ``handler``."""

    def __init__(self, handler: Handler, name: str = "b", port: int = 0) -> None:
        self.name = name
        self.handler = handler
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(512)
        self.port = self.listener.getsockname()[1]
        self.conns: set[socket.socket] = set()
        self.served = 0
        self.lock = threading.Lock()
        self.alive = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.alive:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.conns.add(conn)
                self.served += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn, self)
        except OSError:
            pass
        finally:
            with self.lock:
                self.conns.discard(conn)
            conn.close()

    def kill(self) -> None:
        """Like the process dying: the listener and every connection close at once."""
        self.alive = False
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.thread.join(TIMEOUT)

    def __enter__(self) -> TCPBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.alive:
            self.kill()


class UDPBackend:
    """Answers each datagram with ``NAME:`` + the datagram, from a thread."""

    def __init__(self, name: str = "u") -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.peers: set[tuple[str, int]] = set()
        self.alive = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.alive:
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.add(addr)
            self.sock.sendto(self.name.encode() + b":" + data, addr)

    def close(self) -> None:
        self.alive = False
        self.thread.join(TIMEOUT)
        self.sock.close()

    def __enter__(self) -> UDPBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def backends(handler: Handler, n: int) -> Iterator[list[TCPBackend]]:
    made = [TCPBackend(handler, name=f"b{i}") for i in range(n)]
    try:
        yield made
    finally:
        for b in made:
            if b.alive:
                b.kill()


def request(port: int, line: bytes) -> bytes:
    """One connection through the balancer: send a line, read the reply to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(line)
        out = b""
        while chunk := sock.recv(4096):
            out += chunk
        return out


def refused(port: int) -> bool:
    """A connection the balancer refuses ends at once with no byte: EOF, or a reset when
    our request was still unread in its socket."""
    try:
        return request(port, b"anyone?\n") == b""
    except ConnectionResetError:
        return True
