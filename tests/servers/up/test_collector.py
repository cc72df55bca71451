"""The dashboard's collector and WSGI app, fed by real loopback exporters whose counters
the test sets (resets, restarts, failures), behind a real netstack WSGIServer.

The controller here is a plain in-memory one: these tests are about what the dashboard
computes and serves, not about processes (test_dashboard.py kills real ones).
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from netstack.servers.up.dashboard import Dashboard
from netstack.servers.up.topology import Component, Kind, State
from tests.helpers import TIMEOUT, free_port, poll_until
from tests.servers.up.support import DashServer, Exporter, get, post

TOKEN = "collector-test-token-0123456789"


def web_text(requests: int, fast: int, slow: int, *, errors: int = 0, conns: int = 1) -> str:
    """netstack serve's exposition: ``fast`` requests under 5 ms, ``slow`` ones at 50-75 ms."""
    return f"""\
# TYPE netstack_http_requests_total counter
netstack_http_requests_total{{method="GET",status="200"}} {requests}
netstack_http_requests_total{{method="GET",status="502"}} {errors}
# TYPE netstack_http_request_duration_seconds histogram
netstack_http_request_duration_seconds_bucket{{le="0.005"}} {fast}
netstack_http_request_duration_seconds_bucket{{le="0.05"}} {fast}
netstack_http_request_duration_seconds_bucket{{le="0.075"}} {fast + slow}
netstack_http_request_duration_seconds_bucket{{le="+Inf"}} {fast + slow}
netstack_http_request_duration_seconds_count {fast + slow}
netstack_http_request_duration_seconds_sum 1.0
# TYPE netstack_http_open_connections gauge
netstack_http_open_connections {conns}
# TYPE netstack_http_requests_in_flight gauge
netstack_http_requests_in_flight 0
# TYPE netstack_workers gauge
netstack_workers 1
"""


LB_TEXT = """\
# TYPE netstack_lb_http_requests_total counter
netstack_lb_http_requests_total {requests}
# TYPE netstack_lb_http_retries_total counter
netstack_lb_http_retries_total 3
# TYPE netstack_lb_http_responses_total counter
netstack_lb_http_responses_total{{code="2xx"}} {ok}
netstack_lb_http_responses_total{{code="5xx"}} {bad}
# TYPE netstack_lb_connections_active gauge
netstack_lb_connections_active 4
"""

RPC_TEXT = """\
# TYPE netstack_rpc_calls_total counter
netstack_rpc_calls_total{{method="/notes.Notes/GetNote",code="OK"}} {ok}
netstack_rpc_calls_total{{method="/notes.Notes/GetNote",code="NOT_FOUND"}} {bad}
netstack_rpc_calls_total{{method="/notes.Notes/CreateNote",code="INVALID_ARGUMENT"}} {bad}
netstack_rpc_calls_total{{method="/notes.Notes/GetNote",code="UNAVAILABLE"}} {failed}
netstack_rpc_calls_total{{method="/notes.Notes/GetNote",code="INTERNAL"}} {failed}
# TYPE netstack_rpc_call_duration_seconds histogram
netstack_rpc_call_duration_seconds_bucket{{le="0.001"}} {ok}
netstack_rpc_call_duration_seconds_bucket{{le="+Inf"}} {total}
netstack_rpc_call_duration_seconds_count {total}
netstack_rpc_call_duration_seconds_sum 0.01
"""

CHAT_TEXT = """\
# TYPE netstack_chat_users_online gauge
netstack_chat_users_online 7
# TYPE netstack_chat_connections gauge
netstack_chat_connections{{transport="websocket"}} 5
netstack_chat_connections{{transport="tcp"}} 2
# TYPE netstack_chat_messages_total counter
netstack_chat_messages_total {messages}
"""


class MemoryController:
    """Components in a list; kill/restore flip their state and record the call."""

    admin_token = TOKEN

    def __init__(self, components: list[Component]) -> None:
        self.lock = threading.Lock()
        self.items = {c.name: c for c in components}
        self.calls: list[tuple[str, str]] = []
        self.fail_components = False

    def components(self) -> list[Component]:
        if self.fail_components:
            raise RuntimeError("supervisor hiccup")
        with self.lock:
            return list(self.items.values())

    def replace(self, name: str, **changes) -> None:
        from dataclasses import replace

        with self.lock:
            self.items[name] = replace(self.items[name], **changes)

    def kill(self, name: str) -> None:
        self.calls.append(("kill", name))
        comp = self.items[name]  # KeyError for an unknown name
        if comp.kind is Kind.BALANCER:
            raise ValueError("the balancer serves the dashboard")
        self.replace(name, state=State.STOPPED, pid=None)

    def restore(self, name: str) -> None:
        self.calls.append(("restore", name))
        self.replace(name, state=State.RUNNING, pid=4242)


@pytest.fixture
def exporters():
    made: list[Exporter] = []

    def make(token=None) -> Exporter:
        made.append(Exporter(token))
        return made[-1]

    yield make
    for e in made:
        e.close()


def wait_first(dash: Dashboard) -> None:
    poll_until(lambda: dash.snapshot()["seq"] >= 1)


def row(snap, name):
    return next(r for r in snap["components"] if r["name"] == name)


def test_rates_quantiles_resets_and_restarts(exporters):
    web = exporters()
    web.set(web_text(100, 90, 10))
    ctl = MemoryController(
        [Component("web-1", Kind.WEB, "127.0.0.1:1", metrics_url=web.url(), pid=10)]
    )
    # The test drives collect() itself; a tiny window: each rate is over one step.
    dash = Dashboard(ctl, interval=3600, window=1e-6)
    try:
        wait_first(dash)
        first = dash.snapshot()
        r = row(first, "web-1")
        assert r["data"] is True
        assert r["rps"] is None  # one scrape: no rate yet
        assert r["p99_ms"] is None
        assert r["open_connections"] == 1

        # 50 more requests: 40 fast, 10 at 50-75 ms, 5 of them 502s.
        web.set(web_text(145, 130, 20, errors=5, conns=3))
        snap = dash.collect()
        r = row(snap, "web-1")
        dt = snap["time"] - first["time"]
        assert r["rps"] == pytest.approx(50 / dt, rel=0.05)
        assert r["errors_rps"] == pytest.approx(5 / dt, rel=0.05)
        # rank 25 of 50 is in the 0-5 ms bucket (40 there): 25/40 * 5 ms.
        assert r["p50_ms"] == pytest.approx(5 * 25 / 40, abs=0.01)
        # rank 49.5 is in 50-75 ms (10 there, 40 below): 50 + 25 * 9.5/10.
        assert r["p99_ms"] == pytest.approx(50 + 25 * 9.5 / 10, abs=0.01)
        assert r["open_connections"] == 3
        assert r["requests_total"] == 150
        assert snap["totals"]["web_rps"] == r["rps"]
        assert snap["point"]["rps"] == {"web-1": r["rps"]}

        # The process restarted under the same pid (a worker): counters went down.
        web.set(web_text(12, 12, 0))
        t0 = snap["time"]
        snap = dash.collect()
        r = row(snap, "web-1")
        assert r["rps"] == pytest.approx(12 / (snap["time"] - t0), rel=0.05)
        assert r["p99_ms"] is not None
        assert r["p99_ms"] <= 5

        # A new pid: everything the new process counted is new, even if it is more.
        ctl.replace("web-1", pid=11)
        web.set(web_text(30, 30, 0))
        t0 = snap["time"]
        snap = dash.collect()
        assert row(snap, "web-1")["rps"] == pytest.approx(30 / (snap["time"] - t0), rel=0.05)

        # No traffic: a zero rate, and no latency to show rather than a stale one.
        snap = dash.collect()
        assert row(snap, "web-1")["rps"] == 0
        assert row(snap, "web-1")["p99_ms"] is None
        assert len(dash.snapshot()["history"]) == snap["seq"]
    finally:
        dash.close()


def test_rates_cover_the_window_not_just_the_last_step(exporters):
    web = exporters()
    web.set(web_text(0, 0, 0))
    ctl = MemoryController(
        [Component("web-1", Kind.WEB, "127.0.0.1:1", metrics_url=web.url(), pid=10)]
    )
    dash = Dashboard(ctl, interval=3600, window=3600)
    try:
        wait_first(dash)
        t0 = dash.snapshot()["time"]
        web.set(web_text(100, 100, 0))
        dash.collect()
        # Nothing new in the last step, but the window still holds the 100 requests: a
        # one-second scrape of a counter pushed once a second does not read zero.
        snap = dash.collect()
        assert row(snap, "web-1")["rps"] == pytest.approx(100 / (snap["time"] - t0), rel=0.05)
        assert row(snap, "web-1")["p50_ms"] is not None
    finally:
        dash.close()


def test_a_failing_source_shows_no_data_and_recovers(exporters):
    web = exporters()
    web.set(web_text(10, 10, 0))
    ctl = MemoryController(
        [
            Component("web-1", Kind.WEB, "127.0.0.1:1", metrics_url=web.url(), pid=1),
            Component("web-2", Kind.WEB, "127.0.0.1:2", pid=2),  # no metrics endpoint
            Component(
                "web-3",
                Kind.WEB,
                "127.0.0.1:3",
                metrics_url=f"http://127.0.0.1:{free_port()}/metrics",
                state=State.RESTARTING,
            ),
        ]
    )
    dash = Dashboard(ctl, interval=3600, window=1e-6)
    try:
        wait_first(dash)
        snap = dash.snapshot()
        assert row(snap, "web-2") | {"error": "no metrics endpoint", "data": False} == row(
            snap, "web-2"
        )
        assert row(snap, "web-2")["rps"] is None
        assert "connection refused" in row(snap, "web-3")["error"]
        assert row(snap, "web-3")["state"] == "restarting"

        web.set("oops", status=503)
        snap = dash.collect()
        assert row(snap, "web-1")["data"] is False
        assert row(snap, "web-1")["error"].startswith("HTTP 503")
        web.set(web_text(20, 20, 0))
        snap = dash.collect()
        assert row(snap, "web-1")["data"] is True
        assert row(snap, "web-1")["rps"] is None  # a fresh baseline after the gap
        web.set(web_text(30, 30, 0))
        assert row(dash.collect(), "web-1")["rps"] > 0

        # A supervisor that fails to answer does not stop the collector.
        ctl.fail_components = True
        assert dash.collect()["components"] == []
        ctl.fail_components = False
        assert len(dash.collect()["components"]) == 3
    finally:
        dash.close()


def test_balancer_health_rpc_and_chat(exporters):
    lb = exporters(token=TOKEN)
    rpc, chat = exporters(), exporters()
    lb.set(LB_TEXT.format(requests=100, ok=95, bad=5))
    backends = {
        "web": [
            {
                "name": "b1",
                "address": "localhost:8001",
                "state": "up",
                "admin": "enabled",
                "active": 1,
                "total": 60,
                "failures": 0,
                "ejections": 0,
            },
            {
                "name": "b2",
                "address": "127.0.0.1:8002",
                "state": "down",
                "admin": "enabled",
                "active": 0,
                "total": 40,
                "failures": 3,
                "ejections": 1,
            },
        ]
    }
    lb.set(json.dumps(backends), "/api/backends")
    rpc.set(RPC_TEXT.format(ok=10, bad=0, failed=0, total=10))
    chat.set(CHAT_TEXT.format(messages=5))
    ctl = MemoryController(
        [
            Component("balancer", Kind.BALANCER, "127.0.0.1:8000", admin_url=lb.url(""), pid=1),
            Component("web-1", Kind.WEB, "127.0.0.1:8001", pid=2),
            Component("web-2", Kind.WEB, "127.0.0.1:8002", pid=3),
            Component("web-3", Kind.WEB, "127.0.0.1:8003", pid=4),
            Component("rpc", Kind.RPC, "127.0.0.1:50051", metrics_url=rpc.url(), pid=5),
            Component("chat", Kind.CHAT, "127.0.0.1:7000", metrics_url=chat.url(), pid=6),
        ]
    )
    dash = Dashboard(ctl, interval=3600, window=1e-6)
    try:
        wait_first(dash)
        t0 = dash.snapshot()["time"]
        lb.set(LB_TEXT.format(requests=200, ok=180, bad=20))
        rpc.set(RPC_TEXT.format(ok=40, bad=10, failed=3, total=50))
        chat.set(CHAT_TEXT.format(messages=25))
        snap = dash.collect()
        dt = snap["time"] - t0
        b = row(snap, "balancer")
        assert b["rps"] == pytest.approx(100 / dt, rel=0.05)
        assert b["responses"]["2xx"] == pytest.approx(85 / dt, rel=0.05)
        assert b["responses"]["5xx"] == pytest.approx(15 / dt, rel=0.05)
        assert b["responses_total"] == {"2xx": 180, "5xx": 20}
        assert b["retries_rps"] == 0
        assert b["retries_total"] == 3
        assert b["active_connections"] == 4
        assert b["controllable"] is False
        # Matched by address, whatever loopback spelling the balancer uses.
        assert row(snap, "web-1")["lb"]["state"] == "up"
        assert row(snap, "web-1")["lb"]["pool"] == "web"
        assert (
            row(snap, "web-2")["lb"] | {"state": "down", "failures": 3} == row(snap, "web-2")["lb"]
        )
        assert row(snap, "web-3")["lb"] is None
        assert row(snap, "web-3")["lb_error"] == "not in the balancer's pools"
        r = row(snap, "rpc")
        assert r["calls_rps"] == pytest.approx((30 + 2 * 10 + 2 * 3) / dt, rel=0.05)
        # Server-side failures are errors; NOT_FOUND / INVALID_ARGUMENT are shown apart.
        assert r["errors_rps"] == pytest.approx(2 * 3 / dt, rel=0.05)
        assert r["client_errors_rps"] == pytest.approx(2 * 10 / dt, rel=0.05)
        assert r["p50_ms"] is not None
        assert r["p50_ms"] <= 1
        assert r["p99_ms"] == 1.0  # in +Inf: the highest finite bound
        c = row(snap, "chat")
        assert c["users_online"] == 7
        assert c["connections"] == {"websocket": 5, "tcp": 2}
        assert c["messages_rps"] == pytest.approx(20 / dt, rel=0.05)
        assert snap["totals"]["chat_users_online"] == 7
        assert snap["totals"]["rpc_calls_rps"] == r["calls_rps"]

        # A wrong token: the health view is missing, with the reason; the rest still works.
        lb.token = "something-else-entirely"
        snap = dash.collect()
        assert row(snap, "web-1")["lb"] is None
        assert row(snap, "web-1")["lb_error"].startswith("HTTP 401")
        assert row(snap, "balancer")["data"] is True
    finally:
        dash.close()


def test_constructor_rejects_bad_settings():
    ctl = MemoryController([])
    for kwargs in (
        {"interval": 0},
        {"interval": float("nan")},
        {"history": 1},
        {"max_streams": -1},
        {"window": 0},
        {"timeout": 0},
        {"stream_seconds": 0},
    ):
        with pytest.raises(ValueError, match="must"):
            Dashboard(ctl, **kwargs)


# ---------------------------------------------------------------------- the WSGI app


@pytest.fixture
def served(exporters):
    web = exporters()
    web.set(web_text(10, 10, 0))
    ctl = MemoryController(
        [
            Component("balancer", Kind.BALANCER, "127.0.0.1:8000", pid=1),
            Component("web-1", Kind.WEB, "127.0.0.1:8001", metrics_url=web.url(), pid=2),
        ]
    )
    dash = Dashboard(ctl, interval=0.1, max_streams=2, stream_seconds=60)
    wait_first(dash)
    server = DashServer(dash.app)
    yield ctl, dash, server
    dash.close()  # first: it ends the event streams that hold server threads
    server.close()


def test_page_static_files_and_snapshot(served):
    _, dash, srv = served
    status, headers, body = get(srv.port, "/_dashboard")
    assert status == 308
    assert headers["location"] == "/_dashboard/"
    status, headers, body = get(srv.port, "/_dashboard/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["content-security-policy"]
    assert b'src="static/app.js"' in body
    assert b'href="/' not in body
    for name in ("app.js", "app.css", "favicon.svg", "vendor/uPlot.iife.min.js"):
        status, headers, body = get(srv.port, f"/_dashboard/static/{name}")
        assert status == 200
        assert len(body) == int(headers["content-length"]) > 100
        assert headers["x-content-type-options"] == "nosniff"
    assert get(srv.port, "/_dashboard/static/../dashboard.py")[0] == 404
    assert get(srv.port, "/_dashboard/nope")[0] == 404
    poll_until(lambda: dash.snapshot()["seq"] >= 2)
    status, headers, body = get(srv.port, "/_dashboard/api/snapshot")
    assert status == 200
    assert headers["content-type"] == "application/json"
    snap = json.loads(body)
    assert [r["name"] for r in snap["components"]] == ["balancer", "web-1"]
    assert len(snap["history"]) >= 2
    assert snap["interval"] == 0.1
    assert post(srv.port, "/_dashboard/api/snapshot")[0] == 405


def test_kill_and_restore_endpoints(served):
    ctl, dash, srv = served
    hdr = {"X-Netstack-Dashboard": "1"}
    path = "/_dashboard/api/components"
    assert post(srv.port, f"{path}/web-1/kill", **hdr) == (
        200,
        {"ok": True, "name": "web-1", "action": "kill"},
    )
    assert ctl.items["web-1"].state is State.STOPPED
    poll_until(lambda: row(dash.snapshot(), "web-1")["state"] == "stopped")
    assert post(srv.port, f"{path}/web-1/restore", **hdr)[0] == 200
    assert ctl.items["web-1"].state is State.RUNNING

    status, doc = post(srv.port, f"{path}/nobody/kill", **hdr)
    assert (status, doc["error"]) == (404, "no such component: nobody")
    status, doc = post(srv.port, f"{path}/balancer/kill", **hdr)
    assert status == 409
    assert "balancer" in doc["error"]
    assert post(srv.port, f"{path}/web-1/explode", **hdr)[0] == 404
    assert get(srv.port, f"{path}/web-1/kill")[0] == 405
    # A cross-site form can neither add the header nor hide its origin.
    status, doc = post(srv.port, f"{path}/web-1/kill")
    assert status == 403
    assert "X-Netstack-Dashboard" in doc["error"]
    status, doc = post(srv.port, f"{path}/web-1/kill", Origin="http://evil.example", **hdr)
    assert status == 403
    assert "cross-origin" in doc["error"]
    status, _ = post(srv.port, f"{path}/web-1/kill", Origin=f"http://127.0.0.1:{srv.port}", **hdr)
    assert status == 200
    assert ctl.calls == [
        ("kill", "web-1"),
        ("restore", "web-1"),
        ("kill", "nobody"),
        ("kill", "balancer"),
        ("kill", "web-1"),
    ]


def read_events(resp: http.client.HTTPResponse, count: int) -> list[dict]:
    """Read ``count`` SSE data events off an open response (bounded by the socket timeout)."""
    assert resp.status == 200
    assert resp.getheader("content-type") == "text/event-stream; charset=utf-8"
    events, data = [], []
    deadline = time.monotonic() + 3 * TIMEOUT
    while len(events) < count and time.monotonic() < deadline:
        line = resp.readline().decode()
        assert line, "the stream ended early"
        line = line.rstrip("\r\n")
        if line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            events.append(json.loads("\n".join(data)))
            data = []
    return events


def test_event_stream_delivers_snapshots_and_is_capped(served):
    _, dash, srv = served
    streams = []
    for _ in range(2):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUT)
        conn.request("GET", "/_dashboard/api/events")
        streams.append(conn)
    resps = [conn.getresponse() for conn in streams]
    events = read_events(resps[0], 3)
    assert len(events) == 3
    assert "history" in events[0]
    assert "history" not in events[1]
    assert events[0]["seq"] < events[1]["seq"] < events[2]["seq"]
    assert events[2]["point"]["rps"].keys() == {"web-1"}
    read_events(resps[1], 1)
    poll_until(lambda: dash.streams == 2)
    # A third stream would hold a third thread: refused, and the page polls instead.
    status, headers, body = get(srv.port, "/_dashboard/api/events")
    assert status == 503
    assert "retry-after" in headers
    assert "poll api/snapshot" in json.loads(body)["error"]
    # A client that goes away gives its slot (and thread) back.
    streams[1].close()
    poll_until(lambda: dash.streams == 1, timeout=2 * TIMEOUT)
    # close() ends the remaining stream: the server can then shut down promptly.
    dash.close()
    dash.close()  # idempotent
    rest = resps[0].read()  # IncompleteRead unless the chunked body ends cleanly
    assert rest.endswith(b"\n\n")
    poll_until(lambda: dash.streams == 0)
    streams[0].close()
    assert post(srv.port, "/_dashboard/api/events")[0] == 405


def test_importing_the_dashboard_and_the_load_stays_light():
    """The supervisor imports these at start: prometheus_client (and the WSGI server) load
    lazily, only when a scrape parses text."""
    import subprocess
    import sys

    code = (
        "import sys, netstack.servers.up.dashboard, netstack.servers.up.load;"
        "print(sorted({'prometheus_client', 'netstack.servers.wsgi', 'websockets', 'grpc'}"
        " & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
