"""The ``netstack up`` dashboard: a collector thread and the WSGI app that shows what it saw.

Theory of operation
-------------------
:class:`Dashboard` owns one background thread. Every ``interval`` it asks the controller
for the components, scrapes every metrics endpoint (and the balancer's admin API) in
parallel with short timeouts, and turns the difference between this scrape and an
earlier good one of the same process into rates and latency quantiles (:mod:`.scrape`).
The result is a *snapshot*: a JSON-ready dict, numbered by ``seq``. The last
:data:`HISTORY` points of the charted series stay in a ring.

Rates are taken over a sliding ``window`` (default :data:`WINDOW` seconds, as PromQL's
``rate(x[5s])``), not between two consecutive scrapes: ``netstack serve`` workers push
their counters to the master once a second, so a one-second scrape would alias between
zero and twice the true rate. The baseline is the newest scrape at least ``window`` old.

A failed scrape never raises out of the collector: the component is shown with
``data: false`` and the error, and its baselines are dropped so the next good scrape
starts afresh. A new pid (the supervisor restarted the process) also restarts them, with
the new process's counters counted from zero.

The WSGI app (``dash.app``) is mounted under a ``SCRIPT_NAME`` (``/_dashboard`` behind the
balancer), so the page uses relative URLs only:

    GET  ./                               the page (static/index.html)
    GET  static/NAME                      its CSS, JS, icon, vendored uPlot
    GET  api/snapshot                     the latest snapshot plus the history ring
    GET  api/events                       Server-Sent Events: the same, then one per scrape
    POST api/components/NAME/kill         controller.kill(NAME): 404 unknown, 409 refused
    POST api/components/NAME/restore      controller.restore(NAME)

An event stream holds one server thread (the server runs WSGI apps in threads), so at most
``max_streams`` run at once (the page falls back to polling ``api/snapshot`` on a 503),
and each ends after ``stream_seconds`` (the browser's EventSource reconnects by itself).
:meth:`Dashboard.close` ends them all: call it before closing the server.

The POST endpoints kill processes, so a cross-site form must not reach them: they require
the ``X-Netstack-Dashboard`` header (which a cross-origin page cannot send without a CORS
preflight this app never approves) and, when the browser sends ``Origin``, the same host.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from netstack.servers.up.scrape import (
    Samples,
    ScrapeError,
    bucket_deltas,
    counter_delta,
    fetch_json,
    histogram_quantile,
    normalize_address,
    scrape,
)
from netstack.servers.up.topology import Component, Controller, Kind, State

logger = logging.getLogger(__name__)

StartResponse = Callable[..., Any]

# 300 points at the default 1 s interval: the charts show the last five minutes.
HISTORY: Final = 300
# Rates and quantiles cover this many seconds (at least three scrape intervals).
WINDOW: Final = 5.0
# Each open event stream holds a server thread; the page polls when refused.
MAX_STREAMS: Final = 8
# EventSource reconnects by itself; ending streams now and then frees their threads and
# bounds the life of any one response.
STREAM_SECONDS: Final = 300.0
# A comment line this often keeps proxies (and the balancer's read timeout) from giving up
# on a quiet stream, and lets the server notice a client that went away.
KEEPALIVE_SECONDS: Final = 15.0
# Scrapes run side by side; more sources than this wait for a free slot.
SCRAPE_THREADS: Final = 8
# A kill/restore asks for an immediate scrape, but never more often than this.
MIN_SPACING: Final = 0.2
CONTROL_HEADER: Final = "HTTP_X_NETSTACK_DASHBOARD"

STATIC: Final = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
    "vendor/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "vendor/uPlot.min.css": "text/css; charset=utf-8",
    "vendor/LICENSE-uPlot.txt": "text/plain; charset=utf-8",
}
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def load_static() -> dict[str, bytes]:
    """The page's files, read once from the package."""
    root = importlib.resources.files("netstack.servers.up").joinpath("static")
    out = {}
    for name in STATIC:
        node = root
        for part in name.split("/"):
            node = node.joinpath(part)
        out[name] = node.read_bytes()
    return out


@dataclass(frozen=True, slots=True)
class _Baseline:
    """The last good scrape of one component's process."""

    pid: int | None
    at: float  # time.monotonic()
    samples: Samples


class _Diff:
    """Rates and quantiles between a baseline and the current scrape of one process."""

    def __init__(self, current: Samples, base: _Baseline | None, pid: int | None, now: float):
        self.cur = current
        # No baseline: rates are unknown until the next scrape. A new pid: the process
        # restarted after the baseline, so its counters count from zero over the interval.
        self.prev = None if base is None or base.pid != pid else base.samples
        self.dt = now - base.at if base is not None else 0.0
        self.known = base is not None and self.dt > 0

    def rate(self, name: str, **labels: str) -> float | None:
        if not self.known:
            return None
        before = self.prev.total(name, **labels) if self.prev is not None else None
        delta = counter_delta(before or 0.0, self.cur.total(name, **labels))
        return None if delta is None else _round(delta / self.dt)

    def rates_by(
        self, name: str, label: str, keep: Callable[[str], bool] = bool
    ) -> dict[str, float]:
        if not self.known or name not in self.cur:
            return {}
        before = self.prev.by_label(name, label) if self.prev is not None else {}
        out = {}
        for key, value in self.cur.by_label(name, label).items():
            if keep(key):
                out[key] = _round((counter_delta(before.get(key, 0.0), value) or 0.0) / self.dt)
        return out

    def quantiles(self, histogram: str) -> tuple[float | None, float | None]:
        """(p50, p99) in milliseconds of what was observed since the baseline."""
        if not self.known:
            return None, None
        before = self.prev.buckets(histogram) if self.prev is not None else {}
        delta = bucket_deltas(before, self.cur.buckets(histogram))
        return _ms(histogram_quantile(0.5, delta)), _ms(histogram_quantile(0.99, delta))

    def gauge(self, name: str, **labels: str) -> float | None:
        return self.cur.total(name, **labels)


def _round(value: float) -> float:
    return round(value, 2)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _ok(status: str) -> bool:
    return not status.startswith("5")


# gRPC codes that answer a caller's mistake or choice (what the gRPC-to-HTTP mapping makes
# 4xx): NOT_FOUND, ALREADY_EXISTS... are the service doing its job, shown apart from
# errors. Every other non-OK code, one we do not know included, is a server-side error
# (UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, DATA_LOSS,
# UNIMPLEMENTED).
GRPC_CLIENT_CODES: Final = frozenset(
    {
        "CANCELLED",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNAUTHENTICATED",
    }
)


def _rpc_error(code: str) -> bool:
    return code != "OK" and code not in GRPC_CLIENT_CODES


class Dashboard:
    """Watches a :class:`~.topology.Controller`'s components and serves the dashboard.

    Args:
        controller: the supervisor (thread-safe methods).
        interval: seconds between scrapes (and between events on the page).
        window: seconds the rates and quantiles cover; default ``max(WINDOW, 3 * interval)``.
        history: points kept for the charts.
        timeout: per-scrape timeout; default ``min(1, 0.8 * interval)``.
        max_streams: event streams served at once (each holds a server thread).
        stream_seconds: an event stream ends after this; the browser reconnects.
        control: serve the kill/restore endpoints (False: 403 and no buttons).

    Raises:
        ValueError: a setting out of range: interval, timeout, window or stream_seconds
            not > 0, history < 2, max_streams < 0.
    """

    def __init__(
        self,
        controller: Controller,
        interval: float = 1.0,
        *,
        history: int = HISTORY,
        timeout: float | None = None,
        max_streams: int = MAX_STREAMS,
        stream_seconds: float = STREAM_SECONDS,
        control: bool = True,
        window: float | None = None,
    ) -> None:
        if not interval > 0 or not math.isfinite(interval):
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        if history < 2:
            raise ValueError(f"history must keep at least 2 points, not {history!r}")
        if max_streams < 0:
            raise ValueError(f"max_streams must be >= 0, not {max_streams!r}")
        if not stream_seconds > 0:
            raise ValueError(f"stream_seconds must be > 0, not {stream_seconds!r}")
        self.controller = controller
        self.interval = float(interval)
        self.timeout = min(1.0, 0.8 * self.interval) if timeout is None else float(timeout)
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, not {timeout!r}")
        self.window = max(WINDOW, 3 * self.interval) if window is None else float(window)
        if not self.window > 0:
            raise ValueError(f"window must be > 0, not {window!r}")
        self.max_streams = max_streams
        self.stream_seconds = stream_seconds
        self.control = control
        self.static = load_static()
        self.app = DashboardApp(self)

        self._baselines: dict[str, deque[_Baseline]] = {}
        self._history: deque[dict[str, Any]] = deque(maxlen=history)
        self._latest: dict[str, Any] = {
            "seq": 0,
            "time": time.time(),
            "interval": self.interval,
            "control": control,
            "components": [],
        }
        self._cond = threading.Condition()
        self._streams = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._closed = False
        self._collecting = threading.Lock()  # collect() may also be called directly
        self._pool = ThreadPoolExecutor(SCRAPE_THREADS, thread_name_prefix="netstack-dash-scrape")
        self._thread = threading.Thread(target=self._run, name="netstack-dashboard", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the collector and end every event stream (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(self.timeout * 3 + 1.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            wait = last + MIN_SPACING - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            last = time.monotonic()
            try:
                self.collect()
            except Exception:  # a bug here must not stop the dashboard for good
                logger.exception("dashboard: collection failed")
            self._wake.wait(max(0.0, last + self.interval - time.monotonic()))
            self._wake.clear()

    def refresh(self) -> None:
        """Collect again now rather than at the next tick (after a kill or restore)."""
        self._wake.set()

    # ------------------------------------------------------------------ collection

    def collect(self) -> dict[str, Any]:
        """Scrape every source once, publish and return the new snapshot."""
        with self._collecting:
            return self._collect()

    def _collect(self) -> dict[str, Any]:
        now, wall = time.monotonic(), time.time()
        try:
            components = list(self.controller.components())
        except Exception:
            logger.exception("dashboard: controller.components() failed")
            components = []
        scrapes: dict[str, Future[Samples]] = {}
        admin: Future[Any] | None = None
        for comp in components:
            url = comp.metrics_url or (f"{comp.admin_url}/metrics" if comp.admin_url else None)
            if url is not None:
                scrapes[comp.name] = self._submit(scrape, url, timeout=self.timeout)
            if comp.kind is Kind.BALANCER and comp.admin_url and admin is None:
                admin = self._submit(
                    fetch_json,
                    f"{comp.admin_url}/api/backends",
                    timeout=self.timeout,
                    token=self.controller.admin_token,
                )
        health, health_error = self._health(admin)
        rows = []
        for comp in components:
            row = self._row(comp, scrapes.get(comp.name), now, health, health_error)
            rows.append(row)
        known = {c.name for c in components}
        for name in [n for n in self._baselines if n not in known]:
            del self._baselines[name]
        point = _point(wall, rows)
        with self._cond:
            self._history.append(point)
            snapshot = {
                "seq": self._latest["seq"] + 1,
                "time": wall,
                "interval": self.interval,
                "control": self.control,
                "components": rows,
                "totals": _totals(rows),
                "point": point,
            }
            self._latest = snapshot
            self._cond.notify_all()
        return snapshot

    def _submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        try:
            return self._pool.submit(fn, *args, **kwargs)
        except RuntimeError:  # closing: the pool is shut down
            failed: Future[Any] = Future()
            failed.set_exception(ScrapeError("dashboard closing"))
            return failed

    def _result(self, future: Future[Any]) -> Any:
        """A scrape's result; ScrapeError for any failure (bugs are logged)."""
        try:
            return future.result(timeout=self.timeout * 2 + 0.5)
        except FutureTimeout:
            raise ScrapeError("timed out") from None
        except ScrapeError:
            raise
        except Exception as exc:
            logger.exception("dashboard: scrape failed")
            raise ScrapeError(f"scrape failed: {type(exc).__name__}") from None

    def _health(self, admin: Future[Any] | None) -> tuple[dict[str, dict[str, Any]], str | None]:
        """The balancer's view of its backends, by normalized address."""
        if admin is None:
            return {}, "no balancer admin API"
        try:
            pools = self._result(admin)
        except ScrapeError as exc:
            return {}, str(exc)
        out: dict[str, dict[str, Any]] = {}
        if isinstance(pools, dict):
            for pool, backends in pools.items():
                for b in backends if isinstance(backends, list) else ():
                    if isinstance(b, dict) and isinstance(b.get("address"), str):
                        keep = (
                            "name",
                            "state",
                            "admin",
                            "active",
                            "total",
                            "failures",
                            "ejections",
                        )
                        view = {k: b.get(k) for k in keep}
                        out.setdefault(normalize_address(b["address"]), {"pool": pool, **view})
        return out, None

    def _row(
        self,
        comp: Component,
        future: Future[Samples] | None,
        now: float,
        health: dict[str, dict[str, Any]],
        health_error: str | None,
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "name": comp.name,
            "kind": comp.kind.value,
            "address": comp.address,
            "state": comp.state.value,
            "pid": comp.pid,
            "restarts": comp.restarts,
            "controllable": comp.kind is not Kind.BALANCER and self.control,
            "data": False,
            "error": None,
        }
        if comp.kind is Kind.WEB:
            lb = health.get(normalize_address(comp.address))
            row["lb"] = lb
            if lb is None:
                row["lb_error"] = health_error or "not in the balancer's pools"
        if future is None:
            row["error"] = "no metrics endpoint"
            return {**row, **_figures(comp.kind, None)}
        try:
            samples = self._result(future)
        except ScrapeError as exc:
            self._baselines.pop(comp.name, None)
            row["error"] = "stopped" if comp.state is State.STOPPED else str(exc)
            return {**row, **_figures(comp.kind, None)}
        ring = self._baselines.setdefault(comp.name, deque())
        while len(ring) > 1 and now - ring[1].at >= self.window:
            ring.popleft()  # ring[0]: the newest scrape at least `window` old, or the oldest
        diff = _Diff(samples, ring[0] if ring else None, comp.pid, now)
        if ring and ring[-1].pid != comp.pid:
            ring.clear()  # a restarted process: older scrapes count another one
        ring.append(_Baseline(comp.pid, now, samples))
        row["data"] = True
        return {**row, **_figures(comp.kind, diff)}

    # ------------------------------------------------------------------ reading

    def snapshot(self, *, history: bool = True) -> dict[str, Any]:
        """The latest snapshot (a copy), with the history ring when asked."""
        with self._cond:
            snap = dict(self._latest)
            if history:
                snap["history"] = list(self._history)
        return snap

    def wait_for(self, seq: int, timeout: float) -> dict[str, Any] | None:
        """Block until a snapshot newer than ``seq`` is published; None on timeout/close."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._latest["seq"] > seq or self._stop.is_set(), timeout=timeout
            )
            if self._latest["seq"] > seq and not self._stop.is_set():
                return dict(self._latest)
        return None

    def events(self) -> Generator[bytes, None, None]:
        """The SSE byte stream: a full snapshot, then one small event per collection."""
        deadline = time.monotonic() + self.stream_seconds
        first = self.snapshot()
        yield b"retry: 2000\n" + _event(first)
        seq = first["seq"]
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            snap = self.wait_for(seq, min(KEEPALIVE_SECONDS, left))
            if snap is None:
                if self._stop.is_set():
                    return
                yield b": keep-alive\n\n"
                continue
            seq = snap["seq"]
            yield _event(snap)

    def acquire_stream(self) -> bool:
        with self._cond:
            if self._streams >= self.max_streams or self._stop.is_set():
                return False
            self._streams += 1
            return True

    def release_stream(self) -> None:
        with self._cond:
            self._streams -= 1

    @property
    def streams(self) -> int:
        """Event streams being served now."""
        with self._cond:
            return self._streams


def _event(snapshot: dict[str, Any]) -> bytes:
    data = json.dumps(snapshot, separators=(",", ":"), allow_nan=False)
    return f"id: {snapshot['seq']}\ndata: {data}\n\n".encode()


# ---------------------------------------------------------------------- figures


def _figures(kind: Kind, d: _Diff | None) -> dict[str, Any]:
    """The numbers one component shows; all None without data."""
    if kind is Kind.WEB:
        p50, p99 = d.quantiles("netstack_http_request_duration_seconds") if d else (None, None)
        name = "netstack_http_requests_total"
        return {
            "rps": d.rate(name) if d else None,
            "errors_rps": sum(d.rates_by(name, "status", lambda s: not _ok(s)).values())
            if d and d.known
            else None,
            "p50_ms": p50,
            "p99_ms": p99,
            "open_connections": d.gauge("netstack_http_open_connections") if d else None,
            "in_flight": d.gauge("netstack_http_requests_in_flight") if d else None,
            "workers": d.gauge("netstack_workers") if d else None,
            "requests_total": d.gauge(name) if d else None,
        }
    if kind is Kind.BALANCER:
        return {
            "rps": d.rate("netstack_lb_http_requests_total") if d else None,
            "responses": d.rates_by("netstack_lb_http_responses_total", "code") if d else {},
            "responses_total": d.cur.by_label("netstack_lb_http_responses_total", "code")
            if d
            else {},
            "retries_rps": d.rate("netstack_lb_http_retries_total") if d else None,
            "retries_total": d.gauge("netstack_lb_http_retries_total") if d else None,
            "active_connections": d.gauge("netstack_lb_connections_active") if d else None,
            "backend_failures_total": d.gauge("netstack_lb_backend_failures_total") if d else None,
            "no_backend_total": d.gauge("netstack_lb_no_backend_total") if d else None,
            "requests_total": d.gauge("netstack_lb_http_requests_total") if d else None,
        }
    if kind is Kind.RPC:
        p50, p99 = d.quantiles("netstack_rpc_call_duration_seconds") if d else (None, None)
        name = "netstack_rpc_calls_total"
        return {
            "calls_rps": d.rate(name) if d else None,
            "errors_rps": sum(d.rates_by(name, "code", _rpc_error).values())
            if d and d.known
            else None,
            "client_errors_rps": sum(
                d.rates_by(name, "code", GRPC_CLIENT_CODES.__contains__).values()
            )
            if d and d.known
            else None,
            "p50_ms": p50,
            "p99_ms": p99,
            "calls_total": d.gauge(name) if d else None,
        }
    # Kind.CHAT
    return {
        "users_online": d.gauge("netstack_chat_users_online") if d else None,
        "connections": d.cur.by_label("netstack_chat_connections", "transport") if d else {},
        "messages_rps": d.rate("netstack_chat_messages_total") if d else None,
        "messages_total": d.gauge("netstack_chat_messages_total") if d else None,
    }


def _point(wall: float, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One history point: what the charts plot."""
    web = [r for r in rows if r["kind"] == Kind.WEB.value]
    return {
        "t": round(wall, 3),
        "rps": {r["name"]: r["rps"] for r in web},
        "p99": {r["name"]: r["p99_ms"] for r in web},
        "lb_rps": next((r["rps"] for r in rows if r["kind"] == Kind.BALANCER.value), None),
    }


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def total(kind: Kind, key: str) -> float | None:
        values = [r[key] for r in rows if r["kind"] == kind.value and r[key] is not None]
        return _round(sum(values)) if values else None

    web = [r for r in rows if r["kind"] == Kind.WEB.value]
    return {
        "web_rps": total(Kind.WEB, "rps"),
        "web_up": sum(1 for r in web if r["state"] == State.RUNNING.value),
        "web_total": len(web),
        "rpc_calls_rps": total(Kind.RPC, "calls_rps"),
        "chat_users_online": total(Kind.CHAT, "users_online"),
    }


# ---------------------------------------------------------------------- the WSGI app


class _HTTPError(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class DashboardApp:
    """The dashboard's WSGI application (``Dashboard.app``)."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dash = dashboard

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        try:
            if path == "":  # /_dashboard -> /_dashboard/, so relative URLs resolve under it
                location = environ.get("SCRIPT_NAME", "") + "/"
                start_response("308 Permanent Redirect", [("Location", location), *_common()])
                return [b""]
            if path in ("/", "/index.html"):
                return self._static("index.html", method, start_response)
            if path.startswith("/static/"):
                return self._static(path.removeprefix("/static/"), method, start_response)
            if path == "/api/snapshot":
                _allow(method, "GET", "HEAD")
                return _json(start_response, "200 OK", self.dash.snapshot())
            if path == "/api/events":
                _allow(method, "GET")
                return self._events(start_response)
            parts = path.strip("/").split("/")
            if len(parts) == 4 and parts[:2] == ["api", "components"]:
                _allow(method, "POST")
                return self._control(environ, parts[2], parts[3], start_response)
            raise _HTTPError("404 Not Found", f"no such page: {path}")
        except _HTTPError as exc:
            extra = [("Allow", exc.message)] if exc.status.startswith("405") else []
            message = f"method not allowed (allowed: {exc.message})" if extra else exc.message
            return _json(start_response, exc.status, {"error": message}, extra)

    def _static(self, name: str, method: str, start_response: StartResponse) -> list[bytes]:
        _allow(method, "GET", "HEAD")
        body = self.dash.static.get(name)
        if body is None:
            raise _HTTPError("404 Not Found", f"no such file: {name}")
        headers = [
            ("Content-Type", STATIC[name]),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-cache"),
            *_common(),
        ]
        if name.endswith(".html"):
            headers.append(("Content-Security-Policy", CSP))
        start_response("200 OK", headers)
        return [body]

    def _events(self, start_response: StartResponse) -> Iterable[bytes]:
        if not self.dash.acquire_stream():
            return _json(
                start_response,
                "503 Service Unavailable",
                {"error": f"at most {self.dash.max_streams} event streams; poll api/snapshot"},
                [("Retry-After", str(max(1, round(self.dash.interval))))],
            )
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/event-stream; charset=utf-8"),
                ("Cache-Control", "no-store"),
                ("X-Accel-Buffering", "no"),  # nginx and friends: do not buffer the stream
                *_common(),
            ],
        )
        return _Stream(self.dash.events(), self.dash.release_stream)

    def _control(
        self, environ: dict[str, Any], name: str, action: str, start_response: StartResponse
    ) -> list[bytes]:
        if not self.dash.control:
            raise _HTTPError("403 Forbidden", "kill/restore is disabled on this dashboard")
        if environ.get(CONTROL_HEADER) is None:
            raise _HTTPError("403 Forbidden", "missing the X-Netstack-Dashboard header")
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and urlsplit(origin).netloc != environ.get("HTTP_HOST"):
            raise _HTTPError("403 Forbidden", f"cross-origin request from {origin}")
        controller = self.dash.controller
        if action == "kill":
            do = controller.kill
        elif action == "restore":
            do = controller.restore
        else:
            raise _HTTPError("404 Not Found", f"no such action: {action} (kill or restore)")
        try:
            do(name)
        except KeyError:
            raise _HTTPError("404 Not Found", f"no such component: {name}") from None
        except ValueError as exc:
            raise _HTTPError("409 Conflict", str(exc) or f"{name} cannot be {action}ed") from None
        except Exception as exc:
            logger.exception("dashboard: %s %s failed", action, name)
            raise _HTTPError(
                "500 Internal Server Error", f"{action} {name} failed: {exc}"
            ) from None
        logger.info("dashboard: %s %s", action, name)
        self.dash.refresh()
        return _json(start_response, "200 OK", {"ok": True, "name": name, "action": action})


class _Stream:
    """An event stream's response iterable: releases its slot exactly once on close()."""

    def __init__(self, chunks: Generator[bytes, None, None], release: Callable[[], None]) -> None:
        self._chunks = chunks
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._chunks.close()
        release, self._release = self._release, None
        if release is not None:
            release()


def _common() -> list[tuple[str, str]]:
    return [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer")]


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise _HTTPError("405 Method Not Allowed", ", ".join(allowed))


def _json(
    start_response: StartResponse,
    status: str,
    doc: Any,
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *_common(),
            *(extra or []),
        ],
    )
    return [body]


__all__ = ["Dashboard", "DashboardApp"]
