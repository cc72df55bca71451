"""Pre-fork master: bind once, fork workers, supervise, roll them on SIGHUP.

Theory of operation
-------------------
The master binds every listening socket, then forks ``workers`` children that inherit
them (one shared socket per address: the kernel hands each new connection to one of the
workers blocked in accept). Each worker imports the app itself, so a restarted worker
runs fresh code, and reports "ready" on a pipe once it is serving.

Signals (the master runs no event loop; handlers only set flags and poke a self-pipe):

* SIGTERM / SIGINT: graceful stop. Each worker stops accepting, finishes in-flight
  requests, closes idle keep-alive connections and exits within ``graceful_timeout``;
  stragglers get SIGKILL after that plus a margin.
* SIGHUP (and a source change with ``--reload``): replace the workers one at a time: fork
  the new one, wait until it is ready, then stop an old one gracefully. The listening
  sockets never close, so no connection is refused during the roll.
* A worker that dies is restarted (counted in ``worker_restarts``). A worker that cannot
  load the app exits with :data:`APP_LOAD_FAILED`; the master then stops everything and
  exits with that failure instead of restarting it in a loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from netstack.config import WSGIServerConfig

logger = logging.getLogger(__name__)

# Worker exit statuses the master understands.
APP_LOAD_FAILED = 4
BIND_FAILED = 5
# How long a new worker may take to import the app and start serving.
BOOT_TIMEOUT = 30.0


@dataclass
class Worker:
    pid: int
    ready_fd: int
    ready: bool = False
    stopping: bool = False
    started: float = field(default_factory=time.monotonic)


class Master:
    """Supervise ``cfg.workers`` worker processes serving ``sockets``.

    Args:
        cfg: the server configuration.
        sockets: listening sockets, bound by the caller (so bind errors surface before
            any fork).
        worker_main: runs in each child with (sockets, ready callback); returns an exit
            status. It loads the app and serves until SIGTERM.
        watch: with ``--reload``, returns a fingerprint of the source files; a change
            rolls the workers.
    """

    def __init__(
        self,
        cfg: WSGIServerConfig,
        sockets: list[socket.socket],
        worker_main: Callable[[list[socket.socket], Callable[[], None]], int],
        *,
        watch: Callable[[], object] | None = None,
    ) -> None:
        self.cfg = cfg
        self.sockets = sockets
        self.worker_main = worker_main
        self.watch = watch
        self.workers: dict[int, Worker] = {}
        self.worker_restarts = 0
        self.exit_status = 0
        self._stop = False
        self._hup = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._hup = True
        elif signum != signal.SIGCHLD:
            self._stop = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"!")

    def _install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

    # ------------------------------------------------------------------ workers

    def spawn(self) -> Worker:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, measured there
            status = 1
            try:
                os.close(ready_r)
                os.close(self._wake_r)
                os.close(self._wake_w)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)

                def ready() -> None:
                    os.write(ready_w, b"R")
                    os.close(ready_w)

                status = self.worker_main(self.sockets, ready)
            except BaseException:
                logger.exception("worker %d crashed", os.getpid())
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(status)
        os.close(ready_w)
        worker = Worker(pid, ready_r)
        self.workers[pid] = worker
        logger.info("started worker pid %d", pid)
        return worker

    def _read_ready(self, timeout: float) -> None:
        fds = [w.ready_fd for w in self.workers.values() if not w.ready]
        try:
            readable, _, _ = select.select([self._wake_r, *fds], [], [], timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries select
            return
        for fd in readable:
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
                continue
            for worker in self.workers.values():
                if worker.ready_fd == fd:
                    data = os.read(fd, 1)
                    if data:
                        worker.ready = True
                    os.close(fd)
                    worker.ready_fd = -1

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
            if worker.ready_fd >= 0:
                os.close(worker.ready_fd)
            dead.append((worker, os.waitstatus_to_exitcode(status)))
        return dead

    def _signal_worker(self, worker: Worker, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, sig)

    def _wait_ready(self, worker: Worker) -> bool:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not worker.ready and time.monotonic() < deadline and not self._stop:
            self._read_ready(0.1)
            for dead, code in self._reap():
                self._handle_death(dead, code)
            if worker.pid not in self.workers:
                return False
        return worker.ready

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; return the exit status."""
        self._install()
        for _ in range(self.cfg.workers):
            self.spawn()
        fingerprint = self.watch() if self.watch is not None else None
        while not self._stop:
            self._read_ready(1.0)
            for worker, code in self._reap():
                self._handle_death(worker, code)
            if self.watch is not None and not self._stop:
                current = self.watch()
                if current != fingerprint:
                    fingerprint = current
                    logger.info("source changed: restarting workers")
                    self._hup = True
            if self._hup and not self._stop:
                self._hup = False
                self.roll()
        self.stop_all()
        return self.exit_status

    def _handle_death(self, worker: Worker, code: int) -> None:
        if worker.stopping or self._stop:
            logger.info("worker pid %d exited (%d)", worker.pid, code)
            return
        if code in (APP_LOAD_FAILED, BIND_FAILED):
            logger.error("worker pid %d could not start (status %d): stopping", worker.pid, code)
            self.exit_status = code
            self._stop = True
            return
        self.worker_restarts += 1
        logger.warning("worker pid %d died (status %d): restarting it", worker.pid, code)
        self.spawn()

    def roll(self) -> None:
        """Replace every worker, one at a time, new one ready before the old one stops."""
        old = [w for w in self.workers.values() if not w.stopping]
        logger.info("replacing %d worker(s)", len(old))
        for worker in old:
            new = self.spawn()
            if not self._wait_ready(new):
                logger.error("a new worker did not become ready; keeping the old ones")
                return
            worker.stopping = True
            self._signal_worker(worker, signal.SIGTERM)

    def stop_all(self) -> None:
        for worker in self.workers.values():
            worker.stopping = True
            self._signal_worker(worker, signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.timeouts.graceful_timeout + 5.0
        while self.workers and time.monotonic() < deadline:
            self._read_ready(0.05)
            self._reap()
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
            self.workers.pop(pid, None)
        for sock in self.sockets:
            sock.close()
