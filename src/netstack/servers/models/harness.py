"""Run one model as a child process for the benchmark, the way a user would run it.

A separate process gives each model its own GIL, threads and memory, so CPU time, thread
count and RSS measured on its pid belong to that model alone, and a model that misbehaves
cannot disturb the load client.
"""

from __future__ import annotations

import selectors
import signal
import subprocess
import sys
import tempfile
import time
from types import TracebackType
from typing import IO, Self

from netstack.config import ModelName

READY_TIMEOUT = 15.0
"""Seconds a child gets to import and print ``READY`` (slow CI, cold caches)."""


class ServerProcess:
    """``python -m netstack.servers.models MODEL --bind 127.0.0.1:0`` as a context manager.

    Entering starts the child and waits for its ``READY host:port`` line; leaving sends
    SIGTERM and waits (SIGKILL after ``stop_timeout``).

    Args:
        model: which model to run.
        args: extra command-line arguments (``--pool-threads 16``...).
    """

    def __init__(
        self, model: ModelName, args: tuple[str, ...] = (), *, stop_timeout: float = 10.0
    ) -> None:
        self.model = model
        self.argv = [
            sys.executable,
            "-m",
            "netstack.servers.models",
            model,
            "--bind",
            "127.0.0.1:0",
            *args,
        ]
        self.stop_timeout = stop_timeout
        self.port = 0
        self.returncode: int | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "started in __enter__"
        return self._proc.pid

    def __enter__(self) -> Self:
        self._stderr = tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        try:
            self.port = self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _wait_ready(self) -> int:
        assert self._proc is not None
        assert self._proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(self._proc.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not selector.select(left):
                    continue
                line = self._proc.stdout.readline()
                if line.startswith("READY "):
                    return int(line.split()[1].rpartition(":")[2])
                if not line:  # the child exited before it was ready
                    break
        self.stop()
        raise RuntimeError(
            f"{self.model} server did not start (exit {self.returncode}): {self.stderr_tail()}"
        )

    def stop(self) -> int | None:
        """SIGTERM the child, wait for it, and return its exit code (idempotent)."""
        proc = self._proc
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.returncode = proc.returncode
        if proc.stdout is not None:
            proc.stdout.close()
        self._proc = None
        return self.returncode

    def stderr_tail(self, limit: int = 2000) -> str:
        """The last ``limit`` characters the child wrote to stderr."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read()
        return text[-limit:].strip() or "(no output)"

    def close(self) -> None:
        """Stop the child and release the stderr file."""
        self.stop()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
