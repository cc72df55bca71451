"""The L7 proxy's per-connection caches and fast paths against real backends: a request
head kept for the next identical request, response headers kept per backend connection,
the one-write path for whole small responses, and the general path beside them."""

from __future__ import annotations

import asyncio
import socket
import threading

import h11

from netstack.servers.lb import Balancer
from tests.helpers import TIMEOUT
from tests.servers.lb.http_support import Client, http_backend, http_config, raw
from tests.servers.lb.support import TCPBackend


def echo_head(request: h11.Request, body: bytes, backend: TCPBackend):
    """The request line and headers the backend received, one per line."""
    lines = [b"method: " + bytes(request.method), b"target: " + bytes(request.target)]
    lines += [bytes(n) + b": " + bytes(v) for n, v in request.headers]
    return 200, [("content-type", "text/plain")], b"\n".join(lines)


def seen(body: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(": ")
        out.setdefault(name, []).append(value)
    return out


async def test_repeated_requests_get_fresh_ids_and_their_own_headers() -> None:
    with http_backend(echo_head) as backend:
        async with Balancer(http_config(backend.port)) as lb, Client(lb.address()[1]) as client:
            ids = set()
            for _ in range(3):  # the same request again and again: the cached head
                got = seen((await client.request("GET", "/a", [("x-a", "1")])).body)
                assert got["target"] == ["/a"]
                assert got["x-a"] == ["1"]
                assert got["host"] == ["example.test"]
                assert got["x-forwarded-for"] == ["127.0.0.1"]
                assert len(got["x-request-id"]) == 1
                ids.add(got["x-request-id"][0])
            assert len(ids) == 3
            got = seen((await client.request("GET", "/a", [("x-a", "2")])).body)
            assert got["x-a"] == ["2"]  # a changed header is not served from the cache
            got = seen((await client.request("GET", "/b", [("x-a", "2")])).body)
            assert got["target"] == ["/b"]
            got = seen((await client.request("DELETE", "/b", [("x-a", "2")])).body)
            assert got["method"] == ["DELETE"]  # same target and headers, not the same head
            # A client's own request id (untrusted peer) is replaced, every time.
            for _ in range(2):
                got = seen((await client.request("GET", "/b", [("x-request-id", "mine")])).body)
                assert got["x-request-id"] != ["mine"]
                assert len(got["x-request-id"]) == 1
            # Forwarding headers from an untrusted client never get through the cache.
            for _ in range(2):
                got = seen(
                    (await client.request("GET", "/b", [("x-forwarded-for", "6.6.6.6")])).body
                )
                assert got["x-forwarded-for"] == ["127.0.0.1"]
            got = seen((await client.request("POST", "/b", body=b"hello")).body)
            assert got["content-length"] == ["5"]


def counting_backend() -> tuple[TCPBackend, list[int]]:
    """A raw keep-alive backend: each response carries an X-N that counts up, hop-by-hop
    headers the proxy must drop, and a reason phrase of its own on every third."""
    count = [0]
    lock = threading.Lock()

    def handler(sock: socket.socket, backend: TCPBackend) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            _, _, buffer = buffer.partition(b"\r\n\r\n")
            with lock:
                count[0] += 1
                n = count[0]
            reason = b"Fine" if n % 3 == 0 else b"OK"
            sock.sendall(
                b"HTTP/1.1 200 %s\r\nX-N: %d\r\nConnection: keep-alive\r\n"
                b"Keep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok" % (reason, n)
            )

    return TCPBackend(handler), count


async def test_response_headers_are_forwarded_fresh_on_a_reused_backend_connection() -> None:
    backend, count = counting_backend()
    with backend:
        async with Balancer(http_config(backend.port)) as lb, Client(lb.address()[1]) as client:
            for i in range(1, 6):
                reply = await client.request()
                assert reply.status == 200
                assert reply.body == b"ok"
                assert reply.headers["x-n"] == str(i)
                assert "keep-alive" not in reply.headers
                assert reply.headers.get("connection", "") != "keep-alive"
            assert count[0] == 5
            # The backend's own reason phrase goes through (the general path).
            port = lb.address()[1]
            out = await raw(port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 200 Fine\r\n")
            assert b"\r\nx-n: 6\r\n" in out.lower()


async def test_a_connection_rule_takes_the_general_path() -> None:
    # An added Connection header must reach the client core as a header (not plain): the
    # backend closes after each response and every request still gets its answer.
    with http_backend(echo_head) as backend:
        cfg = http_config(backend.port, add_request_headers=("Connection: close",))
        async with Balancer(cfg) as lb, Client(lb.address()[1]) as client:
            for _ in range(3):
                got = seen((await client.request("GET", "/x")).body)
                assert got["connection"] == ["close"]
                assert got["target"] == ["/x"]
            assert backend.requests == 3  # type: ignore[attr-defined]


def responses(data: bytes) -> list[bytes] | None:
    """The bodies of the Content-Length responses in ``data``; None if one is partial."""
    bodies = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return None
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        if len(rest) < length:
            return None
        bodies.append(rest[:length])
        data = rest[length:]
    return bodies


async def test_pipelined_identical_requests_each_get_an_answer() -> None:
    with http_backend(echo_head) as backend:
        async with Balancer(http_config(backend.port)) as lb:
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.address()[1])
            try:
                writer.write(b"GET /p HTTP/1.1\r\nHost: h\r\n\r\n" * 4)
                data = b""
                async with asyncio.timeout(TIMEOUT):
                    while (bodies := responses(data)) is None or len(bodies) < 4:
                        chunk = await reader.read(65536)
                        assert chunk
                        data += chunk
            finally:
                writer.close()
            ids = {seen(body)["x-request-id"][0] for body in bodies}
            assert len(ids) == 4
            assert all(seen(body)["target"] == ["/p"] for body in bodies)
