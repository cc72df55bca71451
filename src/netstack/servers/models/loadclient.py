"""Closed-loop load client for the model benchmark: many ping-pong connections per process.

Each process opens its share of the connections to 127.0.0.1 with non-blocking sockets
on one :mod:`selectors` loop. Every connection sends one frame, waits for the whole echo,
records the round-trip time, and sends the next (a closed loop: one message in flight
per connection, so the offered load follows the server's speed, as with wrk).

A point ends at the deadline or when ``max_messages`` replies have arrived, whichever
comes first. Nothing waits past the deadline: a connection that never completed its
handshake, or never got a reply (the ``blocking`` model serves one client at a time; the
``pool`` model only ``max_running``), is counted as *not served*, not as an error.
Errors are failures: refused or reset connections, a server that closes early, or an
echo that does not match what was sent.

:func:`run_load` is a plain function of picklable values so that
``multiprocessing`` can run it in several processes (:class:`LoadWorkers`); :func:`merge`
adds the results up.
"""

from __future__ import annotations

import array
import contextlib
import errno
import multiprocessing
import os
import queue
import selectors
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from typing import Final, Self

from netstack.proto.framing import HEADER
from netstack.servers.measure import nearest_rank

_CONNECTING: Final = 0
_SENDING: Final = 1
_RECEIVING: Final = 2


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One process's share of one measurement point.

    Attributes:
        port: the server's port on ``host``.
        connections: connections this process opens.
        size: message body size in bytes.
        duration: seconds of load.
        max_messages: stop once this many replies have arrived.
        deadline: when to stop, on the ``time.monotonic`` clock (system-wide on Linux),
            so that the processes of one point stop together; ``None``: ``duration``
            after this process starts.
    """

    host: str
    port: int
    connections: int
    size: int
    duration: float
    max_messages: int
    deadline: float | None = None


@dataclass(slots=True)
class LoadResult:
    """What one or more load processes measured.

    Attributes:
        connections: connections opened.
        served: connections that got at least one reply.
        messages: replies received and verified.
        errors: failed connections (refused, reset, closed early, bad echo).
        elapsed: seconds from the first connect to the end (the longest process).
        latencies: round-trip times in seconds, one per message.
    """

    connections: int = 0
    served: int = 0
    messages: int = 0
    errors: int = 0
    elapsed: float = 0.0
    latencies: array.array[float] = field(default_factory=lambda: array.array("d"))

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.messages / self.elapsed if self.elapsed > 0 else 0.0

    def percentiles(self, *qs: float) -> list[float | None]:
        """The ``q``-th percentile latencies in seconds (nearest rank); ``None`` if empty."""
        if not self.latencies:
            return [None for _ in qs]
        ordered = sorted(self.latencies)
        return [nearest_rank(ordered, q) for q in qs]


def merge(results: list[LoadResult]) -> LoadResult:
    """Add up the results of the processes that ran one point together."""
    total = LoadResult()
    for r in results:
        total.connections += r.connections
        total.served += r.served
        total.messages += r.messages
        total.errors += r.errors
        total.elapsed = max(total.elapsed, r.elapsed)
        total.latencies.extend(r.latencies)
    return total


def split(connections: int, processes: int) -> list[int]:
    """Share ``connections`` between at most ``processes`` processes, as evenly as can be."""
    processes = max(1, min(processes, connections))
    base, extra = divmod(connections, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


class _Conn:
    __slots__ = ("buf", "phase", "replies", "sent", "sock", "started")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.phase = _CONNECTING
        self.sent = 0  # bytes of the current frame sent
        self.buf = bytearray()  # bytes of the current echo received
        self.started = 0.0  # when the current frame was first sent
        self.replies = 0


def run_load(spec: LoadSpec) -> LoadResult:
    """Drive ``spec.connections`` ping-pong connections until the deadline or the budget."""
    result = LoadResult(connections=spec.connections)
    if spec.connections <= 0:
        return result
    frame = HEADER.pack(spec.size) + os.urandom(spec.size)
    view = memoryview(frame)
    selector = selectors.DefaultSelector()
    conns: list[_Conn] = []
    latencies = result.latencies
    started = time.perf_counter()
    # Both clocks are CLOCK_MONOTONIC on Linux; perf_counter is the finer one elsewhere.
    deadline = started + (
        spec.duration if spec.deadline is None else spec.deadline - time.monotonic()
    )
    in_flight = 0
    messages = 0
    errors = 0

    def fail(conn: _Conn) -> None:
        nonlocal errors, in_flight
        errors += 1
        if conn.phase != _CONNECTING:
            in_flight -= 1
        drop(conn)

    def drop(conn: _Conn) -> None:
        selector.unregister(conn.sock)
        conn.sock.close()
        conn.phase = -1

    def send_next(conn: _Conn) -> None:
        """Start a new round trip, or retire the connection when the budget is spent."""
        nonlocal in_flight
        if messages + in_flight >= spec.max_messages:
            drop(conn)
            return
        in_flight += 1
        conn.sent = 0
        conn.buf.clear()
        conn.started = time.perf_counter()
        send_more(conn)

    def send_more(conn: _Conn) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            conn.sent += conn.sock.send(view[conn.sent :])
        want = selectors.EVENT_READ if conn.sent == len(frame) else selectors.EVENT_WRITE
        new_phase = _RECEIVING if want == selectors.EVENT_READ else _SENDING
        if new_phase != conn.phase:
            conn.phase = new_phase
            selector.modify(conn.sock, want, conn)

    try:
        for _ in range(spec.connections):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((spec.host, spec.port))
            conn = _Conn(sock)
            conns.append(conn)
            selector.register(sock, selectors.EVENT_WRITE, conn)
            if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
                fail(conn)

        while (now := time.perf_counter()) < deadline and (
            in_flight or messages < spec.max_messages
        ):
            if not selector.get_map():
                break
            events = selector.select(deadline - now)
            if time.perf_counter() >= deadline:
                break  # replies that arrive after the deadline do not count
            for key, _mask in events:
                conn = key.data
                try:
                    if conn.phase == _CONNECTING:
                        if conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                            fail(conn)
                            continue
                        send_next(conn)
                    elif conn.phase == _SENDING:
                        send_more(conn)
                    elif conn.phase == _RECEIVING:
                        data = conn.sock.recv(65536)
                        if not data:
                            fail(conn)  # the server closed on us
                            continue
                        conn.buf += data
                        if len(conn.buf) < len(frame):
                            continue
                        if conn.buf != frame:
                            fail(conn)
                            continue
                        latencies.append(time.perf_counter() - conn.started)
                        messages += 1
                        in_flight -= 1
                        conn.replies += 1
                        send_next(conn)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    fail(conn)
    finally:
        result.elapsed = time.perf_counter() - started
        for conn in conns:
            if conn.phase != -1:
                drop(conn)
        selector.close()
    result.messages = messages
    result.errors = errors
    result.served = sum(1 for c in conns if c.replies)
    return result


class LoadWorkers:
    """A fixed set of load processes; :meth:`start` gives each its own share of a point.

    ``multiprocessing.Pool`` would not do: it may hand two shares to the same worker,
    which then runs them one after the other instead of at the same time. Here each
    process has its own inbox, so every share starts at once in a different process.

    Processes are started with ``spawn``, not ``fork``: the parent may run threads (rich's
    refresher, a test runner) and forking a threaded process can deadlock the child.

    Args:
        processes: how many load processes to start.
    """

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._outbox: Queue[tuple[int, LoadResult | str]] = context.Queue()
        self._inboxes: list[Queue[LoadSpec | None]] = [context.Queue() for _ in range(processes)]
        self._procs = [
            context.Process(
                target=_worker, args=(inbox, self._outbox, i), name=f"load-{i}", daemon=True
            )
            for i, inbox in enumerate(self._inboxes)
        ]
        for proc in self._procs:
            proc.start()
        self._pending: dict[int, LoadResult | None] = {}

    @property
    def processes(self) -> int:
        return len(self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def start(self, specs: list[LoadSpec]) -> None:
        """Send one spec to each of the first ``len(specs)`` processes."""
        if len(specs) > len(self._procs):
            raise ValueError(f"{len(specs)} shares for {len(self._procs)} processes")
        self._pending = dict.fromkeys(range(len(specs)))
        for inbox, spec in zip(self._inboxes, specs, strict=False):
            inbox.put(spec)

    def wait(self, timeout: float) -> list[LoadResult] | None:
        """Return every result once all shares are done, or ``None`` after ``timeout``.

        Raises:
            RuntimeError: a load process failed or died.
        """
        deadline = time.monotonic() + timeout
        while any(r is None for r in self._pending.values()):
            try:
                index, outcome = self._outbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                dead = [p.name for p in self._procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"load process died: {', '.join(dead)}") from None
                return None
            if isinstance(outcome, str):
                raise RuntimeError(f"load process {index} failed: {outcome}")
            self._pending[index] = outcome
        return [r for r in self._pending.values() if r is not None]

    def close(self) -> None:
        """Ask every process to exit and wait for them."""
        for inbox in self._inboxes:
            inbox.put(None)
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():  # pragma: no cover - a wedged worker
                proc.kill()
                proc.join()
        for inbox in self._inboxes:
            inbox.close()
            inbox.join_thread()
        self._outbox.close()
        self._outbox.join_thread()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _worker(
    inbox: Queue[LoadSpec | None], outbox: Queue[tuple[int, LoadResult | str]], index: int
) -> None:
    while (spec := inbox.get()) is not None:
        try:
            outbox.put((index, run_load(spec)))
        except Exception as exc:  # report it; the parent raises
            outbox.put((index, f"{type(exc).__name__}: {exc}"))
