"""Run a model in a thread and talk to it with plain blocking sockets."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from netstack.servers.models import MODELS, AsyncioServer, ModelConfig, ModelServer
from netstack.servers.models.base import create_listener
from tests.helpers import TIMEOUT

# "asyncio" runs on uvloop (auto); "asyncio-loop" forces asyncio's own loop.
MODEL_IDS = ["blocking", "threaded", "pool", "selectloop", "asyncio", "asyncio-loop"]
CONCURRENT_IDS = [m for m in MODEL_IDS if m != "blocking"]


@dataclass
class Running:
    server: ModelServer
    address: tuple[str, int]
    stop: threading.Event
    thread: threading.Thread

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=TIMEOUT)


def make_server(model_id: str, listener: socket.socket, config: ModelConfig) -> ModelServer:
    if model_id == "asyncio-loop":
        return AsyncioServer(listener, config, loop="asyncio")
    return MODELS[model_id](listener, config)  # type: ignore[index]  # a ModelName


@contextmanager
def running(model_id: str, **config: object) -> Iterator[Running]:
    """Serve ``model_id`` on 127.0.0.1:0 in a thread; stop it and check it returned."""
    listener = create_listener("127.0.0.1", 0)
    server = make_server(model_id, listener, ModelConfig(**config))  # type: ignore[arg-type]
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), name=f"serve-{model_id}")
    thread.start()
    try:
        yield Running(server, listener.getsockname()[:2], stop, thread)
    finally:
        stop.set()
        thread.join(TIMEOUT)
        listener.close()
    assert not thread.is_alive(), f"{model_id} did not stop within {TIMEOUT}s"


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(frame(payload))
    (size,) = struct.unpack("!I", recv_exact(sock, 4))
    return recv_exact(sock, size)


def closed_by_peer(sock: socket.socket) -> bool:
    """Read until EOF or reset (within the socket's timeout); True if the peer closed."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    return True
