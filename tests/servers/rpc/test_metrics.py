"""``rpc serve --metrics-bind``: real gRPC calls, then a real scrape of ``/metrics``."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import grpc
import pytest

from netstack.servers.rpc._pb import notes_pb2 as pb
from netstack.servers.rpc.metrics import RPCMetrics, final_code
from tests.helpers import TIMEOUT, apoll_until
from tests.helpers.scrape import ascrape, value
from tests.servers.rpc.support import AUTH, GatedStore, create, running, stub_for

CREATE = "/notes.v1.Notes/CreateNote"
GET = "/notes.v1.Notes/GetNote"
WATCH = "/notes.v1.Notes/WatchNotes"


def calls(samples, method: str, code: str) -> float:
    return value(samples, "netstack_rpc_calls_total", method=method, code=code)


async def test_counts_match_the_calls_made(tmp_path):
    async with running(tmp_path, metrics_bind="127.0.0.1:0") as server, stub_for(server) as stub:
        assert server.metrics_address is not None
        first = await create(stub, "one")
        await create(stub, "two")
        got = await stub.GetNote(pb.GetNoteRequest(id=first.id), metadata=AUTH)
        assert got.title == "one"
        for missing in (404, 405, 406):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetNote(pb.GetNoteRequest(id=missing), metadata=AUTH)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateNote(pb.CreateNoteRequest(title=" "), metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as info:  # no token
            await stub.GetNote(pb.GetNoteRequest(id=first.id))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        watch = stub.WatchNotes(pb.WatchNotesRequest(), metadata=AUTH)
        await watch.initial_metadata()  # the subscription is live
        samples = await ascrape(server.metrics_address)
        assert calls(samples, CREATE, "OK") == 2
        assert calls(samples, CREATE, "INVALID_ARGUMENT") == 1
        assert calls(samples, GET, "OK") == 1
        assert calls(samples, GET, "NOT_FOUND") == 3
        assert calls(samples, GET, "UNAUTHENTICATED") == 1
        assert value(samples, "netstack_rpc_calls_in_flight") == 1  # the watch
        assert value(samples, "netstack_rpc_watchers") == 1
        # Every finished unary call is timed once; the open stream is not.
        assert value(samples, "netstack_rpc_call_duration_seconds_count") == 8
        assert value(samples, "netstack_rpc_call_duration_seconds_bucket", le="+Inf") == 8
        assert 0 < value(samples, "netstack_rpc_call_duration_seconds_sum") < 8 * TIMEOUT
        assert not any(
            name == "netstack_rpc_calls_total" and ("method", WATCH) in labels
            for name, labels in samples
        )

        watch.cancel()
        await apoll_until(lambda: server.metrics.calls.get((WATCH, "CANCELLED")) == 1)
        samples = await ascrape(server.metrics_address)
        assert calls(samples, WATCH, "CANCELLED") == 1
        assert value(samples, "netstack_rpc_watchers") == 0
        assert value(samples, "netstack_rpc_calls_in_flight") == 0
        assert value(samples, "netstack_rpc_call_duration_seconds_count") == 8


async def test_in_flight_counts_a_call_waiting_on_the_store(tmp_path):
    store = GatedStore(tmp_path / "notes.sqlite3")
    async with (
        running(tmp_path, store=store, metrics_bind="127.0.0.1:0") as server,
        stub_for(server) as stub,
    ):
        assert server.metrics_address is not None
        note = await create(stub, "gated")
        pending = asyncio.ensure_future(
            stub.GetNote(pb.GetNoteRequest(id=note.id), metadata=AUTH, timeout=TIMEOUT)
        )
        async with asyncio.timeout(TIMEOUT):
            await store.entered.wait()
        samples = await ascrape(server.metrics_address)
        assert value(samples, "netstack_rpc_calls_in_flight") == 1
        store.gate.set()
        assert (await pending).title == "gated"
        samples = await ascrape(server.metrics_address)
        assert value(samples, "netstack_rpc_calls_in_flight") == 0
        assert calls(samples, GET, "OK") == 1


async def test_unknown_methods_share_one_series(tmp_path):
    async with (
        running(tmp_path, metrics_bind="127.0.0.1:0", token=None) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        assert server.metrics_address is not None
        for name in ("/a.B/C", "/x.Y/Z"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(name)(b"")
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        samples = await ascrape(server.metrics_address)
        assert calls(samples, "other", "UNIMPLEMENTED") == 2
        assert not any(("method", "/a.B/C") in labels for _, labels in samples)


async def test_only_get_metrics_is_served(tmp_path):
    async with running(tmp_path, metrics_bind="127.0.0.1:0") as server:
        assert server.metrics_address is not None
        host, port = server.metrics_address

        def status(path: str, method: str = "GET") -> int:
            request = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        assert await asyncio.to_thread(status, "/metrics") == 200
        assert await asyncio.to_thread(status, "/other") == 404
        assert await asyncio.to_thread(status, "/metrics", "POST") == 405


async def test_without_metrics_bind_nothing_is_counted_or_bound(tmp_path):
    async with running(tmp_path) as server, stub_for(server) as stub:
        await create(stub, "quiet")
        assert server.metrics_address is None
        assert server.metrics.calls == {}


async def test_metrics_port_in_use_fails_start_and_releases_everything(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(OSError, match=f"metrics_bind 127.0.0.1:{port}: Address already in use"):
            async with running(tmp_path, metrics_bind=f"127.0.0.1:{port}"):
                pass  # pragma: no cover
    # The store was never left open: a server on the same database starts.
    async with running(tmp_path, metrics_bind="127.0.0.1:0") as server:
        assert server.metrics_address is not None


class _Context:
    def __init__(self, code: grpc.StatusCode | None, remaining: float | None) -> None:
        self._code, self._remaining = code, remaining

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def time_remaining(self) -> float | None:
        return self._remaining


@pytest.mark.parametrize(
    ("code", "remaining", "exc", "expected"),
    [
        (None, None, None, "OK"),
        (grpc.StatusCode.ABORTED, None, None, "ABORTED"),  # set_code without abort
        (grpc.StatusCode.NOT_FOUND, None, grpc.aio.AbortError(), "NOT_FOUND"),
        (None, None, grpc.aio.AbortError(), "UNKNOWN"),
        (None, -0.1, asyncio.CancelledError(), "DEADLINE_EXCEEDED"),
        (None, 3.0, asyncio.CancelledError(), "CANCELLED"),
        (None, None, asyncio.CancelledError(), "CANCELLED"),
        (None, None, RuntimeError("bug"), "UNKNOWN"),
    ],
)
def test_final_code(code, remaining, exc, expected):
    assert final_code(_Context(code, remaining), exc) == expected  # type: ignore[arg-type]


def test_sync_behaviours_are_left_alone():
    def sync(request, context):  # pragma: no cover - never called
        return request

    handler = grpc.unary_unary_rpc_method_handler(sync)
    assert RPCMetrics()._wrap(handler, "/s.S/M") is handler


async def test_streaming_shapes_are_counted_on_a_real_server():
    """Async-generator and client-streaming handlers (the notes service has neither)."""

    async def numbers(request: bytes, context):
        for i in range(int(request)):
            yield str(i).encode()
        if request == b"0":
            raise RuntimeError("a bug in a generator")

    async def total(requests, context):
        return str(sum([int(r) async for r in requests])).encode()

    handlers = {
        "Numbers": grpc.unary_stream_rpc_method_handler(numbers),
        "Total": grpc.stream_unary_rpc_method_handler(total),
    }
    metrics = RPCMetrics()
    server = grpc.aio.server(interceptors=[metrics])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = channel.unary_stream("/t.T/Numbers")(b"3")
            assert [r async for r in stream] == [b"0", b"1", b"2"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [r async for r in channel.unary_stream("/t.T/Numbers")(b"0")]
            assert info.value.code() == grpc.StatusCode.UNKNOWN
            assert await channel.stream_unary("/t.T/Total")(iter([b"1", b"2", b"3"])) == b"6"
    finally:
        await server.stop(None)
    assert metrics.calls == {
        ("/t.T/Numbers", "OK"): 1,
        ("/t.T/Numbers", "UNKNOWN"): 1,
        ("/t.T/Total", "OK"): 1,
    }
    assert metrics.duration.count == 1  # the client-streaming call; server streams are not
    assert metrics.in_flight == 0
