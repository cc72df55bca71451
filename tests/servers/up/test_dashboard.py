"""The dashboard over real processes: ``netstack balance --mode http`` (admin API on) in
front of two ``netstack serve --metrics-bind`` processes, traffic through the balancer, a
real SIGKILL from the dashboard's kill button endpoint, and a restore.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest

from netstack.servers.up.dashboard import Dashboard
from tests.helpers import TIMEOUT, poll_until
from tests.servers.up.support import DashServer, ProcController, Traffic, get, post
from tests.servers.wsgi.procs import alive

pytestmark = pytest.mark.slow


def snapshot(srv: DashServer) -> dict:
    status, _, body = get(srv.port, "/_dashboard/api/snapshot")
    assert status == 200
    return json.loads(body)


def rows(snap: dict) -> dict[str, dict]:
    return {r["name"]: r for r in snap["components"]}


def busy(r: dict | None) -> bool:
    return r is not None and bool(r["data"] and r["rps"] and r["p99_ms"])


def test_dashboard_watches_real_processes_through_a_kill_and_a_restore(tmp_path):
    with ProcController(tmp_path) as ctl:
        assert ctl.balancer is not None
        dash = Dashboard(ctl, interval=0.5)
        srv = DashServer(dash.app)
        traffic = Traffic(ctl.balancer.port)
        try:
            # Both backends serve, the balancer counts, and each figure is non-zero.
            def all_busy() -> bool:
                r = rows(snapshot(srv))
                # (.get: the snapshot before the first collection has no components)
                lb = r.get("balancer")
                return busy(r.get("web-1")) and busy(r.get("web-2")) and bool(lb and lb["rps"])

            poll_until(all_busy, timeout=6 * TIMEOUT, interval=0.2)
            snap = snapshot(srv)
            r = rows(snap)
            for name in ("web-1", "web-2"):
                assert r[name]["state"] == "running"
                assert r[name]["lb"]["state"] == "up"
                assert r[name]["requests_total"] > 0
                assert r[name]["p50_ms"] > 0
                assert r[name]["p99_ms"] >= r[name]["p50_ms"]
                assert r[name]["open_connections"] is not None
            lb = r["balancer"]
            assert lb["responses"]["2xx"] > 0
            assert lb["requests_total"] > 0
            assert snap["totals"]["web_up"] == 2
            assert len(snap["history"]) >= 2

            # The kill button: a real SIGKILL of web-1's process group.
            pid = r["web-1"]["pid"]
            status, doc = post(
                srv.port, "/_dashboard/api/components/web-1/kill", **{"X-Netstack-Dashboard": "1"}
            )
            assert (status, doc["ok"]) == (200, True)
            poll_until(lambda: not alive(pid))

            def web1_down() -> bool:
                r = rows(snapshot(srv))
                return (
                    r["web-1"]["state"] == "stopped"
                    and not r["web-1"]["data"]
                    and r["web-1"]["lb"] is not None
                    and r["web-1"]["lb"]["state"] != "up"
                )

            poll_until(web1_down, timeout=6 * TIMEOUT, interval=0.2)
            r = rows(snapshot(srv))
            assert r["web-1"]["error"] == "stopped"
            assert r["web-1"]["rps"] is None
            assert r["web-2"]["data"] is True  # the others keep their figures
            assert snapshot(srv)["totals"]["web_up"] == 1
            # The balancer routed around it: traffic keeps succeeding on web-2.
            ok_before = traffic.ok
            poll_until(lambda: traffic.ok > ok_before + 50)

            status, _ = post(
                srv.port,
                "/_dashboard/api/components/web-1/restore",
                **{"X-Netstack-Dashboard": "1"},
            )
            assert status == 200

            def web1_back() -> bool:
                r = rows(snapshot(srv))["web-1"]
                return busy(r) and r["pid"] != pid and r["lb"]["state"] == "up"

            poll_until(web1_back, timeout=8 * TIMEOUT, interval=0.2)
            assert rows(snapshot(srv))["web-1"]["restarts"] == 1
        finally:
            traffic.close()
            dash.close()
            srv.close()
        print(f"traffic through the balancer: {traffic.ok} ok, {traffic.failed} failed")


def test_event_stream_over_real_processes(tmp_path):
    with ProcController(tmp_path, web=1) as ctl:
        dash = Dashboard(ctl, interval=0.2)
        srv = DashServer(dash.app)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUT)
            conn.request("GET", "/_dashboard/api/events", headers={"Accept": "text/event-stream"})
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.getheader("cache-control") == "no-store"
            events: list[dict] = []
            deadline = time.monotonic() + 3 * TIMEOUT
            while len(events) < 3 and time.monotonic() < deadline:
                line = resp.readline().decode()
                assert line, "the stream ended early"
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
            assert len(events) == 3
            seqs = [e["seq"] for e in events]
            assert seqs == sorted(set(seqs))
            assert {r["name"] for r in events[-1]["components"]} == {"balancer", "web-1"}
            assert rows(events[-1])["web-1"]["data"] is True
            conn.close()
        finally:
            dash.close()
            srv.close()


def test_page_and_event_stream_through_the_balancer(tmp_path):
    """As ``netstack up`` mounts it: the balancer relays the page and the event stream
    (chunked, never-ending) without buffering, and the kill endpoint's same-origin check
    passes with the Host the browser sent to the balancer."""
    from netstack.servers.up.topology import Component, Kind, State
    from tests.servers.up.support import Balancer
    from tests.servers.up.test_collector import MemoryController

    ctl = MemoryController(
        [Component("web-1", Kind.WEB, "127.0.0.1:1", pid=7, state=State.RUNNING)]
    )
    dash = Dashboard(ctl, interval=0.2)
    srv = DashServer(dash.app)
    lb = Balancer([srv.port])
    try:
        status, _, body = get(lb.port, "/_dashboard/")
        assert status == 200
        assert b"netstack" in body
        conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=TIMEOUT)
        conn.request("GET", "/_dashboard/api/events")
        resp = conn.getresponse()
        assert resp.status == 200
        seqs = []
        deadline = time.monotonic() + 3 * TIMEOUT
        while len(seqs) < 3 and time.monotonic() < deadline:
            line = resp.readline().decode()
            assert line, "the stream ended early"
            if line.startswith("data: "):
                seqs.append(json.loads(line[6:])["seq"])
        assert seqs == sorted(set(seqs))
        assert len(seqs) == 3
        conn.close()
        origin = f"http://127.0.0.1:{lb.port}"
        status, doc = post(
            lb.port,
            "/_dashboard/api/components/web-1/kill",
            Origin=origin,
            **{"X-Netstack-Dashboard": "1"},
        )
        assert (status, doc["ok"]) == (200, True)
        assert ctl.calls == [("kill", "web-1")]
    finally:
        lb.close()
        dash.close()
        srv.close()
