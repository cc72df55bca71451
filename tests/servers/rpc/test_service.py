"""The notes service over real loopback gRPC: grpc.aio clients against RPCServer."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from netstack.config import RPCLimits, RPCServerConfig
from netstack.servers.rpc import RPCServer
from netstack.servers.rpc._pb import notes_pb2 as pb
from netstack.servers.rpc._pb import notes_pb2_grpc as pb_grpc
from netstack.servers.rpc.postgres import PostgresNoteStore
from tests.helpers import TIMEOUT, apoll_until
from tests.servers.rpc.support import (
    AUTH,
    GatedStore,
    StallingPostgresStore,
    StallingStore,
    create,
    running,
    stub_for,
)


async def expect_status(call, code: grpc.StatusCode, text: str = "") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    assert text in details
    return details


# ---------------------------------------------------------------- health and reflection


async def test_health_is_serving_without_a_token(tmp_path):
    async with (
        running(tmp_path) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "notes.v1.Notes"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await expect_status(
            health.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nope")),
            grpc.StatusCode.NOT_FOUND,
        )


async def test_reflection_lists_services_and_resolves_a_method(tmp_path):
    async with (
        running(tmp_path) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        names = {s.name for s in listed.list_services_response.service}
        assert names == {
            "notes.v1.Notes",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        await call.write(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="notes.v1.Notes")
        )
        found = await call.read()
        await call.done_writing()
        from google.protobuf import descriptor_pb2

        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in found.file_descriptor_response.file_descriptor_proto
        ]
        notes = next(f for f in files if f.package == "notes.v1")
        (service,) = notes.service
        method = next(m for m in service.method if m.name == "CreateNote")
        assert (method.input_type, method.output_type) == (
            ".notes.v1.CreateNoteRequest",
            ".notes.v1.Note",
        )
        watch = next(m for m in service.method if m.name == "WatchNotes")
        assert watch.server_streaming


# ---------------------------------------------------------------- auth


async def test_calls_without_the_right_token_are_unauthenticated(tmp_path):
    async with running(tmp_path) as server, stub_for(server) as stub:
        request = pb.CreateNoteRequest(title="x")
        await expect_status(
            stub.CreateNote(request), grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization"
        )
        await expect_status(
            stub.CreateNote(request, metadata=(("authorization", "Bearer wrong"),)),
            grpc.StatusCode.UNAUTHENTICATED,
            "invalid bearer token",
        )
        await expect_status(
            stub.CreateNote(request, metadata=(("authorization", "Basic czNjcmV0"),)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        watch = stub.WatchNotes(pb.WatchNotesRequest())
        await expect_status(watch.read(), grpc.StatusCode.UNAUTHENTICATED)
        # Nothing was created by the refused calls.
        listed = await stub.ListNotes(pb.ListNotesRequest(), metadata=AUTH)
        assert list(listed.notes) == []


async def test_without_a_token_configured_calls_need_none(tmp_path):
    async with running(tmp_path, token=None) as server, stub_for(server) as stub:
        note = await stub.CreateNote(pb.CreateNoteRequest(title="open"))
        assert note.id == 1


# ---------------------------------------------------------------- CRUD, errors


async def test_create_get_update_delete(tmp_path, db):
    async with running(tmp_path, db=db) as server, stub_for(server) as stub:
        note = await create(stub, "  groceries  ", "milk\neggs")
        assert (note.id, note.title, note.body, note.version) == (1, "groceries", "milk\neggs", 1)
        assert note.create_time == note.update_time
        assert note.create_time.seconds > 1_700_000_000
        got = await stub.GetNote(pb.GetNoteRequest(id=note.id), metadata=AUTH)
        assert got == note
        updated = await stub.UpdateNote(
            pb.UpdateNoteRequest(id=note.id, body="bread", expected_version=1), metadata=AUTH
        )
        assert (updated.title, updated.body, updated.version) == ("groceries", "bread", 2)
        details = await expect_status(
            stub.UpdateNote(
                pb.UpdateNoteRequest(id=note.id, title="late", expected_version=1),
                metadata=AUTH,
            ),
            grpc.StatusCode.ABORTED,
        )
        assert details == "note 1 is at version 2, not the expected 1"
        await stub.DeleteNote(pb.DeleteNoteRequest(id=note.id), metadata=AUTH)
        for call in (
            stub.GetNote(pb.GetNoteRequest(id=note.id), metadata=AUTH),
            stub.UpdateNote(pb.UpdateNoteRequest(id=note.id, title="t"), metadata=AUTH),
            stub.DeleteNote(pb.DeleteNoteRequest(id=note.id), metadata=AUTH),
        ):
            assert await expect_status(call, grpc.StatusCode.NOT_FOUND) == "note 1 does not exist"


@pytest.mark.parametrize(
    ("method", "request_", "message"),
    [
        ("CreateNote", pb.CreateNoteRequest(title="   "), "title: must not be empty"),
        ("CreateNote", pb.CreateNoteRequest(title="x" * 41), "title: 41 characters, the limit"),
        ("CreateNote", pb.CreateNoteRequest(title="two\nlines"), "title: must be one line"),
        ("CreateNote", pb.CreateNoteRequest(title="t", body="é" * 513), "body: 1026 bytes, the li"),
        ("GetNote", pb.GetNoteRequest(id=0), "id: must be a positive note id, got 0"),
        ("GetNote", pb.GetNoteRequest(id=-3), "id: must be a positive note id, got -3"),
        ("ListNotes", pb.ListNotesRequest(page_size=-1), "page_size: must be >= 0, got -1"),
        ("ListNotes", pb.ListNotesRequest(page_token="garbage!"), "page_token is malformed"),
        ("SearchNotes", pb.SearchNotesRequest(query=" "), "query: must not be empty"),
        ("SearchNotes", pb.SearchNotesRequest(query="q" * 21), "query: 21 characters, the"),
        ("UpdateNote", pb.UpdateNoteRequest(id=1), "nothing to update: set title and/or body"),
        ("UpdateNote", pb.UpdateNoteRequest(id=1, title=""), "title: must not be empty"),
        ("UpdateNote", pb.UpdateNoteRequest(id=1, body="", expected_version=-1), "expected_ver"),
    ],
)  # fmt: skip
async def test_invalid_requests_are_invalid_argument(tmp_path, method, request_, message):
    limits = RPCLimits(max_title_chars=40, max_note_bytes=1024, max_query_chars=20)
    async with running(tmp_path, limits=limits) as server, stub_for(server) as stub:
        await create(stub, "keep")
        details = await expect_status(
            getattr(stub, method)(request_, metadata=AUTH), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert message in details
        # The server keeps serving, and the bad request changed nothing.
        note = await stub.GetNote(pb.GetNoteRequest(id=1), metadata=AUTH)
        assert (note.title, note.version) == ("keep", 1)


async def test_oversized_message_is_refused_and_the_server_keeps_serving(tmp_path):
    limits = RPCLimits(max_note_bytes=1024, max_message_bytes=8192)
    async with running(tmp_path, limits=limits) as server, stub_for(server) as stub:
        await expect_status(create(stub, "big", "x" * 20_000), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert (await create(stub, "small")).id == 1


# ---------------------------------------------------------------- paging and search


async def test_paging_through_many_notes(tmp_path, db):
    limits = RPCLimits(default_page_size=7, max_page_size=20)
    async with running(tmp_path, db=db, limits=limits) as server, stub_for(server) as stub:
        for i in range(45):
            await create(stub, f"note {i}")
        seen: list[int] = []
        sizes: list[int] = []
        token = ""
        for _ in range(10):  # bounded: 45 notes at 20 a page need 3
            page = await stub.ListNotes(
                pb.ListNotesRequest(page_size=1000, page_token=token), metadata=AUTH
            )
            sizes.append(len(page.notes))
            seen.extend(n.id for n in page.notes)
            token = page.next_page_token
            if not token:
                break
        assert sizes == [20, 20, 5]  # clamped to max_page_size
        assert seen == list(range(45, 0, -1))  # newest first, each once
        default = await stub.ListNotes(pb.ListNotesRequest(), metadata=AUTH)
        assert len(default.notes) == 7
        # Keyset paging: a note created between pages does not shift the next page.
        first = await stub.ListNotes(pb.ListNotesRequest(page_size=10), metadata=AUTH)
        await create(stub, "newcomer")
        second = await stub.ListNotes(
            pb.ListNotesRequest(page_size=10, page_token=first.next_page_token), metadata=AUTH
        )
        assert [n.id for n in second.notes] == list(range(35, 25, -1))


async def test_search_matches_title_or_body_in_any_case(tmp_path, db):
    async with running(tmp_path, db=db) as server, stub_for(server) as stub:
        await create(stub, "Straße map", "directions")  # 1
        await create(stub, "shopping", "buy STRASSE cleaner")  # 2
        await create(stub, "100% sure", "under_score")  # 3
        await create(stub, "unrelated", "nothing here")  # 4
        await create(stub, "1000 sure", "underXscore")  # 5

        async def ids(query: str) -> list[int]:
            reply = await stub.SearchNotes(pb.SearchNotesRequest(query=query), metadata=AUTH)
            return [n.id for n in reply.notes]

        assert await ids("strasse") == [2, 1]  # Unicode case folding, newest first
        assert await ids("STRAßE") == [2, 1]
        assert await ids("100%") == [3]  # LIKE wildcards are literal
        assert await ids("under_") == [3]
        assert await ids("zebra") == []


async def test_search_pages_and_tokens_are_bound_to_their_query(tmp_path, db):
    async with running(tmp_path, db=db) as server, stub_for(server) as stub:
        for i in range(12):
            await create(stub, f"{'apple' if i % 2 else 'pear'} {i}")
        first = await stub.SearchNotes(
            pb.SearchNotesRequest(query="apple", page_size=4), metadata=AUTH
        )
        second = await stub.SearchNotes(
            pb.SearchNotesRequest(query="apple", page_size=4, page_token=first.next_page_token),
            metadata=AUTH,
        )
        assert [n.id for n in first.notes] == [12, 10, 8, 6]
        assert [n.id for n in second.notes] == [4, 2]
        assert second.next_page_token == ""
        await expect_status(
            stub.SearchNotes(
                pb.SearchNotesRequest(query="pear", page_token=first.next_page_token),
                metadata=AUTH,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token was issued for a different query",
        )
        await expect_status(
            stub.ListNotes(pb.ListNotesRequest(page_token=first.next_page_token), metadata=AUTH),
            grpc.StatusCode.INVALID_ARGUMENT,
            "different query",
        )


# ---------------------------------------------------------------- watch


async def test_watch_receives_changes_made_by_another_client(tmp_path, db):
    async with (
        running(tmp_path, db=db) as server,
        stub_for(server) as watcher,
        stub_for(server) as writer,
    ):
        stream = watcher.WatchNotes(pb.WatchNotesRequest(), metadata=AUTH)
        await asyncio.wait_for(stream.initial_metadata(), TIMEOUT)  # subscribed
        note = await create(writer, "watched")
        await writer.UpdateNote(pb.UpdateNoteRequest(id=note.id, title="renamed"), metadata=AUTH)
        await writer.DeleteNote(pb.DeleteNoteRequest(id=note.id), metadata=AUTH)
        events = [await asyncio.wait_for(stream.read(), TIMEOUT) for _ in range(3)]
        assert [e.kind for e in events] == [
            pb.NoteEvent.CREATED,
            pb.NoteEvent.UPDATED,
            pb.NoteEvent.DELETED,
        ]
        assert [(e.note.title, e.note.version) for e in events] == [
            ("watched", 1),
            ("renamed", 2),
            ("renamed", 2),
        ]
        stream.cancel()
        await apoll_until(lambda: len(server.service.hub) == 0)


async def test_a_slow_watcher_is_ended_with_resource_exhausted(tmp_path):
    limits = RPCLimits(max_watch_backlog=4)
    async with (
        running(tmp_path, limits=limits) as server,
        stub_for(server) as watcher,
        stub_for(server) as writer,
    ):
        slow = watcher.WatchNotes(pb.WatchNotesRequest(), metadata=AUTH)
        await asyncio.wait_for(slow.initial_metadata(), TIMEOUT)
        # A burst of changes faster than the subscriber drains: published back to back on
        # the server's loop, so its queue holds 4 and the 5th ends the subscription. (A
        # reader that stops reading: the next test.)
        note = await create(writer, "burst")
        for _ in range(10):
            server.service.hub.publish(pb.NoteEvent(kind=pb.NoteEvent.UPDATED, note=note))
        events, error = [], None
        for _ in range(2):  # the CREATED event may have been written before the burst
            try:
                events.append(await asyncio.wait_for(slow.read(), TIMEOUT))
            except grpc.aio.AioRpcError as exc:
                error = exc
                break
        assert [e.kind for e in events] in ([], [pb.NoteEvent.CREATED])
        assert error is not None
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            "watch: subscriber fell more than 4 events behind; subscribe again"
        )
        await apoll_until(lambda: len(server.service.hub) == 0)
        # Writers were never slowed down or failed, and a new watcher is welcome.
        again = watcher.WatchNotes(pb.WatchNotesRequest(), metadata=AUTH)
        await asyncio.wait_for(again.initial_metadata(), TIMEOUT)
        assert (await create(writer, "after")).id == 2
        event = await asyncio.wait_for(again.read(), TIMEOUT)
        assert (event.kind, event.note.title) == (pb.NoteEvent.CREATED, "after")
        again.cancel()


async def test_a_watcher_that_stops_reading_is_ended_not_buffered(tmp_path):
    # Large notes fill the HTTP/2 window and the socket buffers (a few MB) after a few
    # events; behind them the server queues at most 4 more, then ends the stream.
    limits = RPCLimits(max_watch_backlog=4, max_note_bytes=900_000, max_message_bytes=1 << 21)
    async with (
        running(tmp_path, limits=limits) as server,
        stub_for(server) as watcher,
        stub_for(server) as writer,
    ):
        stream = watcher.WatchNotes(pb.WatchNotesRequest(), metadata=AUTH)
        await asyncio.wait_for(stream.initial_metadata(), TIMEOUT)
        for i in range(40):  # 36 MB of changes while the watcher reads nothing
            await create(writer, f"n{i}", "x" * 900_000)
        received, error = 0, None
        for _ in range(41):
            try:
                event = await asyncio.wait_for(stream.read(), TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                error = exc
                break
            assert event.note.id == received + 1  # in order, none skipped before the end
            received += 1
        assert error is not None
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert received < 40
        await apoll_until(lambda: len(server.service.hub) == 0)


async def test_too_many_watchers(tmp_path):
    limits = RPCLimits(max_watchers=1)
    async with running(tmp_path, limits=limits) as server, stub_for(server) as stub:
        first = stub.WatchNotes(pb.WatchNotesRequest(), metadata=AUTH)
        await asyncio.wait_for(first.initial_metadata(), TIMEOUT)
        second = stub.WatchNotes(pb.WatchNotesRequest(), metadata=AUTH)
        await expect_status(second.read(), grpc.StatusCode.RESOURCE_EXHAUSTED, "1 watchers")
        first.cancel()


# ---------------------------------------------------------------- deadlines


async def test_a_stalled_store_call_is_abandoned_at_the_client_deadline(tmp_path):
    store = StallingStore(tmp_path / "stall.sqlite3")
    async with running(tmp_path, store=store) as server, stub_for(server) as stub:
        await create(stub, "x")
        started = time.monotonic()
        await expect_status(
            stub.GetNote(pb.GetNoteRequest(id=1), metadata=AUTH, timeout=0.3),
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        elapsed = time.monotonic() - started
        assert 0.25 < elapsed < 0.3 + TIMEOUT / 5
        # The runaway query was interrupted: the single store thread answers again.
        await apoll_until(lambda: store.interrupted == 1)
        assert (await create(stub, "y")).id == 2


async def test_a_slow_postgres_query_is_cancelled_at_the_deadline(tmp_path, pg_url):
    store = StallingPostgresStore(pg_url, max_connections=1)
    async with running(tmp_path, store=store) as server, stub_for(server) as stub:
        await create(stub, "x")
        started = time.monotonic()
        await expect_status(
            stub.GetNote(pb.GetNoteRequest(id=1), metadata=AUTH, timeout=0.3),
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        assert time.monotonic() - started < 0.3 + TIMEOUT / 5
        # The only pooled connection is back and usable: pg_sleep was cancelled.
        note = await asyncio.wait_for(create(stub, "y"), TIMEOUT)
        assert note.id == 2


async def test_a_lost_database_connection_is_unavailable_then_recovers(tmp_path, pg_url):
    import uuid

    import psycopg

    name = f"notes_{uuid.uuid4().hex[:12]}"  # only this test's connections are cut
    store = PostgresNoteStore(f"{pg_url}&application_name={name}", max_connections=1)
    async with running(tmp_path, store=store) as server, stub_for(server) as stub:
        await create(stub, "x")
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
            cur = await admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (name,),
            )
            assert (await cur.fetchone()) == (1,)
        await expect_status(
            stub.GetNote(pb.GetNoteRequest(id=1), metadata=AUTH, timeout=TIMEOUT),
            grpc.StatusCode.UNAVAILABLE,
            "the database is unavailable",
        )
        # The pool replaces the broken connection; the service never stopped.
        note = await stub.GetNote(pb.GetNoteRequest(id=1), metadata=AUTH, timeout=TIMEOUT)
        assert note.title == "x"


async def test_without_a_client_deadline_store_timeout_bounds_the_call(tmp_path):
    store = StallingStore(tmp_path / "stall.sqlite3")
    async with (
        running(tmp_path, store=store, store_timeout=0.2) as server,
        stub_for(server) as stub,
    ):
        started = time.monotonic()
        await expect_status(
            stub.GetNote(pb.GetNoteRequest(id=1), metadata=AUTH),
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "the store call did not finish before the deadline",
        )
        assert time.monotonic() - started < 0.2 + TIMEOUT / 5
        await apoll_until(lambda: store.interrupted == 1)
        assert (await create(stub, "y")).id == 1


# ---------------------------------------------------------------- shutdown and startup


async def test_graceful_shutdown_finishes_the_in_flight_call(tmp_path):
    store = GatedStore(tmp_path / "gated.sqlite3")
    server = RPCServer(
        RPCServerConfig(bind="127.0.0.1:0", token=None, grace_period=TIMEOUT), store=store
    )
    await server.start()
    async with stub_for(server) as stub:
        await stub.CreateNote(pb.CreateNoteRequest(title="in flight"))
        watch = stub.WatchNotes(pb.WatchNotesRequest())
        await asyncio.wait_for(watch.initial_metadata(), TIMEOUT)
        in_flight = asyncio.ensure_future(stub.GetNote(pb.GetNoteRequest(id=1)))
        await asyncio.wait_for(store.entered.wait(), TIMEOUT)
        closing = asyncio.ensure_future(server.close())
        # Watch streams end at once so they do not hold the grace period open.
        await expect_status(watch.read(), grpc.StatusCode.UNAVAILABLE, "shutting down")
        # New calls are refused while the in-flight one is still running.
        await expect_status(
            stub.CreateNote(pb.CreateNoteRequest(title="late"), timeout=TIMEOUT),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert not in_flight.done()
        store.gate.set()
        note = await asyncio.wait_for(in_flight, TIMEOUT)
        assert note.title == "in flight"
        await asyncio.wait_for(closing, TIMEOUT)


async def test_calls_still_running_after_the_grace_period_are_cancelled(tmp_path):
    store = GatedStore(tmp_path / "gated.sqlite3")
    server = RPCServer(
        RPCServerConfig(bind="127.0.0.1:0", token=None, grace_period=0.2), store=store
    )
    await server.start()
    async with stub_for(server) as stub:
        in_flight = stub.GetNote(pb.GetNoteRequest(id=1))
        waiter = asyncio.ensure_future(in_flight)
        await asyncio.wait_for(store.entered.wait(), TIMEOUT)
        started = time.monotonic()
        await asyncio.wait_for(server.close(), TIMEOUT)
        assert time.monotonic() - started < 0.2 + TIMEOUT / 5
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(waiter, TIMEOUT)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def test_tls(tmp_path, tls_certs):
    from netstack.config import TLS

    tls = TLS(certfile=tls_certs.certfile, keyfile=tls_certs.keyfile)
    async with running(tmp_path, tls=tls) as server:
        assert server.scheme == "grpcs"
        with open(tls_certs.cafile, "rb") as fh:  # noqa: ASYNC230 - a small local file
            credentials = grpc.ssl_channel_credentials(root_certificates=fh.read())
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
            stub = pb_grpc.NotesStub(channel)
            assert (await create(stub, "over tls")).id == 1  # type: ignore[arg-type]
        async with stub_for(server) as plaintext:
            await expect_status(create(plaintext, "in the clear"), grpc.StatusCode.UNAVAILABLE)


async def test_an_unreadable_certificate_is_a_config_error(tmp_path):
    from netstack.config import TLS
    from netstack.errors import ConfigError

    missing = str(tmp_path / "missing.pem")
    cfg = RPCServerConfig(
        bind="127.0.0.1:0",
        db=str(tmp_path / "n.sqlite3"),
        tls=TLS(certfile=missing, keyfile=missing),
    )
    server = RPCServer(cfg)
    with pytest.raises(ConfigError, match=r"cannot read .*missing\.pem"):
        await server.start()
    await server.close()


async def test_a_busy_port_is_an_os_error_naming_the_reason(tmp_path):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        server = RPCServer(
            RPCServerConfig(bind=f"127.0.0.1:{port}", db=str(tmp_path / "n.sqlite3"))
        )
        with pytest.raises(OSError, match="Address already in use"):
            await server.start()


async def test_notes_survive_a_restart(tmp_path, db):
    async with running(tmp_path, db=db) as server, stub_for(server) as stub:
        await create(stub, "persistent", "on disk")
    async with running(tmp_path, db=db) as server, stub_for(server) as stub:
        note = await stub.GetNote(pb.GetNoteRequest(id=1), metadata=AUTH)
        assert (note.title, note.body) == ("persistent", "on disk")
    if "://" not in db:
        assert (tmp_path / "notes.sqlite3").exists()
