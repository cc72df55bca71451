"""What the five concurrency models share: config, the echo session, statistics, listeners.

Every model serves the same protocol (length-prefixed frames, each echoed back) through the
same sans-I/O :class:`EchoSession`, so the benchmark compares concurrency models and
nothing else. The three thread-based models also share :func:`serve_blocking_connection`.

Blocking sockets and shutdown: a thread blocked in ``recv`` cannot see a
``threading.Event``. Instead of giving the socket a Python timeout (CPython then calls
``poll()`` before every ``recv``: one more syscall per message), the kernel's
``SO_RCVTIMEO``/``SO_SNDTIMEO`` make a blocking ``recv``/``send`` give up with ``EAGAIN``
after :data:`STOP_CHECK_INTERVAL` of silence. That wakes the thread to check the stop
event and the idle deadline, and costs nothing while data flows.
"""

from __future__ import annotations

import abc
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import ClassVar, Final, NamedTuple

from netstack.config import ModelName
from netstack.errors import ConfigError, RemoteProtocolError
from netstack.proto.framing import LengthPrefixedCodec

logger = logging.getLogger(__name__)

RECV_BYTES: Final = 64 * 1024
"""Bytes asked of each ``recv``: one call drains a typical socket receive queue."""

STOP_CHECK_INTERVAL: Final = 0.2
"""Longest a blocked handler or accept loop goes without checking its stop event."""

LISTEN_BACKLOG: Final = 1024
"""Pending connections the kernel queues (capped by ``net.core.somaxconn``).

The blocking and pool models leave most connections waiting in this queue under load; with
Python's default of 128, connects beyond it would stall in SYN retries instead.
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Settings every model server takes (the pool ones are ignored by the others)."""

    # Same as Limits.max_frame_bytes (websockets' max_size).
    max_frame_bytes: int = field(default=1 << 20, metadata={"help": "largest frame body"})
    # Same as Timeouts.idle_timeout (nginx's client_body_timeout).
    idle_timeout: float | None = field(
        default=60.0, metadata={"help": "close a connection silent this long"}
    )
    # See BenchModelsConfig for the reasons behind 16 and 8.
    pool_threads: int = field(default=16, metadata={"help": "pool model: worker threads"})
    max_running: int = field(default=8, metadata={"help": "pool model: running handlers"})

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "pool_threads", "max_running"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0", field=name)
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ConfigError("idle_timeout must be > 0 (or None)", field="idle_timeout")


class Reply(NamedTuple):
    """What one chunk of received bytes produced.

    Attributes:
        data: the echo of every frame completed by the chunk, ready to send.
        frames: how many frames completed.
        payload_bytes: their total body size.
        error: the peer's protocol error, if the chunk broke framing; the caller sends
            ``data`` (frames accepted before the error are still served) and then closes.
    """

    data: bytes
    frames: int
    payload_bytes: int
    error: RemoteProtocolError | None


class EchoSession:
    """Sans-I/O echo: received bytes in, echoed frames out.

    Args:
        max_frame_bytes: largest frame body accepted; a larger announced length is a
            :class:`~netstack.errors.LimitExceeded` naming ``max_frame_bytes``.
    """

    __slots__ = ("_codec",)

    def __init__(self, max_frame_bytes: int) -> None:
        self._codec = LengthPrefixedCodec(max_frame_bytes)

    def receive(self, data: bytes) -> Reply:
        """Feed bytes from the peer and return the replies they complete."""
        error: RemoteProtocolError | None = None
        try:
            self._codec.receive_data(data)
        except RemoteProtocolError as exc:
            error = exc
        frames = self._codec.events_received()
        if not frames:
            return Reply(b"", 0, 0, error)
        encode = self._codec.encode
        out = b"".join([encode(f) for f in frames])
        return Reply(out, len(frames), len(out) - 4 * len(frames), error)

    def receive_eof(self) -> RemoteProtocolError | None:
        """The peer closed; return the error if it closed inside a frame."""
        try:
            self._codec.receive_eof()
        except RemoteProtocolError as exc:
            return exc
        return None


@dataclass(slots=True)
class StatsSnapshot:
    """A consistent copy of :class:`Stats`, taken under its lock."""

    connections: int
    messages: int
    payload_bytes: int
    active: int
    peak_active: int


class Stats:
    """Counters shared by every handler of one server.

    ``self.messages += n`` is a read, an add and a write: two threads can read the same old
    value and one increment is lost (``race.py`` shows it happening). Every update
    therefore holds ``_lock``, a ``threading.Lock`` used as a mutex. The single-threaded
    models pay for an uncontended ``with lock:`` (about 0.16 us on the benchmark machine,
    against tens of microseconds per message) to keep one code path.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections = 0
        self._messages = 0
        self._payload_bytes = 0
        self._active = 0
        self._peak_active = 0

    def connection_opened(self) -> int:
        """Count an accepted connection and return its id (1, 2, ...)."""
        with self._lock:
            self._connections += 1
            return self._connections

    def handler_started(self) -> None:
        """A handler began serving a connection (``active`` counts them)."""
        with self._lock:
            self._active += 1
            self._peak_active = max(self._peak_active, self._active)

    def handler_finished(self) -> None:
        with self._lock:
            self._active -= 1

    def add(self, messages: int, payload_bytes: int) -> None:
        """Count echoed messages and their body bytes."""
        with self._lock:
            self._messages += messages
            self._payload_bytes += payload_bytes

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(
                self._connections,
                self._messages,
                self._payload_bytes,
                self._active,
                self._peak_active,
            )


class ModelServer(abc.ABC):
    """One concurrency model serving the echo protocol on a bound, listening socket.

    The caller owns ``listener`` (it closes it after :meth:`serve` returns); a model may
    change its blocking mode. :meth:`serve` runs in the calling thread until ``stop`` is
    set, then closes every connection it accepted and returns.

    Args:
        listener: a bound TCP socket; :func:`create_listener` makes one.
        config: limits and pool sizes.
    """

    name: ClassVar[ModelName]

    def __init__(self, listener: socket.socket, config: ModelConfig | None = None) -> None:
        self.listener = listener
        self.config = config or ModelConfig()
        self.stats = Stats()

    @abc.abstractmethod
    def serve(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set."""


def create_listener(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` (port 0 picks a free port).

    Raises:
        OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def log_peer_error(conn_id: int, exc: RemoteProtocolError) -> None:
    """WARNING without a traceback: the peer broke the protocol or hit a limit."""
    logger.warning("! conn %d: %s; closing", conn_id, exc, extra={"conn_id": conn_id})


def log_idle(conn_id: int, idle_timeout: float) -> None:
    logger.info(
        "x conn %d: silent for idle_timeout=%gs; closing",
        conn_id,
        idle_timeout,
        extra={"conn_id": conn_id},
    )


def _set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    # struct timeval {long tv_sec; long tv_usec;} on Linux and the BSDs.
    sec = int(seconds)
    timeval = struct.pack("ll", sec, int((seconds - sec) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class _Stopped(Exception):
    """Internal: stop was set or the peer stalled while we were sending."""


def _send_all(
    conn: socket.socket, data: bytes, stop: threading.Event, idle_timeout: float | None
) -> None:
    # socket.sendall would lose track of a partial send when SO_SNDTIMEO fires.
    view = memoryview(data)
    last = time.monotonic()
    while view:
        try:
            sent = conn.send(view)
        except BlockingIOError:
            now = time.monotonic()
            if stop.is_set() or (idle_timeout is not None and now - last >= idle_timeout):
                raise _Stopped from None
            continue
        view = view[sent:]
        last = time.monotonic()


def serve_blocking_connection(
    conn: socket.socket, config: ModelConfig, stats: Stats, stop: threading.Event
) -> None:
    """Serve one connection on blocking sockets until EOF, error, idle timeout or stop.

    Used by the ``blocking``, ``threaded`` and ``pool`` models. Always closes ``conn``.
    """
    conn_id = stats.connection_opened()
    stats.handler_started()
    idle = config.idle_timeout
    session = EchoSession(config.max_frame_bytes)
    try:
        conn.setblocking(True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _set_kernel_timeouts(
            conn, STOP_CHECK_INTERVAL if idle is None else min(idle, STOP_CHECK_INTERVAL)
        )
        last = time.monotonic()
        while not stop.is_set():
            try:
                data = conn.recv(RECV_BYTES)
            except BlockingIOError:  # SO_RCVTIMEO: nothing arrived for one interval
                if idle is not None and time.monotonic() - last >= idle:
                    log_idle(conn_id, idle)
                    return
                continue
            if not data:
                if (eof_error := session.receive_eof()) is not None:
                    log_peer_error(conn_id, eof_error)
                return
            last = time.monotonic()
            reply = session.receive(data)
            if reply.frames:
                _send_all(conn, reply.data, stop, idle)
                stats.add(reply.frames, reply.payload_bytes)
            if reply.error is not None:
                log_peer_error(conn_id, reply.error)
                return
    except _Stopped:
        logger.debug("x conn %d: stopped while sending", conn_id, extra={"conn_id": conn_id})
    except OSError as exc:  # reset by peer, broken pipe: the peer went away
        logger.debug("x conn %d: %s", conn_id, exc, extra={"conn_id": conn_id})
    finally:
        stats.handler_finished()
        conn.close()


def accept_until(listener: socket.socket, stop: threading.Event) -> socket.socket | None:
    """Accept one connection, or return ``None`` once ``stop`` is set.

    The listener gets a :data:`STOP_CHECK_INTERVAL` timeout so that a quiet listener still
    checks ``stop``; the accepted socket is blocking.
    """
    listener.settimeout(STOP_CHECK_INTERVAL)
    while not stop.is_set():
        try:
            conn, _addr = listener.accept()
        except TimeoutError:
            continue
        except OSError as exc:  # EMFILE, ECONNABORTED: log and keep the listener
            logger.warning("accept failed: %s", exc)
            stop.wait(STOP_CHECK_INTERVAL)
            continue
        return conn
    return None
