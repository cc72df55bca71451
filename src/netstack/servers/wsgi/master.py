"""Pre-fork master: bind once, fork workers, supervise, roll them on SIGHUP.

Theory of operation
-------------------
The master binds every listening socket, then forks ``workers`` children that inherit
them (one shared socket per address: the kernel hands each new connection to one of the
workers blocked in accept). Each worker imports the app itself, so a restarted worker
runs fresh code. A worker talks to the master over its own *status pipe*: one JSON
object per line, ``{"ready": true}`` once it serves, ``{"error": "..."}`` when it cannot
load the app, ``{"recycle": true}`` when it reached ``max_requests``, and
``{"metrics": {...}}`` snapshots when ``--metrics-bind`` is on. Lines are shorter than
``PIPE_BUF``, so each write is atomic.

The master runs no event loop and no thread (it forks): one ``selectors`` loop watches a
self-pipe poked by the signal handlers, the status pipes and the metrics endpoint.

With more than one worker the master also maps a shared-memory table of open connections
per worker (:mod:`~netstack.servers.wsgi.balance`): it gives each worker a slot at fork
and frees it when the worker is reaped, and a worker that holds clearly more connections
than the least loaded one stops accepting for a moment, so that the workers share the
connections evenly instead of the busiest one winning every accept.

* SIGTERM / SIGINT: graceful stop. Each worker stops accepting, finishes in-flight
  requests, closes idle keep-alive connections and exits within ``graceful_timeout``;
  stragglers get SIGKILL after that plus a margin.
* SIGHUP (and a source change with ``--reload``): replace the workers one at a time: fork
  the new one, wait until it is ready, then stop an old one gracefully. The listening
  sockets never close, so no connection is refused during the roll. ``max_requests``
  replaces one worker the same way, new one first.
* A worker that dies unexpectedly is restarted (``worker_restarts``). A worker that
  cannot load the app exits with :data:`APP_LOAD_FAILED`: at start-up the master then
  stops everything and reports that failure instead of restarting it in a loop; later
  (a SIGHUP or ``--reload`` with broken code) the running workers keep serving and a
  missing worker is retried with a growing delay (1 s doubling to 30 s).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from netstack.config import WSGIServerConfig
from netstack.servers.procutil import die_with_parent
from netstack.servers.wsgi.balance import LoadSlot, LoadTable
from netstack.transport.backlog import refuse_new_connections

logger = logging.getLogger(__name__)

# Worker exit statuses the master understands.
APP_LOAD_FAILED: Final = 4
BIND_FAILED: Final = 5
# How long a new worker may take to import the app and start serving.
BOOT_TIMEOUT: Final = 30.0
# After graceful_timeout, how long the master waits before SIGKILL.
KILL_MARGIN: Final = 5.0
# Longest wait between attempts to start a worker that cannot load the app.
MAX_RESPAWN_DELAY: Final = 30.0
# A status line never exceeds this (writes up to PIPE_BUF are atomic on a pipe).
MAX_STATUS_LINE: Final = select.PIPE_BUF
HANDLED_SIGNALS: Final = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
# Why a worker is being replaced (the label of netstack_worker_restarts_total).
CRASH, MAX_REQUESTS, RELOAD = "crash", "max_requests", "reload"


class StatusPipe:
    """The worker's end of its status pipe (non-blocking; a full pipe drops a snapshot)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.is_ready = False
        os.set_blocking(fd, False)

    def send(self, message: dict[str, Any]) -> bool:
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        if len(line) > MAX_STATUS_LINE:
            logger.warning("status message too large (%d bytes): dropped", len(line))
            return False
        try:
            os.write(self.fd, line)
        except (BlockingIOError, BrokenPipeError):
            return False
        return True

    def ready(self) -> None:
        self.is_ready = True
        self.send({"ready": True})

    def error(self, text: str) -> None:
        self.send({"error": text[: MAX_STATUS_LINE // 2]})

    def recycle(self) -> None:
        self.send({"recycle": True})

    def metrics(self, snapshot: dict[str, Any]) -> None:
        self.send({"metrics": snapshot})


WorkerMain = Callable[[list[socket.socket], StatusPipe, LoadSlot | None], int]


@dataclass
class Worker:
    pid: int
    status_fd: int
    buffer: bytes = b""
    ready: bool = False
    stopping: bool = False
    recycle: bool = False
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    # Its slot in the master's LoadTable (None: a single worker, or the table was full).
    slot: int | None = None


class Master:
    """Supervise ``cfg.workers`` worker processes serving ``sockets``.

    Args:
        cfg: the server configuration.
        sockets: listening sockets, bound by the caller (so bind errors surface before
            any fork).
        worker_main: runs in each child with (sockets, status pipe, load slot or
            ``None``); returns an exit status. It loads the app, calls
            ``status.ready()`` and serves until SIGTERM.
        watch: with ``--reload``, returns a fingerprint of the source files; a change
            rolls the workers.
        metrics_socket: a bound listening socket for ``GET /metrics``, or ``None``.
    """

    def __init__(
        self,
        cfg: WSGIServerConfig,
        sockets: list[socket.socket],
        worker_main: WorkerMain,
        *,
        watch: Callable[[], object] | None = None,
        metrics_socket: socket.socket | None = None,
    ) -> None:
        self.cfg = cfg
        self.sockets = sockets
        self.worker_main = worker_main
        self.watch = watch
        self.workers: dict[int, Worker] = {}
        self.worker_restarts = 0
        self.exit_status = 0
        # One line on why the master stopped with a failure (the CLI prints it).
        self.failure: str | None = None
        self._stop = False
        self._hup = False
        self._booting = True
        self._respawn_delay = 0.0
        self._respawn_at = 0.0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self.metrics_socket = metrics_socket
        # Open connections per worker, so that they share the connections evenly (see
        # balance.py). Room for a whole roll: the new workers plus the old ones draining.
        self.table = LoadTable(2 * cfg.workers + 1) if cfg.workers > 1 else None
        self.aggregate: Any = None
        self.endpoint: Any = None
        if metrics_socket is not None:
            from netstack.servers.wsgi.metrics import Aggregate, MetricsEndpoint

            self.aggregate = Aggregate()
            self.endpoint = MetricsEndpoint(metrics_socket, self.selector, self._render)

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._hup = True
        elif signum != signal.SIGCHLD:
            self._stop = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"!")

    def _install(self) -> None:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_wake(self, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 512)

    # ------------------------------------------------------------------ workers

    def spawn(self) -> Worker:
        status_r, status_w = os.pipe()
        slot = self.table.claim() if self.table is not None else None
        # Signals stay blocked across fork until the child has dropped the master's
        # handlers: a SIGTERM sent to a booting worker must stop it, not be swallowed by
        # a copy of the master's handler.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child, measured there
                self._child(status_r, status_w, mask, slot)
        except BaseException:
            os.close(status_r)
            os.close(status_w)
            if slot is not None:
                self.table.release(slot)  # type: ignore[union-attr]  # set with slot
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(status_w)
        os.set_blocking(status_r, False)
        worker = Worker(pid, status_r, slot=slot)
        if slot is not None:
            self.table.assign(slot, pid)  # type: ignore[union-attr]  # set with slot
        self.workers[pid] = worker
        self.selector.register(status_r, selectors.EVENT_READ, lambda _m: self._on_status(worker))
        logger.info("started worker pid %d", pid)
        return worker

    def _child(
        self, status_r: int, status_w: int, mask: set[int | signal.Signals], slot: int | None
    ) -> None:
        status = 1
        try:
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            die_with_parent()
            # The master's own descriptors are none of the worker's business.
            os.close(status_r)
            for worker in self.workers.values():
                with contextlib.suppress(OSError):
                    os.close(worker.status_fd)
            if self.endpoint is not None:
                for client in self.endpoint.clients.values():
                    client.sock.close()
                self.metrics_socket.close()  # type: ignore[union-attr]  # set with endpoint
            self.selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            load = (
                LoadSlot(self.table, slot) if self.table is not None and slot is not None else None
            )
            status = self.worker_main(self.sockets, StatusPipe(status_w), load)
        except BaseException:
            logger.exception("worker %d crashed", os.getpid())
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)

    def _on_status(self, worker: Worker) -> None:
        try:
            data = os.read(worker.status_fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self._close_status(worker)
            return
        lines = (worker.buffer + data).split(b"\n")
        worker.buffer = lines.pop()
        if len(worker.buffer) > MAX_STATUS_LINE:  # pragma: no cover - our own workers write
            worker.buffer = b""
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:  # pragma: no cover - our own workers write
                continue
            if message.get("ready"):
                worker.ready = True
                self._respawn_delay = 0.0
            if "error" in message:
                worker.error = str(message["error"])
            if message.get("recycle") and not worker.stopping:
                worker.recycle = True
            if "metrics" in message and self.aggregate is not None:
                self.aggregate.update(worker.pid, message["metrics"])

    def _drain(self, worker: Worker) -> None:
        """Read what is left in a dead worker's pipe, then close it."""
        for _ in range(64):  # a pipe holds 64 KiB: bounded even if a grandchild keeps it
            if worker.status_fd < 0:
                return
            fd = worker.status_fd
            self._on_status(worker)
            if worker.status_fd == fd and not select.select([fd], [], [], 0)[0]:
                break
        self._close_status(worker)

    def _release_slot(self, worker: Worker) -> None:
        if worker.slot is not None and self.table is not None:
            self.table.release(worker.slot)
            worker.slot = None

    def _close_status(self, worker: Worker) -> None:
        if worker.status_fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(worker.status_fd)
            os.close(worker.status_fd)
            worker.status_fd = -1

    def _poll(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            key.data(mask)
        if self.endpoint is not None:
            self.endpoint.expire(time.monotonic())

    def _reap(self) -> list[tuple[Worker, int]]:
        dead = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self._release_slot(worker)
            # Read what it said last (its final metrics, an error) before forgetting it.
            self._drain(worker)
            if self.aggregate is not None:
                self.aggregate.retire(pid)
            dead.append((worker, os.waitstatus_to_exitcode(status)))
        return dead

    def _signal_worker(self, worker: Worker, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, sig)

    def _wait_ready(self, worker: Worker) -> bool:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not worker.ready and time.monotonic() < deadline and not self._stop:
            self._poll(0.1)
            for dead, code in self._reap():
                self._handle_death(dead, code)
            if worker.pid not in self.workers:
                return False
        return worker.ready

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; return the exit status."""
        self._install()
        try:
            for _ in range(self.cfg.workers):
                self.spawn()
            fingerprint = self.watch() if self.watch is not None else None
            while not self._stop:
                self._poll(1.0)
                for worker, code in self._reap():
                    self._handle_death(worker, code)
                self._fill()
                if self._booting and all(w.ready for w in self.workers.values()):
                    self._booting = False
                if self.watch is not None and not self._stop:
                    current = self.watch()
                    if current != fingerprint:
                        fingerprint = current
                        logger.info("source changed: restarting workers")
                        self._hup = True
                for worker in list(self.workers.values()):
                    if worker.recycle and not worker.stopping and not self._stop:
                        worker.recycle = False
                        logger.info("worker pid %d reached max_requests: replacing it", worker.pid)
                        self.replace(worker, MAX_REQUESTS)
                if self._hup and not self._stop:
                    self._hup = False
                    self.roll()
                if self.aggregate is not None:
                    self.aggregate.workers = len(self.workers)
        finally:
            self.stop_all()
        return self.exit_status

    def _handle_death(self, worker: Worker, code: int) -> None:
        if worker.stopping or self._stop:
            logger.info("worker pid %d exited (%d)", worker.pid, code)
            return
        load_failed = worker.error is not None or code in (APP_LOAD_FAILED, BIND_FAILED)
        if self._booting and (load_failed or not worker.ready):
            # At start-up a worker that cannot serve would only fail again: report it.
            self.failure = worker.error or (
                f"worker pid {worker.pid} exited with status {code} before serving"
            )
            logger.error("worker pid %d could not start: stopping", worker.pid)
            self.exit_status = APP_LOAD_FAILED
            self._stop = True
            return
        if load_failed:
            # Later (SIGHUP, --reload, a restart) the running workers keep serving the code
            # they loaded; missing workers are retried with a growing delay.
            self._respawn_delay = min(max(2 * self._respawn_delay, 1.0), MAX_RESPAWN_DELAY)
            self._respawn_at = time.monotonic() + self._respawn_delay
            logger.error(
                "a new worker could not load the app (%s); running workers keep serving",
                worker.error or f"status {code}",
            )
            return
        self.worker_restarts += 1
        if self.aggregate is not None:
            self.aggregate.restarted(CRASH)
        logger.warning("worker pid %d died (status %d): restarting it", worker.pid, code)

    def _fill(self) -> None:
        """Start workers until ``cfg.workers`` run (after a crash, or a failed load)."""
        if self._stop or time.monotonic() < self._respawn_at:
            return
        running = sum(1 for w in self.workers.values() if not w.stopping)
        for _ in range(self.cfg.workers - running):
            self.spawn()

    def replace(self, worker: Worker, reason: str) -> bool:
        """Start a replacement, and once it serves, stop ``worker`` gracefully."""
        new = self.spawn()
        if not self._wait_ready(new):
            if not self._stop:
                logger.error("a new worker did not become ready; keeping pid %d", worker.pid)
            return False
        worker.stopping = True
        self.worker_restarts += 1
        if self.aggregate is not None:
            self.aggregate.restarted(reason)
        self._signal_worker(worker, signal.SIGTERM)
        return True

    def roll(self) -> None:
        """Replace every worker, one at a time, new one ready before the old one stops."""
        old = [w for w in self.workers.values() if not w.stopping]
        logger.info("replacing %d worker(s)", len(old))
        for worker in old:
            if worker.pid in self.workers and not self.replace(worker, RELOAD):
                return

    def stop_all(self) -> None:
        logger.info(
            "stopping %d worker(s) (graceful_timeout=%.1fs)",
            len(self.workers),
            self.cfg.timeouts.graceful_timeout,
        )
        # Our copies of the listeners go first: once the workers close theirs, the kernel
        # refuses new connections instead of queueing them for nobody. Every holder is
        # stopping, so no new handshake either: what is queued now is all the workers
        # accept before closing (a close would reset it; transport/backlog.py).
        for sock in self.sockets:
            refuse_new_connections(sock)
            sock.close()
        for worker in self.workers.values():
            worker.stopping = True
            self._signal_worker(worker, signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.timeouts.graceful_timeout + KILL_MARGIN
        while self.workers and time.monotonic() < deadline:
            self._poll(0.05)
            for worker, code in self._reap():
                logger.info("worker pid %d exited (%d)", worker.pid, code)
        for worker in list(self.workers.values()):
            logger.warning("worker pid %d did not stop in time: killing it", worker.pid)
            self._signal_worker(worker, signal.SIGKILL)
        while self.workers:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except OSError as exc:  # pragma: no cover
                if exc.errno != errno.EINTR:
                    raise
                continue
            gone = self.workers.pop(pid, None)
            if gone is not None:
                self._release_slot(gone)
                self._close_status(gone)
        if self.endpoint is not None:
            self.endpoint.close()
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _render(self) -> bytes:
        assert self.aggregate is not None
        self.aggregate.workers = len(self.workers)
        return bytes(self.aggregate.render())
