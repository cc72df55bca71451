"""The L7 proxy against real backends: in-process WSGI servers and raw-socket HTTP servers."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os

from netstack.config import BalancerTimeouts, HealthConfig, RouteConfig
from netstack.servers.lb import Balancer
from tests.helpers import TIMEOUT, apoll_until, free_port
from tests.servers.lb.http_support import (
    Client,
    get,
    http_backend,
    http_config,
    name_and_path,
    raw,
)
from tests.servers.wsgi.support import port_of, responses, serve


def echo_app(environ, start_response):
    """Path, forwarding headers and the backend's view of the connection."""
    lines = [
        environ["PATH_INFO"] + ("?" + environ["QUERY_STRING"] if environ["QUERY_STRING"] else ""),
        "xff=" + environ.get("HTTP_X_FORWARDED_FOR", "-"),
        "xfp=" + environ.get("HTTP_X_FORWARDED_PROTO", "-"),
        "xfh=" + environ.get("HTTP_X_FORWARDED_HOST", "-"),
        "fwd=" + environ.get("HTTP_FORWARDED", "-"),
        "rid=" + environ.get("HTTP_X_REQUEST_ID", "-"),
        "port=" + environ["REMOTE_PORT"],
        "extra=" + environ.get("HTTP_X_EXTRA", "-"),
        "secret=" + environ.get("HTTP_X_SECRET", "-"),
    ]
    body = ("\n".join(lines) + "\n").encode()
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), ("X-Internal", "1")],
    )
    return [body]


def fields(body: bytes) -> dict[str, str]:
    lines = body.decode().splitlines()
    out = {"path": lines[0]}
    out.update(line.split("=", 1) for line in lines[1:])  # type: ignore[arg-type, misc]
    return out


async def test_keepalive_pipelining_and_pooled_backend_connections() -> None:
    direct = {"forwarded_allow_ips": ""}  # REMOTE_PORT: the proxy's side of the connection
    async with (
        serve(echo_app, **direct) as s1,
        serve(echo_app, **direct) as s2,
        Balancer(http_config(port_of(s1), port_of(s2))) as lb,
    ):
        port = lb.address()[1]
        async with Client(port) as client:
            ports = set()
            for i in range(20):
                reply = await client.request("GET", f"/n/{i}")
                assert reply.status == 200
                got = fields(reply.body)
                assert got["path"] == f"/n/{i}"
                ports.add(got["port"])
        # Round robin over two backends, each reached through one pooled connection.
        assert len(ports) == 2
        await apoll_until(lambda: s1.requests + s2.requests == 20)
        # Pipelined requests on one connection: answered in order.
        data = b"".join(
            b"GET /p/%d HTTP/1.1\r\nHost: x\r\n%s\r\n" % (i, b"connection: close\r\n" * (i == 4))
            for i in range(5)
        )
        replies = responses(await raw(port, data))
        assert [fields(r.body)["path"] for r in replies] == [f"/p/{i}" for i in range(5)]


async def test_forwarding_headers_untrusted_are_replaced() -> None:
    async with serve(echo_app) as s1, Balancer(http_config(port_of(s1))) as lb:
        reply = await get(
            lb.address()[1],
            "/x?q=1",
            headers=[
                ("x-forwarded-for", "6.6.6.6"),
                ("x_forwarded_for", "6.6.6.7"),
                ("forwarded", "for=6.6.6.6"),
                ("x-request-id", "client-chosen"),
            ],
        )
        got = fields(reply.body)
        assert got["path"] == "/x?q=1"
        assert got["xff"] == "127.0.0.1"
        assert got["xfp"] == "http"
        assert got["xfh"] == "example.test"
        assert got["fwd"] == "for=127.0.0.1;proto=http;host=example.test"
        assert got["rid"] not in ("-", "client-chosen")
        assert reply.headers["x-internal"] == "1"


async def test_forwarding_headers_from_trusted_peer_are_extended() -> None:
    async with serve(echo_app) as s1:
        cfg = http_config(port_of(s1), forwarded_allow_ips="127.0.0.1")
        async with Balancer(cfg) as lb:
            reply = await get(
                lb.address()[1],
                headers=[("x-forwarded-for", "203.0.113.9"), ("x-request-id", "abc-123")],
            )
            got = fields(reply.body)
            assert got["xff"] == "203.0.113.9, 127.0.0.1"
            assert got["rid"] == "abc-123"


async def test_malformed_request_gets_400_and_never_reaches_a_backend() -> None:
    with http_backend(name_and_path) as backend:
        async with Balancer(http_config(backend.port)) as lb:
            port = lb.address()[1]
            for bad in (
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
                b"NOT HTTP AT ALL\r\n\r\n",
            ):
                out = await raw(port, bad)
                assert out.startswith(b"HTTP/1.1 400 "), out
                assert b"connection: close" in out
            # A good request afterwards is still served (one bad client harms nobody).
            assert (await get(port, "/ok")).body == b"b /ok"
            assert backend.requests == 1  # type: ignore[attr-defined]
            assert backend.served == 1


async def test_all_backends_down_gives_503_with_retry_after() -> None:
    # Both may be ejected at once (the default caps passive ejection at half a pool).
    cfg = http_config(free_port(), free_port(), health=HealthConfig(max_ejection_percent=100))
    async with Balancer(cfg) as lb:
        reply = await get(lb.address()[1])
        assert reply.status == 503  # both refused the connection: tried, then none left
        assert reply.headers["retry-after"].isdigit()
        assert b"no backend could answer" in reply.body
        # Three requests make three consecutive failures each (max_fails): both ejected,
        # then the answer comes at once, without trying anyone.
        for _ in range(3):
            await get(lb.address()[1])
        assert {b["state"] for b in lb.snapshot()["default"]} == {"ejected"}
        reply = await get(lb.address()[1])
        assert reply.status == 503
        assert int(reply.headers["retry-after"]) >= 1
        assert b"no backend available" in reply.body


async def test_a_fault_behind_every_backend_ejects_only_half_the_pool() -> None:
    """Every backend answers 503 (say, the database behind them is down): passive health
    ejects one of the two, not both, so the pool is back at once when the fault clears."""
    down = True

    def app(request, body, backend):
        return (503, [], b"db down") if down else (200, [], b"ok")

    with http_backend(app) as one, http_backend(app) as two:
        async with Balancer(http_config(one.port, two.port)) as lb:
            for _ in range(12):
                assert (await get(lb.address()[1])).status == 503
            states = sorted(b["state"] for b in lb.snapshot()["default"])
            assert states == ["ejected", "up"]
            down = False
            assert (await get(lb.address()[1])).status == 200


async def test_slow_backend_gets_504() -> None:
    gate = asyncio.Event()

    def slow(request, body, backend):
        import time

        time.sleep(1.0 if request.target == b"/slow" else 0)
        return 200, [], b"late"

    with http_backend(slow) as backend:
        cfg = http_config(backend.port, timeouts=BalancerTimeouts(request_timeout=0.3))
        async with Balancer(cfg) as lb:
            loop = asyncio.get_running_loop()
            start = loop.time()
            reply = await get(lb.address()[1], "/slow")
            assert reply.status == 504
            assert loop.time() - start < 0.9
            assert (await get(lb.address()[1], "/fast")).body == b"late"
    gate.set()


async def test_backend_dies_mid_response_aborts_the_client() -> None:
    def half(sock, backend):
        sock.recv(65536)
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")

    from tests.servers.lb.support import TCPBackend

    with TCPBackend(half) as backend:
        async with Balancer(http_config(backend.port)) as lb:
            out = await raw(lb.address()[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 200 OK")
            assert out.endswith(b"only ten b")  # truncated, never completed or spliced


async def test_malformed_backend_response_gives_502() -> None:
    def garbage(sock, backend):
        sock.recv(65536)
        sock.sendall(b"HTTP/1.1 2xx Nope\r\n\r\n")

    from tests.servers.lb.support import TCPBackend

    with TCPBackend(garbage) as backend:
        async with Balancer(http_config(backend.port)) as lb:
            reply = await get(lb.address()[1])
            assert reply.status == 502
            assert b"bad response" in reply.body


async def test_502_retried_for_get_not_for_post() -> None:
    def failing(request, body, backend):
        return 503, [], b"busy"

    with http_backend(failing, "bad") as bad, http_backend(name_and_path, "good") as good:
        async with Balancer(http_config(bad.port, good.port)) as lb:
            port = lb.address()[1]
            for i in range(4):
                assert (await get(port, f"/{i}")).body == b"good /%d" % i
            async with Client(port) as client:
                statuses = [
                    (await client.request("POST", "/p", body=b"x")).status for _ in range(4)
                ]
            assert 503 in statuses  # a POST is never retried
            assert bad.requests >= 3  # type: ignore[attr-defined]
            metrics = lb.metrics()
            assert "netstack_lb_http_requests_total 8\n" in metrics
            assert 'netstack_lb_http_responses_total{code="2xx"} ' in metrics
            assert 'netstack_lb_http_responses_total{code="5xx"} ' in metrics
            assert "netstack_lb_http_retries_total " in metrics


async def test_chunked_bodies_stream_both_ways() -> None:
    size = 6 * 1024 * 1024  # larger than every buffer on the way (relay_buffer_bytes 256 KiB)

    def digest_echo(environ, start_response):
        stream = environ["wsgi.input"]
        start_response("200 OK", [("Content-Type", "application/octet-stream")])

        def chunks():
            while block := stream.read(65536):
                yield block

        return chunks()

    async with (
        serve(digest_echo, validate=False, threads=2, max_body_bytes=None) as s1,
        Balancer(http_config(port_of(s1))) as lb,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.address()[1])
        payload = os.urandom(size)
        sent = hashlib.sha256(payload).hexdigest()

        async def send() -> None:
            writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, size, 100_000):
                block = payload[i : i + 100_000]
                writer.write(b"%x\r\n%s\r\n" % (len(block), block))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

        sender = asyncio.create_task(send())
        import h11

        conn = h11.Connection(h11.CLIENT)
        conn.send(
            h11.Request(
                method="POST",
                target="/up",
                headers=[("host", "x"), ("transfer-encoding", "chunked")],
            )
        )
        digest = hashlib.sha256()
        got = 0
        headers = {}
        async with asyncio.timeout(TIMEOUT * 2):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(1 << 16))
                    continue
                if isinstance(event, h11.Response):
                    headers = dict(event.headers)
                elif isinstance(event, h11.Data):
                    digest.update(event.data)
                    got += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
        await sender
        writer.close()
        assert headers[b"transfer-encoding"] == b"chunked"
        assert got == size
        assert digest.hexdigest() == sent


async def test_rate_limit_answers_429() -> None:
    with http_backend(name_and_path) as backend:
        cfg = http_config(backend.port, rate_limit=0.5, rate_burst=3)
        async with Balancer(cfg) as lb:
            async with Client(lb.address()[1]) as client:
                statuses = [(await client.request()).status for _ in range(5)]
                assert statuses == [200, 200, 200, 429, 429]
                reply = await client.request()
                assert reply.headers["retry-after"].isdigit()
            assert backend.requests == 3  # type: ignore[attr-defined]
        # Behind a trusted proxy, each forwarded client has its own bucket.
        cfg = http_config(
            backend.port, rate_limit=0.5, rate_burst=1, forwarded_allow_ips="127.0.0.1"
        )
        async with Balancer(cfg) as lb, Client(lb.address()[1]) as client:
            for ip in ("198.51.100.1", "198.51.100.2"):
                fwd = [("x-forwarded-for", ip)]
                assert (await client.request(headers=fwd)).status == 200
                assert (await client.request(headers=fwd)).status == 429


async def test_ip_deny_list_answers_403() -> None:
    with http_backend(name_and_path) as backend:
        async with Balancer(http_config(backend.port, deny_ips="127.0.0.0/8")) as lb:
            out = await raw(lb.address()[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 403 ")
        async with Balancer(http_config(backend.port, allow_ips="10.0.0.0/8")) as lb:
            out = await raw(lb.address()[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 403 ")
        async with Balancer(http_config(backend.port, allow_ips="127.0.0.1")) as lb:
            assert (await get(lb.address()[1])).status == 200
        assert backend.requests == 1  # type: ignore[attr-defined]


async def test_routes_rewrite_and_header_rules() -> None:
    with http_backend(name_and_path, "app") as app, http_backend(name_and_path, "api") as api:
        cfg = http_config(app.port, add_response_headers=("X-Proxy: netstack",))
        from netstack.config import BackendConfig

        api_pool = dataclasses.replace(
            cfg.pools[0], name="api", backends=(BackendConfig(address=f"127.0.0.1:{api.port}"),)
        )
        routes = (
            RouteConfig(pool="api", path_prefix="/api", rewrite_prefix="/v2"),
            RouteConfig(pool="api", host="api.test"),
            RouteConfig(pool="api", header="x-canary=1"),
        )
        fe = dataclasses.replace(cfg.frontends[0], routes=routes)
        cfg = dataclasses.replace(cfg, frontends=(fe,), pools=(*cfg.pools, api_pool))
        async with Balancer(cfg) as lb:
            port = lb.address()[1]
            assert (await get(port, "/api/users?x=1")).body == b"api /v2/users?x=1"
            assert (await get(port, "/api")).body == b"api /v2"
            assert (await get(port, "/apiary")).body == b"app /apiary"
            assert (await get(port, "/", headers=[("x-canary", "1")])).body == b"api /"
            assert (await get(port, "/h", headers=[("host", "API.test:8080")])).body == b"api /h"
            reply = await get(port, "/h")
            assert reply.body == b"app /h"
            assert reply.headers["x-proxy"] == "netstack"


async def test_sticky_cookie_keeps_a_client_on_one_backend() -> None:
    with http_backend(name_and_path, "b0") as b0, http_backend(name_and_path, "b1") as b1:
        cfg = http_config(b0.port, b1.port)
        pool = dataclasses.replace(cfg.pools[0], sticky_cookie="lb")
        cfg = dataclasses.replace(cfg, pools=(pool,))
        async with Balancer(cfg) as lb:
            port = lb.address()[1]
            first = await get(port)
            cookie = first.headers["set-cookie"].split(";")[0]
            name = first.body.split()[0]
            for _ in range(4):
                again = await get(port, headers=[("cookie", f"a=b; {cookie}")])
                assert again.body.split()[0] == name
                assert "set-cookie" not in again.headers


async def test_websocket_echo_through_the_proxy() -> None:
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve as ws_serve

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async with ws_serve(echo, "127.0.0.1", 0) as server:
        ws_port = server.sockets[0].getsockname()[1]
        async with Balancer(http_config(ws_port)) as lb:
            uri = f"ws://127.0.0.1:{lb.address()[1]}/chat"
            async with connect(uri, open_timeout=TIMEOUT) as ws:
                for message in ("hello", "x" * 200_000, b"\x00\x01binary"):
                    await ws.send(message)
                    async with asyncio.timeout(TIMEOUT):
                        assert await ws.recv() == message
            # A refused upgrade is an ordinary response; the connection stays HTTP.
            reply = await get(
                lb.address()[1], headers=[("connection", "upgrade"), ("upgrade", "websocket")]
            )
            assert reply.status in (400, 426)


def counting(request, body, backend):
    return 200, [], b"%s %s" % (backend.name.encode(), request.target)


async def load(port: int, clients: int, per_client: int, during=None) -> list[int]:
    """``clients`` keep-alive connections each sending ``per_client`` GETs; every status."""
    statuses: list[int] = []

    async def one(n: int) -> None:
        async with Client(port) as client:
            for i in range(per_client):
                statuses.append((await client.request("GET", f"/{n}/{i}")).status)

    tasks = [asyncio.create_task(one(n)) for n in range(clients)]
    if during is not None:
        await apoll_until(lambda: len(statuses) >= clients * per_client // 3)
        await during()
    async with asyncio.timeout(TIMEOUT * 2):
        await asyncio.gather(*tasks)
    return statuses


async def test_killing_a_backend_under_load_fails_no_idempotent_request() -> None:
    with http_backend(counting, "b0") as b0, http_backend(counting, "b1") as b1:
        async with Balancer(http_config(b0.port, b1.port)) as lb:

            async def kill() -> None:
                b0.kill()

            statuses = await load(lb.address()[1], clients=8, per_client=40, during=kill)
            assert statuses == [200] * 320
            assert b1.requests > 160  # type: ignore[attr-defined]
            assert lb.stats.backend_failures >= 1


async def test_reload_under_load_drops_nothing() -> None:
    with (
        http_backend(counting, "b0") as b0,
        http_backend(counting, "b1") as b1,
        http_backend(counting, "b2") as b2,
    ):
        first = http_config(b0.port, b1.port)
        second = http_config(b1.port, b2.port)
        async with Balancer(first) as lb:

            async def reload() -> None:
                for cfg in (second, first, second):
                    await lb.reload(cfg)

            statuses = await load(lb.address()[1], clients=6, per_client=40, during=reload)
            assert statuses == [200] * 240
            assert lb.stats.reloads == 3
            assert b2.requests > 0  # type: ignore[attr-defined]


async def test_http_health_check_takes_a_failing_backend_out() -> None:
    from netstack.config import HealthConfig

    traffic: list[str] = []

    def health(request, body, backend):
        if request.target == b"/health":
            return (503 if backend.name == "sick" else 204), [], b""
        traffic.append(backend.name)
        return counting(request, body, backend)

    with http_backend(health, "sick") as sick, http_backend(health, "well") as well:
        checks = HealthConfig(check_interval=0.05, check_path="/health", fall=1, rise=1)
        async with Balancer(http_config(sick.port, well.port, health=checks)) as lb:
            await apoll_until(
                lambda: [b["state"] for b in lb.snapshot()["default"]] == ["down", "up"]
            )
            for i in range(4):
                assert (await get(lb.address()[1], f"/{i}")).body == b"well /%d" % i
            assert traffic == ["well"] * 4


async def test_http_check_expected_status_and_failures() -> None:
    from netstack.proto.balance import Backend
    from netstack.servers.lb.httpcheck import http_check

    def status(request, body, backend):
        return int(request.target[1:]), [], b"x"

    with http_backend(status) as backend:
        b = Backend("b", "127.0.0.1", backend.port)
        assert await http_check("/200")(b, TIMEOUT)
        assert await http_check("/302")(b, TIMEOUT)
        assert not await http_check("/500")(b, TIMEOUT)
        assert await http_check("/418", 418)(b, TIMEOUT)
        assert not await http_check("/200", 418)(b, TIMEOUT)
    assert not await http_check("/")(Backend("gone", "127.0.0.1", free_port()), TIMEOUT)


async def test_retry_budget_bounds_extra_requests() -> None:
    def unavailable(request, body, backend):
        return 503, [], b"no"

    with http_backend(unavailable, "b0") as b0, http_backend(unavailable, "b1") as b1:
        from netstack.config import HealthConfig

        # max_fails high: the backends stay in, every request may be retried once.
        health = HealthConfig(check_interval=None, max_fails=10_000)
        async with Balancer(http_config(b0.port, b1.port, health=health)) as lb:
            async with Client(lb.address()[1]) as client:
                for _ in range(100):
                    assert (await client.request()).status == 503
            listener = next(iter(lb.listeners.values()))
            total = b0.requests + b1.requests  # type: ignore[attr-defined]
            assert 100 < total <= 100 + 10 + 20 + 1  # floor 10 + 20 % of 100
            assert listener.retries == total - 100  # type: ignore[attr-defined]


async def test_idle_backend_connections_expire() -> None:
    with http_backend(name_and_path) as backend:
        timeouts = BalancerTimeouts(backend_idle_timeout=0.2)
        async with Balancer(http_config(backend.port, timeouts=timeouts)) as lb:
            assert (await get(lb.address()[1])).status == 200
            assert backend.served == 1
            await apoll_until(lambda: not backend.conns)  # the proxy closed its idle one
            assert (await get(lb.address()[1])).status == 200
            assert backend.served == 2


def reading_app(environ, start_response):
    """Reads the body first (so a threaded server sends 100 Continue), then answers."""
    size = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(size) if size else b""
    return echo_app(environ, start_response) if not body else [_ok(start_response, body)]


def _ok(start_response, body: bytes) -> bytes:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return body


async def test_head_http10_and_expect_continue() -> None:
    async with serve(reading_app, threads=2) as s1, Balancer(http_config(port_of(s1))) as lb:
        port = lb.address()[1]
        out = await raw(port, b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"content-length: " in head.lower()
        assert body == b""
        out = await raw(port, b"GET /old HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ")
        assert b"/old\n" in out
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        async with asyncio.timeout(TIMEOUT):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
            writer.write(b"hi")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            assert await reader.readexactly(2) == b"hi"
        writer.close()


async def test_raw_upgrade_tunnel_relays_both_ways_with_half_close() -> None:
    def upgrade_then_echo(sock, backend):
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        assert b"upgrade: x-raw" in data.lower()
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x-raw\r\n\r\n"
        )
        while chunk := sock.recv(65536):
            sock.sendall(chunk.upper())
        sock.sendall(b"|BYE")

    from tests.servers.lb.support import TCPBackend

    with TCPBackend(upgrade_then_echo) as backend:
        async with Balancer(http_config(backend.port)) as lb:
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.address()[1])
            writer.write(
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: x-raw\r\n\r\n"
            )
            async with asyncio.timeout(TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101 ")
                payload = os.urandom(300_000).hex().encode()
                writer.write(payload)
                writer.write_eof()
                out = await reader.read()  # to EOF: the backend's answer, then its close
            writer.close()
            assert out == payload.upper() + b"|BYE"


def proxy_buffers(lb) -> int:
    """Bytes the proxy holds unsent, over every client and backend transport."""
    total = 0
    for listener in lb.listeners.values():
        for conn in listener.conns:
            total += conn.transport.get_write_buffer_size()
            if conn.upstream is not None:
                total += conn.upstream.transport.get_write_buffer_size()
    return total


async def steady(read, polls: int = 5) -> int:
    """Poll ``read()`` until it stops changing for ``polls`` polls in a row."""
    last, same = -1, 0
    async with asyncio.timeout(TIMEOUT):
        while same < polls:
            await asyncio.sleep(0.02)
            value = read()
            same = same + 1 if value == last else 0
            last = value
    return last


async def test_backpressure_both_ways_keeps_buffers_bounded() -> None:
    from tests.servers.lb.support import TCPBackend

    size = 32 * 1024 * 1024
    block = os.urandom(1 << 16)
    sent = {"down": 0, "up": 0}

    def big_response(sock, backend):
        sock.recv(65536)
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            sock.sendall(block)
            sent["down"] += len(block)

    with TCPBackend(big_response) as backend:
        async with Balancer(http_config(backend.port)) as lb:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", lb.address()[1], limit=1 << 16
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            stalled = await steady(lambda: sent["down"])  # we read nothing: all stalls
            assert stalled < size // 2
            assert proxy_buffers(lb) <= 2 * lb.cfg.limits.relay_buffer_bytes
            got = 0
            async with asyncio.timeout(TIMEOUT * 2):
                await reader.readuntil(b"\r\n\r\n")
                while got < size:
                    chunk = await reader.read(1 << 20)
                    assert chunk
                    got += len(chunk)
            writer.close()
            assert got == size

    def slow_reader(sock, backend):
        # Read the head, then nothing until told: the request body must stall at the client.
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        backend.gate.wait(TIMEOUT)  # type: ignore[attr-defined]
        received = len(data.partition(b"\r\n\r\n")[2])
        while received < size:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            received += len(chunk)
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    import threading

    with TCPBackend(slow_reader) as backend:
        backend.gate = threading.Event()  # type: ignore[attr-defined]
        async with Balancer(http_config(backend.port)) as lb:
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.address()[1])
            writer.transport.set_write_buffer_limits(high=1 << 16)

            async def upload() -> None:
                writer.write(b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: %d\r\n\r\n" % size)
                for _ in range(size // len(block)):
                    writer.write(block)
                    sent["up"] += len(block)
                    await writer.drain()

            task = asyncio.create_task(upload())
            stalled = await steady(lambda: sent["up"])
            assert stalled < size // 2
            assert proxy_buffers(lb) <= 2 * lb.cfg.limits.relay_buffer_bytes
            backend.gate.set()  # type: ignore[attr-defined]
            async with asyncio.timeout(TIMEOUT * 2):
                await task
                reply = await reader.readuntil(b"ok")
            writer.close()
            assert reply.startswith(b"HTTP/1.1 200 OK")


async def test_header_and_keepalive_timeouts() -> None:
    with http_backend(name_and_path) as backend:
        timeouts = BalancerTimeouts(header_timeout=0.2, keepalive_timeout=0.2)
        async with Balancer(http_config(backend.port, timeouts=timeouts)) as lb:
            out = await raw(lb.address()[1], b"GET / HTTP/1.1\r\nHost: sl")  # never finished
            assert out.startswith(b"HTTP/1.1 408 ")
            async with Client(lb.address()[1]) as client:
                assert (await client.request()).status == 200
                assert client.reader is not None
                async with asyncio.timeout(TIMEOUT):
                    assert await client.reader.read() == b""  # closed once idle
            assert backend.requests == 1  # type: ignore[attr-defined]


async def test_graceful_close_finishes_in_flight_and_closes_idle() -> None:
    import threading

    gate = threading.Event()

    def gated(request, body, backend):
        if request.target == b"/wait":
            gate.wait(TIMEOUT)
        return 200, [], b"done"

    with http_backend(gated) as backend:
        lb = Balancer(http_config(backend.port))
        await lb.start()
        port = lb.address()[1]
        async with Client(port) as idle, Client(port) as busy:
            assert (await idle.request()).status == 200
            assert busy.writer is not None
            busy.writer.write(b"GET /wait HTTP/1.1\r\nhost: x\r\n\r\n")
            await apoll_until(lambda: backend.requests == 2)  # type: ignore[attr-defined]
            lb.close()
            assert idle.reader is not None
            async with asyncio.timeout(TIMEOUT):
                assert await idle.reader.read() == b""  # the idle one closes at once
            gate.set()
            assert busy.reader is not None
            async with asyncio.timeout(TIMEOUT):
                rest = await busy.reader.read()  # answered, then closed
            assert rest.startswith(b"HTTP/1.1 200 ")
            assert b"connection: close" in rest
            assert rest.endswith(b"done")
            await lb.wait_closed()


async def test_consistent_hash_on_a_header() -> None:
    with http_backend(counting, "b0") as b0, http_backend(counting, "b1") as b1:
        cfg = http_config(b0.port, b1.port)
        pool = dataclasses.replace(
            cfg.pools[0], algorithm="consistent_hash", hash_key="header:X-User"
        )
        cfg = dataclasses.replace(cfg, pools=(pool,))
        async with Balancer(cfg) as lb:
            seen: dict[str, set[bytes]] = {}
            for user in ("ann", "bob", "cyd", "dee"):
                for _ in range(3):
                    reply = await get(lb.address()[1], headers=[("x-user", user)])
                    seen.setdefault(user, set()).add(reply.body.split()[0])
            assert all(len(names) == 1 for names in seen.values())


async def test_proxy_protocol_from_a_trusted_peer_names_the_client() -> None:
    from netstack.proto import proxy_protocol

    async with serve(echo_app) as s1:
        cfg = http_config(port_of(s1), accept_proxy=True)
        async with Balancer(cfg) as lb:
            header = proxy_protocol.encode(
                proxy_protocol.for_connection(("203.0.113.7", 4000), ("10.0.0.1", 80), 1)
            )
            out = await raw(
                lb.address()[1], header + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert fields(responses(out)[0].body)["xff"] == "203.0.113.7"


async def test_post_is_not_retried_when_a_backend_closes_before_answering() -> None:
    from tests.servers.lb.support import TCPBackend

    def hang_up(sock, backend):
        sock.recv(65536)

    with TCPBackend(hang_up) as b0, http_backend(counting, "b1") as b1:
        async with Balancer(http_config(b0.port, b1.port)) as lb:
            port = lb.address()[1]
            async with Client(port) as client:
                assert (await client.request("GET", "/g")).body == b"b1 /g"  # retried
            async with Client(port) as client:
                statuses = {(await client.request("POST", "/p", body=b"x")).status}
            async with Client(port) as client:
                statuses.add((await client.request("POST", "/p", body=b"x")).status)
            assert 502 in statuses  # the POST that met b0 was not replayed


async def test_stale_pooled_connection_is_retried_on_a_fresh_one() -> None:
    import h11

    from tests.servers.lb.support import TCPBackend

    def one_per_connection(sock, backend):
        # Claims keep-alive, answers one request, then drops the connection when the next
        # one arrives (what a backend whose keep-alive timer just fired looks like).
        conn = h11.Connection(h11.SERVER)
        answered = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request) and answered:
                return
            if isinstance(event, h11.EndOfMessage):
                head = conn.send(h11.Response(status_code=200, headers=[("content-length", "2")]))
                sock.sendall(head + conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
                answered = True
                conn.start_next_cycle()

    with TCPBackend(one_per_connection) as backend:
        async with Balancer(http_config(backend.port)) as lb:
            async with Client(lb.address()[1]) as client:
                for _ in range(3):
                    reply = await client.request("GET", "/")
                    assert (reply.status, reply.body) == (200, b"ok")
            assert lb.stats.backend_failures == 0  # not held against the backend
            assert backend.served == 3


async def test_reload_switches_a_frontend_between_tcp_and_http() -> None:
    from tests.servers.lb.support import lb_config

    with http_backend(name_and_path) as backend:
        port = free_port()
        tcp = lb_config(backend.port)
        tcp = dataclasses.replace(
            tcp, frontends=(dataclasses.replace(tcp.frontends[0], listen=f"127.0.0.1:{port}"),)
        )
        http = dataclasses.replace(
            tcp, frontends=(dataclasses.replace(tcp.frontends[0], mode="http"),)
        )
        async with Balancer(tcp) as lb:
            reply = await get(port, headers=[("x-forwarded-for", "6.6.6.6")])
            assert reply.status == 200  # relayed as bytes
            await lb.reload(http)
            assert (await get(port, "/x")).body == b"b /x"
            listener = next(iter(lb.listeners.values()))
            assert listener.requests == 1  # type: ignore[attr-defined]


async def test_frontend_header_rules() -> None:
    async with serve(echo_app) as s1:
        cfg = http_config(
            port_of(s1),
            add_request_headers=("X-Extra: yes",),
            remove_request_headers=("X-Secret",),
            remove_response_headers=("X-Internal",),
            request_id_header="",
        )
        async with Balancer(cfg) as lb:
            reply = await get(
                lb.address()[1], headers=[("x-secret", "s3cr3t"), ("x-extra", "client")]
            )
            got = fields(reply.body)
            assert got["secret"] == "-"
            assert got["extra"] == "yes"  # replaced, not appended
            assert got["rid"] == "-"  # request ids turned off
            assert "x-internal" not in reply.headers


async def test_early_answer_drops_the_rest_of_the_body_and_keeps_the_connection() -> None:
    from tests.servers.lb.support import TCPBackend

    def early(sock, backend):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return
            data += chunk
        if data.startswith(b"POST"):  # refuse at once, read nothing of the body
            sock.sendall(
                b"HTTP/1.1 413 Too Big\r\ncontent-length: 4\r\nconnection: close\r\n\r\nnope"
            )
            while sock.recv(65536):
                pass
            return
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")

    with TCPBackend(early) as backend:
        async with Balancer(http_config(backend.port)) as lb, Client(lb.address()[1]) as client:
            reply = await client.request("POST", "/upload", body=os.urandom(3 << 20))
            assert (reply.status, reply.body) == (413, b"nope")
            reply = await client.request("GET", "/after")  # same client connection
            assert (reply.status, reply.body) == (200, b"ok")


async def test_connect_method_is_refused() -> None:
    with http_backend(name_and_path) as backend:
        async with Balancer(http_config(backend.port)) as lb:
            out = await raw(lb.address()[1], b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 405 ")
            assert backend.requests == 0  # type: ignore[attr-defined]


async def test_consistent_hash_on_a_cookie() -> None:
    with http_backend(counting, "b0") as b0, http_backend(counting, "b1") as b1:
        cfg = http_config(b0.port, b1.port)
        pool = dataclasses.replace(
            cfg.pools[0], algorithm="consistent_hash", hash_key="cookie:session"
        )
        cfg = dataclasses.replace(cfg, pools=(pool,))
        async with Balancer(cfg) as lb:
            for session in ("s1", "s2", "s3", "s4", "s5"):
                names = {
                    (
                        await get(lb.address()[1], headers=[("cookie", f"session={session}")])
                    ).body.split()[0]
                    for _ in range(3)
                }
                assert len(names) == 1


async def test_stalled_request_body_gets_408() -> None:
    with http_backend(name_and_path) as backend:
        timeouts = BalancerTimeouts(body_timeout=0.25)
        async with Balancer(http_config(backend.port, timeouts=timeouts)) as lb:
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.address()[1])
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            async with asyncio.timeout(TIMEOUT):
                out = await reader.read()
            writer.close()
            assert out.startswith(b"HTTP/1.1 408 ")
            assert backend.requests == 0  # type: ignore[attr-defined]
            # A body that keeps coming, slowly (0.4 s in all, no gap of 0.25 s), is not cut.
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.address()[1])
            writer.write(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
            for part in (b"a", b"b", b"c", b"d"):
                await asyncio.sleep(0.1)  # pacing a slow uploader, not synchronisation
                writer.write(part)
            async with asyncio.timeout(TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                body = await reader.readexactly(7)
            writer.close()
            assert head.startswith(b"HTTP/1.1 200 ")
            assert body == b"b /slow"
