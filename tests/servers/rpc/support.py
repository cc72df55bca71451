"""Helpers for the notes service tests: a real server on 127.0.0.1:0, stores that stall."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from netstack.config import RPCLimits, RPCServerConfig
from netstack.servers.rpc import RPCServer
from netstack.servers.rpc._pb import notes_pb2 as pb
from netstack.servers.rpc._pb import notes_pb2_grpc as pb_grpc
from netstack.servers.rpc.postgres import PostgresNoteStore
from netstack.servers.rpc.sqlite import SQLiteNoteStore
from netstack.servers.rpc.store import Note

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path,
    *,
    store: Any = None,
    limits: RPCLimits | None = None,
    db: str | None = None,
    **settings: Any,
) -> AsyncIterator[RPCServer]:
    settings.setdefault("token", TOKEN)
    cfg = RPCServerConfig(
        bind="127.0.0.1:0",
        db=db or str(tmp_path / "notes.sqlite3"),
        rpc_limits=limits or RPCLimits(),
        **settings,
    )
    server = RPCServer(cfg, store=store)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def stub_for(server: RPCServer) -> AsyncIterator[pb_grpc.NotesAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.NotesStub(channel)  # type: ignore[misc]  # the aio overload


async def create(stub: pb_grpc.NotesAsyncStub, title: str, body: str = "") -> pb.Note:
    return await stub.CreateNote(pb.CreateNoteRequest(title=title, body=body), metadata=AUTH)


class StallingStore(SQLiteNoteStore):
    """A real SQLite store whose ``get`` runs a query that never ends on its own.

    Only ``Connection.interrupt()`` stops it, so a test that sees the store answer again
    after a deadline knows the abandoned query was really stopped.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.interrupted = 0

    async def get(self, note_id: int) -> Note | None:
        def forever() -> None:
            try:
                self.db.execute(
                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                    "SELECT count(*) FROM c"
                ).fetchone()
            except Exception:
                self.interrupted += 1
                raise

        await self._run(forever)
        raise AssertionError("unreachable")


class StallingPostgresStore(PostgresNoteStore):
    """A real PostgreSQL store whose ``get`` sleeps on the server for a minute."""

    async def get(self, note_id: int) -> Note | None:
        await self._all("SELECT pg_sleep(60)", ())
        raise AssertionError("unreachable")


class GatedStore(SQLiteNoteStore):
    """A real SQLite store whose ``get`` waits for ``gate`` first (an in-flight call)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def get(self, note_id: int) -> Note | None:
        self.entered.set()
        await self.gate.wait()
        return await super().get(note_id)
