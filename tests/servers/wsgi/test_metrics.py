"""Metrics: worker counters on a real WSGIServer, the master's aggregate, /metrics served by
a real ``netstack serve`` with two workers."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from wsgiref.validate import validator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netstack.config import WSGIServerConfig
from netstack.servers.wsgi import WSGIServer
from netstack.servers.wsgi.metrics import LATENCY_BUCKETS, MAX_SERIES, Aggregate, WorkerMetrics
from tests.helpers import TIMEOUT, apoll_until, poll_until
from tests.servers.wsgi.procs import Serve


def make_app(release: threading.Event):
    def app(environ, start_response):
        if environ["PATH_INFO"] == "/hold":
            release.wait(TIMEOUT)
        status = "404 Not Found" if environ["PATH_INFO"] == "/missing" else "200 OK"
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    return validator(app)


def request(port: int, method: str, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def samples(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def test_worker_metrics_count_requests_latency_and_gauges():
    release = threading.Event()
    cfg = WSGIServerConfig(app="x:app", bind=("127.0.0.1:0",), access_log=False)
    async with WSGIServer(cfg, make_app(release)) as server:
        # Without access log, metrics or max_requests: no clock, no per-request hook.
        assert not server.timed
        assert not server.observed
        metrics = WorkerMetrics(server)
        metrics.attach()
        port = server.addresses[0][1]
        assert await asyncio.to_thread(request, port, "GET", "/") == 200
        assert await asyncio.to_thread(request, port, "POST", "/missing") == 404
        assert await asyncio.to_thread(request, port, "DELETE", "/") == 200
        held = asyncio.create_task(asyncio.to_thread(request, port, "GET", "/hold"))
        await apoll_until(lambda: metrics.snapshot()["in_flight"] == 1)
        snap = metrics.snapshot()
        assert snap["connections"] == 1
        release.set()
        assert await held == 200
        await apoll_until(lambda: metrics.snapshot()["in_flight"] == 0)
        snap = metrics.snapshot()
    requests = {(m, s): n for m, s, n in snap["requests"]}
    assert requests == {("GET", 200): 2, ("POST", 404): 1, ("DELETE", 200): 1}
    assert sum(snap["buckets"]) == 4
    assert len(snap["buckets"]) == len(LATENCY_BUCKETS) + 1
    assert 0 < snap["sum"] < TIMEOUT


class FakeRequest:
    def __init__(self, method: bytes) -> None:
        self.method = method


class FakeExchange:
    """What WorkerMetrics.record reads from an Exchange (a unit test of the series cap)."""

    def __init__(self, method: bytes, status: int, start_time: float) -> None:
        self.request = FakeRequest(method)
        self.status_code = status
        self.start_time = start_time


def test_series_are_capped_and_latency_lands_in_its_bucket():
    import time

    metrics = WorkerMetrics(None)  # type: ignore[arg-type]  # record() never reads the server
    for status in range(200, 200 + MAX_SERIES + 10):
        metrics.record(FakeExchange(b"GET", status, time.perf_counter()))
    assert len(metrics.counts) == MAX_SERIES + 1
    assert metrics.counts["GET", 0] == 10
    metrics.record(FakeExchange(b"PURGE", 200, time.perf_counter()))  # any token is valid
    assert metrics.counts["OTHER", 0] == 1  # past the cap, and not a method of its own
    slow = FakeExchange(b"GET", 200, time.perf_counter() - 0.3)  # 0.25 < 0.3 <= 0.5
    before = list(metrics.buckets)
    metrics.record(slow)
    changed = [i for i, (a, b) in enumerate(zip(before, metrics.buckets, strict=True)) if a != b]
    assert changed == [LATENCY_BUCKETS.index(0.5)]


def snapshot(requests, buckets_at=0, connections=0, in_flight=0, **counters):
    buckets = [0] * (len(LATENCY_BUCKETS) + 1)
    buckets[buckets_at] = sum(n for _, _, n in requests)
    return {
        "requests": requests,
        "buckets": buckets,
        "sum": 0.001 * buckets[buckets_at],
        "connections": connections,
        "in_flight": in_flight,
        **counters,
    }


def test_aggregate_sums_workers_and_keeps_counts_of_exited_ones():
    agg = Aggregate()
    agg.update(1, snapshot([["GET", 200, 5]], connections=3, in_flight=1, rejected=2))
    agg.update(2, snapshot([["GET", 200, 7], ["POST", 500, 1]], connections=1, app_errors=1))
    agg.workers = 2
    text = agg.render().decode()
    got = samples(text)
    assert got['netstack_http_requests_total{method="GET",status="200"}'] == 12
    assert got['netstack_http_requests_total{method="POST",status="500"}'] == 1
    assert got["netstack_http_open_connections"] == 4
    assert got["netstack_http_requests_in_flight"] == 1
    assert got["netstack_http_rejected_total"] == 2
    assert got["netstack_http_app_errors_total"] == 1
    assert got["netstack_http_request_duration_seconds_count"] == 13
    assert got['netstack_http_request_duration_seconds_bucket{le="+Inf"}'] == 13
    assert got['netstack_http_request_duration_seconds_bucket{le="0.005"}'] == 13
    assert got["netstack_workers"] == 2
    # Worker 1 exits; its replacement starts from zero: counters never go backwards,
    # gauges forget the dead worker.
    agg.retire(1)
    agg.restarted("crash")
    agg.update(3, snapshot([["GET", 200, 1]]))
    got = samples(agg.render().decode())
    assert got['netstack_http_requests_total{method="GET",status="200"}'] == 13
    assert got["netstack_http_open_connections"] == 1
    assert got["netstack_http_rejected_total"] == 2
    assert got['netstack_worker_restarts_total{reason="crash"}'] == 1
    assert got['netstack_worker_restarts_total{reason="reload"}'] == 0
    assert "# TYPE netstack_http_request_duration_seconds histogram" in agg.render().decode()


def test_metrics_from_two_workers_add_up(tmp_path):
    with Serve(tmp_path, "--workers", "2", "--metrics-bind", "127.0.0.1:0") as srv:
        srv.wait_workers(2)
        # Separate connections spread over both workers (the kernel picks one each time).
        pids = set()
        for _ in range(40):
            status, body = srv.get("/")
            assert status == 200
            pids.add(body.split()[0])
        for _ in range(3):
            assert srv.get("/teapot")[0] == 418
        get_200 = 'netstack_http_requests_total{method="GET",status="200"}'
        poll_until(lambda: srv.scrape().get(get_200) == 40)
        got = srv.scrape()
        assert got['netstack_http_requests_total{method="GET",status="418"}'] == 3
        assert got["netstack_http_request_duration_seconds_count"] == 43
        assert got["netstack_workers"] == 2
        print(f"40 requests answered by {len(pids)} worker(s)")

        # In flight and open connections, while a request is held in the app.
        conn = srv.connect()
        conn.request("GET", "/hold/m")
        poll_until(lambda: (tmp_path / "m.started").exists())
        poll_until(lambda: srv.scrape()["netstack_http_requests_in_flight"] == 1)
        assert srv.scrape()["netstack_http_open_connections"] == 1
        (tmp_path / "m.release").touch()
        assert conn.getresponse().status == 200
        conn.close()
        poll_until(lambda: srv.scrape()["netstack_http_open_connections"] == 0)
        assert srv.scrape()["netstack_http_requests_in_flight"] == 0


def test_metrics_endpoint_answers_only_get_metrics_and_survives_a_silent_client(tmp_path):
    with Serve(tmp_path, "--metrics-bind", "127.0.0.1:0") as srv:
        silent = socket.create_connection(("127.0.0.1", srv.metrics_port), timeout=TIMEOUT)
        try:
            assert "netstack_workers" in srv.scrape()  # not blocked by the silent client
            for method, path, status in [
                ("GET", "/other", 404),
                ("POST", "/metrics", 405),
                ("HEAD", "/metrics", 200),
            ]:
                conn = http.client.HTTPConnection("127.0.0.1", srv.metrics_port, timeout=TIMEOUT)
                conn.request(method, path)
                resp = conn.getresponse()
                assert resp.status == status
                body = resp.read()
                if method == "HEAD":
                    assert body == b""
                    assert int(resp.getheader("content-length", "0")) > 0
                conn.close()
        finally:
            silent.close()


def test_metrics_bind_in_use_exits_3(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        srv = Serve(tmp_path, "--metrics-bind", f"127.0.0.1:{port}", wait_listening=False)
        with srv:
            assert srv.wait() == 3
            assert f"cannot bind 127.0.0.1:{port}" in srv.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("bad", ["9100", "host:port", "[::1:9100"])
def test_bad_metrics_bind_is_a_config_error(bad, capsys):
    from netstack.cli import main

    assert main(["serve", "x:app", "--metrics-bind", bad]) == 2
    assert "metrics_bind" in capsys.readouterr().err
