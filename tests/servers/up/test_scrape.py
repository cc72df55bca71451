"""The scrape arithmetic (PromQL's reset rule and histogram_quantile on two points) and
fetch() against real loopback servers: refused, silent, erroring, oversized."""

from __future__ import annotations

import math
import socket
import time

import pytest

from netstack.servers.up import scrape
from netstack.servers.up.scrape import (
    ScrapeError,
    bucket_deltas,
    counter_delta,
    fetch,
    fetch_json,
    histogram_quantile,
    normalize_address,
    parse_metrics,
)
from tests.helpers import TIMEOUT, free_port
from tests.servers.up.support import Exporter

INF = math.inf

TEXT = """\
# HELP netstack_http_requests_total Finished HTTP requests by method and status
# TYPE netstack_http_requests_total counter
netstack_http_requests_total{method="GET",status="200"} 40.0
netstack_http_requests_total{method="GET",status="503"} 2.0
netstack_http_requests_total{method="POST",status="201"} 8.0
# HELP netstack_http_request_duration_seconds Latency
# TYPE netstack_http_request_duration_seconds histogram
netstack_http_request_duration_seconds_bucket{le="0.005"} 30.0
netstack_http_request_duration_seconds_bucket{le="0.01"} 45.0
netstack_http_request_duration_seconds_bucket{le="+Inf"} 50.0
netstack_http_request_duration_seconds_count 50.0
netstack_http_request_duration_seconds_sum 0.2
# HELP netstack_http_open_connections Open
# TYPE netstack_http_open_connections gauge
netstack_http_open_connections 3.0
# HELP odd_gauge Not a number
# TYPE odd_gauge gauge
odd_gauge NaN
"""


def test_parse_metrics_selects_sums_and_groups_samples():
    s = parse_metrics(TEXT)
    assert s.total("netstack_http_requests_total") == 50
    assert s.total("netstack_http_requests_total", method="GET") == 42
    assert s.total("netstack_http_requests_total", status="503") == 2
    assert s.total("netstack_absent_total") is None
    assert s.by_label("netstack_http_requests_total", "method") == {"GET": 42, "POST": 8}
    assert s.buckets("netstack_http_request_duration_seconds") == {0.005: 30, 0.01: 45, INF: 50}
    assert s.total("netstack_http_open_connections") == 3
    assert "odd_gauge" not in s  # NaN is "unknown", and not JSON either
    assert "netstack_http_requests_total" in s


def test_parse_metrics_rejects_garbage():
    with pytest.raises(ScrapeError, match="bad metrics text"):
        parse_metrics("this is { not prometheus\n")


def test_counter_delta_follows_the_reset_rule():
    assert counter_delta(10, 15) == 5
    assert counter_delta(10, 10) == 0
    assert counter_delta(100, 7) == 7  # the process restarted: all 7 are new
    assert counter_delta(None, 5) is None
    assert counter_delta(5, None) is None


def test_bucket_deltas_per_bound_and_after_a_reset():
    before = {0.1: 10.0, 1.0: 15.0, INF: 16.0}
    assert bucket_deltas(before, {0.1: 12.0, 1.0: 20.0, INF: 22.0}) == {0.1: 2, 1.0: 5, INF: 6}
    # The total went down: a restart; the new counts are the deltas, bound by bound.
    assert bucket_deltas(before, {0.1: 12.0, 1.0: 12.0, INF: 13.0}) == {0.1: 12, 1.0: 12, INF: 13}
    assert bucket_deltas({}, {0.1: 1.0, INF: 1.0}) == {0.1: 1, INF: 1}


def test_histogram_quantile_interpolates_like_promql():
    buckets = {0.005: 30.0, 0.01: 45.0, INF: 50.0}
    # rank 25 of 50 lies in the first bucket (0..5 ms, 30 observations): 25/30 of the way.
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.005 * 25 / 30)
    # rank 45 is exactly the top of the second bucket.
    assert histogram_quantile(0.9, buckets) == pytest.approx(0.01)
    # rank 49.5 lies in +Inf: the highest finite bound answers.
    assert histogram_quantile(0.99, buckets) == 0.01
    assert histogram_quantile(0.5, {0.1: 0.0, INF: 0.0}) is None  # no observations
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {0.1: 5.0}) is None  # no +Inf bucket: not a histogram
    # An empty bucket before the rank: the rank falls on the bound itself.
    assert histogram_quantile(0.5, {0.1: 0.0, 0.2: 4.0, 0.3: 4.0, INF: 8.0}) == 0.2


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:80", "127.0.0.1:80"),
        ("localhost:80", "127.0.0.1:80"),
        ("[::1]:8080", "127.0.0.1:8080"),
        ("127.0.1.1:9", "127.0.0.1:9"),
        ("10.0.0.5:80", "10.0.0.5:80"),
        ("Web.Example:80", "web.example:80"),
        ("no-port", "no-port"),
    ],
)
def test_normalize_address(given, expected):
    assert normalize_address(given) == expected


# ---------------------------------------------------------------------- fetch, for real


@pytest.fixture
def exporter():
    server = Exporter(token="secret-token")
    yield server
    server.close()


def test_fetch_and_scrape_a_real_endpoint(exporter):
    exporter.set(TEXT)
    assert fetch(exporter.url()) == TEXT.encode()
    assert scrape.scrape(exporter.url()).total("netstack_http_requests_total") == 50
    exporter.set('{"pool": []}', "/api/backends")
    assert fetch_json(exporter.url("/api/backends"), token="secret-token") == {"pool": []}


def test_fetch_errors_are_short_and_specific(exporter):
    exporter.set("boom\n", status=500)
    with pytest.raises(ScrapeError, match=r"^HTTP 500 from http://127\.0\.0\.1"):
        fetch(exporter.url())
    exporter.set("{}", "/api/backends")
    with pytest.raises(ScrapeError, match="HTTP 401"):
        fetch_json(exporter.url("/api/backends"), token="wrong")
    exporter.set("<html>", "/page")
    with pytest.raises(ScrapeError, match="not JSON"):
        fetch_json(exporter.url("/page"))
    with pytest.raises(ScrapeError, match="connection refused"):
        fetch(f"http://127.0.0.1:{free_port()}/metrics")
    with pytest.raises(ScrapeError, match="not an http:// URL"):
        fetch("file:///etc/passwd")


def test_fetch_gives_up_on_a_silent_server_within_its_timeout():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        port = silent.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(ScrapeError, match="timed out"):
            fetch(f"http://127.0.0.1:{port}/metrics", timeout=0.3)
        assert time.monotonic() - start < TIMEOUT


def test_fetch_refuses_an_oversized_answer(exporter, monkeypatch):
    monkeypatch.setattr(scrape, "MAX_BODY_BYTES", 100)
    exporter.set("x" * 101)
    with pytest.raises(ScrapeError, match="over 100 bytes"):
        fetch(exporter.url())
    exporter.set("x" * 100)
    assert len(fetch(exporter.url())) == 100
