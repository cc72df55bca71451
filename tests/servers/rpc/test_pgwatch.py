"""WatchNotes across instances: two real RPCServers on one real PostgreSQL schema.

Every change goes through the ``notes_notify`` trigger and each instance's LISTEN
connection (servers/rpc/pgfeed.py); these tests watch from one instance and write through
the other, through both, or straight into the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from netstack.servers.rpc import RPCServer
from netstack.servers.rpc._pb import notes_pb2 as pb
from netstack.servers.rpc._pb import notes_pb2_grpc as pb_grpc
from netstack.servers.rpc.pgfeed import CHANNEL_QUERY, MAX_PAYLOAD_BYTES, PostgresChangeFeed
from tests.helpers import TIMEOUT, apoll_until
from tests.servers.rpc.support import AUTH, create, running, stub_for

Stream = Any  # grpc.aio.UnaryStreamCall[WatchNotesRequest, NoteEvent]


@contextlib.asynccontextmanager
async def two_instances(
    tmp_path: Path, pg_url: str
) -> AsyncIterator[tuple[RPCServer, RPCServer, pb_grpc.NotesAsyncStub, pb_grpc.NotesAsyncStub]]:
    async with (
        running(tmp_path, db=pg_url) as a,
        running(tmp_path, db=pg_url) as b,
        stub_for(a) as stub_a,
        stub_for(b) as stub_b,
    ):
        yield a, b, stub_a, stub_b


async def watch(stub: pb_grpc.NotesAsyncStub) -> Stream:
    stream = stub.WatchNotes(pb.WatchNotesRequest(), metadata=AUTH)
    await asyncio.wait_for(stream.initial_metadata(), TIMEOUT)  # subscribed
    return stream


async def read(stream: Stream, n: int) -> list[pb.NoteEvent]:
    return [await asyncio.wait_for(stream.read(), TIMEOUT) for _ in range(n)]


def summary(events: list[pb.NoteEvent]) -> list[tuple[int, int, str, int]]:
    return [(e.kind, e.note.id, e.note.title, e.note.version) for e in events]


def feed_of(server: RPCServer) -> PostgresChangeFeed:
    assert isinstance(server.feed, PostgresChangeFeed)
    return server.feed


async def expect_next(stream: Stream, title: str) -> pb.NoteEvent:
    """The stream's next event is the change to ``title`` (nothing came in between)."""
    event = await asyncio.wait_for(stream.read(), TIMEOUT)
    assert event.note.title == title, summary([event])
    return event


async def expect_feed_back(server: RPCServer, stub: pb_grpc.NotesAsyncStub) -> None:
    """The feed reconnected once, and a new watch hears a change made after it."""
    feed = feed_of(server)
    await apoll_until(lambda: feed.reconnects == 1 and feed.backend_pid is not None)
    again = await watch(stub)
    await create(stub, "after")
    await expect_next(again, "after")
    again.cancel()


async def test_a_watcher_on_one_instance_sees_changes_made_through_the_other(tmp_path, pg_url):
    async with two_instances(tmp_path, pg_url) as (_, _, stub_a, stub_b):
        on_a, on_b = await watch(stub_a), await watch(stub_b)
        note = await create(stub_b, "from b", "body")
        await stub_b.UpdateNote(pb.UpdateNoteRequest(id=note.id, title="renamed"), metadata=AUTH)
        await stub_b.DeleteNote(pb.DeleteNoteRequest(id=note.id), metadata=AUTH)
        expected = [
            (pb.NoteEvent.CREATED, note.id, "from b", 1),
            (pb.NoteEvent.UPDATED, note.id, "renamed", 2),
            (pb.NoteEvent.DELETED, note.id, "renamed", 2),
        ]
        events_a = await read(on_a, 3)
        assert summary(events_a) == expected
        assert events_a[0].note.body == "body"
        assert events_a[0].note.create_time == note.create_time
        # B's own watcher sees its own changes once each, as A's does: the next event
        # on both is the marker, not a duplicate.
        assert summary(await read(on_b, 3)) == expected
        await create(stub_a, "marker")
        await expect_next(on_a, "marker")
        await expect_next(on_b, "marker")
        on_a.cancel()
        on_b.cancel()


async def test_concurrent_writes_through_both_instances_arrive_once_in_order(tmp_path, pg_url):
    async with two_instances(tmp_path, pg_url) as (_, _, stub_a, stub_b):
        on_a = await watch(stub_a)
        note = await create(stub_a, "counter")
        updates = 20
        await asyncio.gather(
            *(
                (stub_a if i % 2 else stub_b).UpdateNote(
                    pb.UpdateNoteRequest(id=note.id, body=str(i)), metadata=AUTH
                )
                for i in range(updates)
            )
        )
        events = await read(on_a, 1 + updates)
        assert [e.note.version for e in events] == list(range(1, updates + 2))
        assert {e.note.body for e in events[1:]} == {str(i) for i in range(updates)}
        await create(stub_b, "marker")
        await expect_next(on_a, "marker")
        on_a.cancel()


async def test_a_rolled_back_change_is_never_seen(tmp_path, pg_url):
    async with two_instances(tmp_path, pg_url) as (_, _, stub_a, stub_b):
        on_a = await watch(stub_a)
        kept = await create(stub_b, "kept")
        await expect_next(on_a, "kept")
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            await conn.execute(
                "INSERT INTO notes (title, body, search_key, created, updated, version)"
                " VALUES ('ghost', '', 'ghost', 0, 0, 1)"
            )
            await conn.execute(
                "UPDATE notes SET title = 'ghost', version = 9 WHERE id = %s", (kept.id,)
            )
            await conn.rollback()
        await create(stub_b, "marker")
        await expect_next(on_a, "marker")  # not the ghost, not the rolled-back update
        # A change committed straight into the database (psql, a migration) is seen too.
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            await conn.execute(
                "UPDATE notes SET title = 'by sql', version = version + 1 WHERE id = %s",
                (kept.id,),
            )
        event = await expect_next(on_a, "by sql")
        assert (event.kind, event.note.id, event.note.version) == (pb.NoteEvent.UPDATED, kept.id, 2)
        on_a.cancel()


async def test_a_change_too_big_for_a_notify_payload_arrives_whole(tmp_path, pg_url):
    body = "é" * MAX_PAYLOAD_BYTES  # 16000 bytes of UTF-8: twice the payload limit
    async with two_instances(tmp_path, pg_url) as (_, _, stub_a, stub_b):
        on_a = await watch(stub_a)
        note = await create(stub_b, "big", body)
        await stub_b.UpdateNote(pb.UpdateNoteRequest(id=note.id, title="bigger"), metadata=AUTH)
        await stub_b.DeleteNote(pb.DeleteNoteRequest(id=note.id), metadata=AUTH)
        events = await read(on_a, 3)
        assert summary(events) == [
            (pb.NoteEvent.CREATED, note.id, "big", 1),
            (pb.NoteEvent.UPDATED, note.id, "bigger", 2),
            (pb.NoteEvent.DELETED, note.id, "bigger", 2),  # the row itself is gone
        ]
        assert [e.note.body for e in events] == [body] * 3
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            cur = await conn.execute("SELECT count(*) FROM note_changes")
            assert await cur.fetchone() == (3,)  # small changes never touch the log
        on_a.cancel()


async def notify(pg_url: str, payload: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        row = await (await conn.execute(CHANNEL_QUERY)).fetchone()
        assert row is not None
        await conn.execute("SELECT pg_notify(%s, %s)", (row[0], payload))


async def test_a_foreign_notification_on_the_channel_is_ignored(tmp_path, pg_url, caplog):
    caplog.set_level(logging.WARNING, "netstack.servers.rpc.pgfeed")
    async with running(tmp_path, db=pg_url) as server, stub_for(server) as stub:
        stream = await watch(stub)
        await notify(pg_url, "hello")
        await notify(pg_url, '{"k": "U", "id": 1}')
        await create(stub, "after")
        await expect_next(stream, "after")
        assert [r.getMessage() for r in caplog.records] == [
            "notes change feed: ignored not a notes change: 'hello'",
            'notes change feed: ignored not a notes change: \'{"k": "U", "id": 1}\'',
        ]
        stream.cancel()


async def expect_interrupted(stream: Stream) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(stream.read(), TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    details = info.value.details() or ""
    assert details.startswith("watch: watch interrupted, changes may have been missed (")
    assert details.endswith("): re-read and watch again")
    return details


async def test_a_lost_listen_connection_ends_the_watches_then_heals(tmp_path, pg_url):
    async with two_instances(tmp_path, pg_url) as (a, _, stub_a, stub_b):
        on_a, on_b = await watch(stub_a), await watch(stub_b)
        feed = feed_of(a)
        pid = feed.backend_pid
        assert pid is not None
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
            cur = await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            assert await cur.fetchone() == (True,)
        # A's watchers are told, at once, that they may have missed changes.
        details = await expect_interrupted(on_a)
        assert "terminat" in details
        # The feed reconnects by itself (backoff from 0.1 s) on a new backend ...
        await apoll_until(lambda: feed.reconnects == 1 and feed.backend_pid not in (None, pid))
        # ... and a new watch on A hears changes from B again. B never lost anything.
        again = await watch(stub_a)
        await create(stub_b, "after")
        await expect_next(again, "after")
        await expect_next(on_b, "after")
        again.cancel()
        on_b.cancel()


async def test_a_change_that_cannot_be_read_back_ends_the_watches(tmp_path, pg_url):
    async with running(tmp_path, db=pg_url) as server, stub_for(server) as stub:
        stream = await watch(stub)
        # An oversized change whose log entry is gone (pruned) cannot be delivered.
        await notify(pg_url, '{"k": "U", "id": 1, "v": 2, "seq": 424242}')
        details = await expect_interrupted(stream)
        assert "change 424242 is no longer in note_changes" in details
        await expect_feed_back(server, stub)


async def test_while_the_feed_is_down_new_watches_are_refused(tmp_path, pg_url):
    async with running(tmp_path, db=pg_url) as server, stub_for(server) as stub:
        first = await watch(stub)
        await create(stub, "x")
        await expect_next(first, "x")
        server.service.interrupted("test")  # what the feed calls when its connection drops
        assert "(test)" in await expect_interrupted(first)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.WatchNotes(pb.WatchNotesRequest(), metadata=AUTH).read()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "watch interrupted" in (info.value.details() or "")
        server.service.resumed()
        stream = await watch(stub)
        await create(stub, "y")
        await expect_next(stream, "y")
        stream.cancel()


async def test_a_change_the_service_cannot_send_ends_the_watches(tmp_path, pg_url, caplog):
    async with running(tmp_path, db=pg_url) as server, stub_for(server) as stub:
        stream = await watch(stub)
        note = await create(stub, "x")
        await expect_next(stream, "x")
        # Written by plain SQL: a time no protobuf Timestamp can hold. Skipping it would
        # leave the watchers silently stale; they are told instead, and the feed goes on.
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            await conn.execute(
                "UPDATE notes SET updated = 9223372036854775807 WHERE id = %s", (note.id,)
            )
        assert "(internal error: ValueError)" in await expect_interrupted(stream)
        assert "notes change feed failed" in caplog.text
        await expect_feed_back(server, stub)


async def test_closing_the_server_closes_its_listen_connection(tmp_path, pg_url):
    async with running(tmp_path, db=pg_url) as server:
        pid = feed_of(server).backend_pid
        assert pid is not None
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:

        async def gone() -> bool:
            cur = await admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
            )
            return await cur.fetchone() == (0,)

        await apoll_until(gone)
