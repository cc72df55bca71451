"""HTTP/1.1 behaviour of the WSGI server over real loopback sockets, inline and threaded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.helpers import TIMEOUT, apoll_until
from tests.servers.wsgi.support import echo, exchange, get, hello, port_of, responses, serve

THREADS = pytest.mark.parametrize("threads", [0, 4], ids=["inline", "threaded"])


@THREADS
async def test_keep_alive_serves_several_requests_on_one_connection(threads: int) -> None:
    async with serve(hello, threads=threads) as server:
        data = await exchange(server, get() + get() + get(extra="Connection: close\r\n"))
    replies = responses(data)
    assert [r.status for r in replies] == [200, 200, 200]
    assert all(r.body == b"Hello, world!" for r in replies)
    assert replies[0].headers["server"] == "netstack"
    assert replies[0].headers["date"].endswith(" GMT")
    assert replies[2].headers["connection"] == "close"


@THREADS
async def test_pipelined_requests_are_answered_in_order(threads: int) -> None:
    raw = b"".join(get(f"/{i}") for i in range(20)) + get("/last", extra="Connection: close\r\n")
    async with serve(echo, threads=threads) as server:
        data = await exchange(server, raw)
    replies = responses(data)
    assert [r.body.split(b" ")[1] for r in replies] == [f"/{i}".encode() for i in range(20)] + [
        b"/last"
    ]


@THREADS
async def test_chunked_request_body_is_streamed_to_the_app(threads: int) -> None:
    raw = (
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n"
    )
    async with serve(echo, threads=threads) as server:
        data = await exchange(server, raw)
    (reply,) = responses(data)
    assert reply.body == b"POST /up  11\nhello world"


@THREADS
async def test_generator_response_is_chunked_on_http11_and_close_delimited_on_http10(
    threads: int,
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"one "
        yield b""
        yield b"two"

    async with serve(app, threads=threads) as server:
        data11 = await exchange(server, get(extra="Connection: close\r\n"))
        data10 = await exchange(server, get(version="1.0"))
    (r11,) = responses(data11)
    assert r11.headers["transfer-encoding"] == "chunked"
    assert r11.body == b"one two"
    assert data10.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding" not in data10
    assert data10.endswith(b"\r\n\r\none two")


@THREADS
async def test_http10_keep_alive_when_asked(threads: int) -> None:
    async with serve(hello, threads=threads) as server:
        raw = get(version="1.0", extra="Connection: keep-alive\r\n") + get(version="1.0")
        data = await exchange(server, raw)
    replies = responses(data)
    assert [r.status for r in replies] == [200, 200]
    assert replies[0].headers["connection"] == "keep-alive"
    assert replies[1].headers["connection"] == "close"


@THREADS
async def test_head_sends_no_body(threads: int) -> None:
    async with serve(hello, threads=threads) as server:
        raw = b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n" + get(extra="Connection: close\r\n")
        data = await exchange(server, raw)
    replies = responses(data, [b"HEAD", b"GET"])
    assert replies[0].headers["content-length"] == "13"
    assert replies[0].body == b""
    assert replies[1].body == b"Hello, world!"


async def test_expect_100_continue_is_sent_when_the_app_reads() -> None:
    async with serve(echo, threads=2) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        async with asyncio.timeout(TIMEOUT):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"body")
        async with asyncio.timeout(TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        writer.close()


async def test_no_100_continue_when_the_app_does_not_read() -> None:
    async with serve(hello, threads=2) as server:
        raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        data = await exchange(server, raw, until_close=False)
    assert data.startswith(b"HTTP/1.1 200 OK")


@THREADS
async def test_unread_body_is_discarded_and_the_connection_reused(threads: int) -> None:
    async with serve(hello, threads=threads) as server:
        raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789" + get(
            extra="Connection: close\r\n"
        )
        data = await exchange(server, raw)
    assert [r.status for r in responses(data)] == [200, 200]


@THREADS
async def test_write_callable_and_iterable_both_reach_the_client(threads: int) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return [b"returned"]

    async with serve(app, threads=threads) as server:
        data = await exchange(server, get(extra="Connection: close\r\n"))
    assert responses(data)[0].body == b"written returned"


@THREADS
async def test_iterable_close_is_always_called(threads: int) -> None:
    closed: list[str] = []

    class Body:
        def __init__(self, name: str, fail: bool) -> None:
            self.name, self.fail = name, fail

        def __iter__(self) -> Any:
            yield b"a"
            if self.fail:
                raise RuntimeError("boom")
            yield b"b"

        def close(self) -> None:
            closed.append(self.name)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body(environ["PATH_INFO"], environ["PATH_INFO"] == "/fail")

    async with serve(app, validate=False, threads=threads) as server:
        ok = await exchange(server, get("/ok", extra="Connection: close\r\n"))
        await exchange(server, get("/fail"))
        await apoll_until(lambda: len(closed) == 2)
    assert responses(ok)[0].body == b"ab"
    assert sorted(closed) == ["/fail", "/ok"]


@THREADS
async def test_app_exception_gives_500_and_the_server_keeps_serving(
    threads: int, caplog: pytest.LogCaptureFixture
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/bug":
            raise KeyError("bug")
        return hello(environ, start_response)

    async with serve(app, threads=threads) as server:
        data = await exchange(server, get("/bug"))
        ok = await exchange(server, get(extra="Connection: close\r\n"))
        assert server.app_errors == 1
    assert responses(data)[0].status == 500
    assert responses(ok)[0].status == 200
    assert "error in the app" in caplog.text


@THREADS
async def test_exc_info_replaces_the_status_before_headers_are_sent(threads: int) -> None:
    import sys

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("late")
        except ValueError:
            start_response(
                "503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info()
            )
        return [b"sorry"]

    async with serve(app, threads=threads) as server:
        data = await exchange(server, get(extra="Connection: close\r\n"))
    reply = responses(data)[0]
    assert (reply.status, reply.body) == (503, b"sorry")


@THREADS
async def test_start_response_twice_without_exc_info_is_an_app_error(threads: int) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [])
        start_response("200 OK", [])
        return [b""]

    async with serve(app, validate=False, threads=threads) as server:
        data = await exchange(server, get())
    assert responses(data)[0].status == 500


@THREADS
async def test_start_response_results_are_reused_only_for_equal_arguments(threads: int) -> None:
    """start_response remembers what it made of (status, headers): a repeat is served from
    memory, a changed list is not, list pairs (unhashable) still work, a bad status is
    still refused after a good one with the same headers."""
    headers = [("Content-Type", "text/plain")]

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ["PATH_INFO"]
        if path == "/grow":
            headers.append(("X-Count", str(len(headers))))
        if path == "/lists":
            start_response("200 OK", [["Content-Type", "text/x-list"]])
        elif path == "/bad":
            start_response("2000 OK", list(headers))
        else:
            start_response("200 OK", headers)
        return [path.encode()]

    async with serve(app, validate=False, threads=threads) as server:
        paths = ["/a", "/a", "/grow", "/grow", "/a", "/lists", "/lists", "/bad"]
        raw = b"".join(get(p) for p in paths)
        data = await exchange(server, raw)
    replies = responses(data)
    assert [r.status for r in replies] == [200] * 7 + [500]
    assert [r.body for r in replies[:7]] == [p.encode() for p in paths[:7]]
    assert [r.headers.get("x-count") for r in replies[:5]] == [None, None, "1", "2", "2"]
    assert replies[1].headers["content-type"] == "text/plain"
    assert replies[6].headers["content-type"] == "text/x-list"


@THREADS
async def test_path_info_is_percent_decoded_as_latin1(threads: int) -> None:
    seen: dict[str, str] = {}

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        seen.update(
            path=environ["PATH_INFO"], query=environ["QUERY_STRING"], raw=environ["RAW_URI"]
        )
        return hello(environ, start_response)

    async with serve(app, threads=threads) as server:
        await exchange(server, get("/caf%C3%A9/a%2Fb?x=%C3%A9&y", extra="Connection: close\r\n"))
    assert seen["path"] == "/café/a/b".encode().decode("latin-1")
    assert seen["path"].encode("latin-1").decode("utf-8") == "/café/a/b"
    assert seen["query"] == "x=%C3%A9&y"
    assert seen["raw"] == "/caf%C3%A9/a%2Fb?x=%C3%A9&y"


async def test_root_path_becomes_script_name() -> None:
    seen: dict[str, str] = {}

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        seen.update(script=environ["SCRIPT_NAME"], path=environ["PATH_INFO"])
        return hello(environ, start_response)

    async with serve(app, root_path="/api") as server:
        await exchange(server, get("/api/users/1", extra="Connection: close\r\n"))
    assert seen == {"script": "/api", "path": "/users/1"}


async def test_headers_reach_environ_and_underscored_names_are_dropped() -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        seen.update(environ)
        return hello(environ, start_response)

    extra = "X-Thing: 1\r\nX-Thing: 2\r\nX_Spoof: evil\r\nCookie: a=1\r\nCookie: b=2\r\n"
    async with serve(app) as server:
        await exchange(server, get(extra=extra + "Connection: close\r\n"))
    assert seen["HTTP_X_THING"] == "1, 2"
    assert seen["HTTP_COOKIE"] == "a=1; b=2"
    assert "HTTP_X_SPOOF" not in seen
    assert seen["REMOTE_ADDR"] == "127.0.0.1"
    assert seen["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert seen["wsgi.input_terminated"] is True


async def test_forwarded_headers_are_honoured_only_from_trusted_peers() -> None:
    seen: list[tuple[str, str, str | None]] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        seen.append(
            (
                environ["REMOTE_ADDR"],
                environ["wsgi.url_scheme"],
                environ.get("HTTP_X_FORWARDED_FOR"),
            )
        )
        return hello(environ, start_response)

    extra = "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n"
    async with serve(app) as trusted:
        await exchange(trusted, get(extra=extra))
    async with serve(app, forwarded_allow_ips="10.0.0.1") as untrusted:
        await exchange(untrusted, get(extra=extra))
    assert seen[0][:2] == ("203.0.113.7", "https")
    assert seen[1] == ("127.0.0.1", "http", None)


async def test_proxy_protocol_v1_sets_the_client_address() -> None:
    seen: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        seen.append(environ["REMOTE_ADDR"])
        return hello(environ, start_response)

    async with serve(app, proxy_protocol=True) as server:
        data = await exchange(
            server,
            b"PROXY TCP4 198.51.100.9 127.0.0.1 5555 80\r\n" + get(extra="Connection: close\r\n"),
        )
        bad = await exchange(server, b"PROXY TCP4 nonsense\r\n" + get())
    assert responses(data)[0].status == 200
    assert seen == ["198.51.100.9"]
    assert responses(bad)[0].status == 400


async def test_file_wrapper_sends_the_file(tmp_path: Any) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    path = tmp_path / "blob"
    path.write_bytes(payload)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](open(path, "rb"))

    async with serve(app, validate=False) as server:
        data = await exchange(server, get(extra="Connection: close\r\n"))
        head = await exchange(server, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply = responses(data)[0]
    assert reply.headers["content-length"] == str(len(payload))
    assert reply.body == payload
    assert responses(head, [b"HEAD"])[0].body == b""


@THREADS
async def test_requests_pipelined_behind_a_declined_upgrade_are_answered(threads: int) -> None:
    raw = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n" + get(
        "/after", extra="Connection: close\r\n"
    )
    async with serve(echo, threads=threads) as server:
        data = await exchange(server, raw)
    assert [r.body.split(b" ")[1] for r in responses(data)] == [b"/ws", b"/after"]


async def test_threaded_apps_iterable_is_closed_in_the_app_thread() -> None:
    import threading

    closed_in: list[str] = []

    class Body:
        def __iter__(self) -> Any:
            yield b"a"
            yield b"b"

        def close(self) -> None:
            closed_in.append(threading.current_thread().name)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    async with serve(app, validate=False, threads=2) as server:
        data = await exchange(server, get(extra="Connection: close\r\n"))
    assert responses(data)[0].body == b"ab"
    assert len(closed_in) == 1
    assert closed_in[0].startswith("netstack-app-")


@THREADS
async def test_a_body_complete_in_its_first_chunk_is_sent_in_one_write(threads: int) -> None:
    """With Content-Length met by the first chunk, nothing more is read (PEP 3333: never
    send more than Content-Length) and the iterable is still closed."""
    pulled: list[int] = []
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Any:
            pulled.append(1)
            yield b"hello"
            pulled.append(2)
            yield b"EXTRA"

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return Body()

    async with serve(app, validate=False, threads=threads) as server:
        data = await exchange(server, get() + get(extra="Connection: close\r\n"))
        await apoll_until(lambda: len(closed) == 2)
    replies = responses(data)
    assert [r.body for r in replies] == [b"hello", b"hello"]
    assert pulled == [1, 1]


@THREADS
async def test_an_iterable_whose_close_raises_is_logged_and_the_connection_goes_on(
    threads: int, caplog: pytest.LogCaptureFixture
) -> None:
    class Body:
        def __iter__(self) -> Any:
            yield b"ok"

        def close(self) -> None:
            raise RuntimeError("close failed")

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return Body()

    async with serve(app, validate=False, threads=threads) as server:
        data = await exchange(server, get() + get(extra="Connection: close\r\n"))
        await apoll_until(
            lambda: caplog.text.count("error closing the app's response iterable") == 2
        )
    assert [r.body for r in responses(data)] == [b"ok", b"ok"]
    assert "RuntimeError: close failed" in caplog.text
