"""Run ``netstack serve`` as a real process tree and talk to it over loopback."""

from __future__ import annotations

import contextlib
import http.client
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.helpers import TIMEOUT, poll_until

# The app the process tests serve. /hold/NAME blocks until the test creates the file
# NAME.release (bounded), after creating NAME.started: the test knows the request is in
# flight without sleeping. Every response names the worker pid that made it.
APP = """
import os, time
from wsgiref.validate import validator

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "v1"


def _app(environ, start_response):
    path = environ["PATH_INFO"]
    if path.startswith("/hold/"):
        name = os.path.join(HERE, path[6:])
        open(name + ".started", "w").close()
        deadline = time.monotonic() + 20
        while not os.path.exists(name + ".release") and time.monotonic() < deadline:
            time.sleep(0.01)
    if path == "/teapot":
        status = "418 I'm a teapot"
    else:
        status = "200 OK"
    body = f"{os.getpid()} {VERSION} {path}\\n".encode()
    start_response(status, [
        ("Content-Type", "text/plain"),
        ("Content-Length", str(len(body))),
        ("X-Pid", str(os.getpid())),
    ])
    return [body]


app = validator(_app)  # PEP 3333 checked on every request the process tests make
"""


class Serve:
    """``python -m netstack [global args] serve app:app --bind 127.0.0.1:0 ...`` in ``cwd``.

    The master prints ``listening on http://127.0.0.1:PORT`` (and ``metrics on ...``);
    stderr (the logs) is collected line by line in a thread.
    """

    def __init__(
        self,
        cwd: Path,
        *args: str,
        app: str = "app:app",
        source: str | None = APP,
        global_args: tuple[str, ...] = (),
        wait_listening: bool = True,
    ) -> None:
        self.cwd = cwd
        if source is not None:
            (cwd / "app.py").write_text(source)
        cmd = [sys.executable, "-m", "netstack", *global_args, "serve", app]
        if not any(a.startswith("--bind") for a in args):
            cmd += ["--bind", "127.0.0.1:0"]
        cmd += list(args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # so cleanup can end exactly this process group
        )
        self.pid = self.proc.pid
        self.out: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._pump_out, daemon=True),
            threading.Thread(target=self._pump_err, daemon=True),
        ]
        for t in self._readers:
            t.start()
        self.port = 0
        self.metrics_port = 0
        if wait_listening:
            self.port = self._expect(r"listening on http://127\.0\.0\.1:(\d+)")
            if any(a.startswith("--metrics-bind") for a in args):
                self.metrics_port = self._expect(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.put(line)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def _expect(self, pattern: str) -> int:
        deadline = time.monotonic() + 3 * TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self.out.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            match = re.search(pattern, line)
            if match:
                return int(match[1])
        raise AssertionError(f"no {pattern!r} on stdout; stderr:\n{self.stderr}")

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    # ------------------------------------------------------------------ processes

    def workers(self) -> set[int]:
        """Live worker pids (children of the master, zombies excluded)."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return set()
        return {int(p) for p in text.split() if alive(int(p))}

    def wait_workers(self, n: int, timeout: float = 3 * TIMEOUT) -> set[int]:
        """Wait until ``n`` workers run and all of them serve (logged "serving")."""
        poll_until(lambda: len(self.workers()) == n and self._all_serving(), timeout)
        return self.workers()

    def _all_serving(self) -> bool:
        log = self.stderr
        return all(f"worker pid {pid} serving" in log for pid in self.workers())

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 3 * TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(TIMEOUT)
        return code

    def wait_log(self, text: str, timeout: float = 3 * TIMEOUT, count: int = 1) -> None:
        poll_until(lambda: self.stderr.count(text) >= count, timeout)

    # ------------------------------------------------------------------ HTTP

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=3 * TIMEOUT)

    def get(self, path: str = "/") -> tuple[int, str]:
        conn = self.connect()
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def scrape(self) -> dict[str, float]:
        """``/metrics`` parsed into ``{'name{label="v",...}': value}``."""
        from prometheus_client.parser import text_string_to_metric_families

        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            assert resp.status == 200, resp.status
            assert resp.getheader("content-type", "").startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        finally:
            conn.close()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    # ------------------------------------------------------------------ cleanup

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def kill(self) -> None:
        """End this test's process group (master and workers), whatever state it is in."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(3 * TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(TIMEOUT)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # orphaned workers, if a test killed the master
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def alive(pid: int) -> bool:
    """True for a running process, False for a gone or zombie one."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    match = re.search(r"^State:\s+(\S)", status, re.MULTILINE)
    return match is not None and match[1] not in ("Z", "X")


class LoadResult:
    def __init__(self) -> None:
        self.ok = 0
        self.retries = 0
        self.refused = 0  # new connections refused (the end of a load during SIGTERM)
        self.failures: list[str] = []
        self.pids: dict[str, int] = {}  # worker pid -> requests it answered
        self.lock = threading.Lock()


def keepalive_load(
    port: int,
    stop: threading.Event,
    result: LoadResult,
    max_requests: int = 20_000,
    *,
    until_refused: bool = False,
) -> None:
    """One client thread: keep-alive GETs until ``stop`` (or ``max_requests``).

    A request is retried only when it went out on a *reused* connection and the
    connection closed before any byte of the response arrived (what browsers and urllib3
    do: the server may close an idle keep-alive connection at any moment). Each retry is
    counted; anything else is a failure. With ``until_refused`` a refused connect ends
    the thread (the server stopped listening) instead of counting as a failure.
    """
    conn: http.client.HTTPConnection | None = None
    used = 0
    sent = 0
    while not stop.is_set() and sent < max_requests:
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3 * TIMEOUT)
            used = 0
        sent += 1
        try:
            if conn.sock is None:
                conn.connect()
        except ConnectionRefusedError as exc:
            conn = None
            with result.lock:
                if until_refused:
                    result.refused += 1
                    return
                result.failures.append(f"connect: {exc!r}")
            continue
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            body = resp.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
            conn.close()
            conn = None
            if used:
                with result.lock:
                    result.retries += 1
                continue  # the retry: the next iteration sends it on a new connection
            with result.lock:
                result.failures.append(f"fresh connection: {exc!r}")
            continue
        except Exception as exc:
            conn.close()
            conn = None
            with result.lock:
                result.failures.append(repr(exc))
            continue
        used += 1
        if resp.status != 200:
            with result.lock:
                result.failures.append(f"status {resp.status}")
        else:
            with result.lock:
                result.ok += 1
                pid = body.split()[0].decode()
                result.pids[pid] = result.pids.get(pid, 0) + 1
        if resp.will_close:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
