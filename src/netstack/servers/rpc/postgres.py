"""PostgreSQL notes store (``psycopg`` 3 async + ``psycopg_pool``, the ``db`` extra).

Each call borrows a pooled connection for one transaction (the pool commits at the end of
the block, rolls back on an exception), so calls run concurrently. When a call is
cancelled (a gRPC deadline passed), psycopg cancels the running query on the server
before the connection goes back to the pool. The schema mirrors the SQLite store's, with
the same case-folded ``search_key``, so both answer searches alike; it is created under
an advisory lock, so instances starting together do not race (as the chat store does).

The schema includes the ``notes_notify`` trigger and the ``note_changes`` table that
publish every change to the other instances (:mod:`.pgfeed`, :meth:`change_feed`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, LiteralString

from netstack.servers.pg import PooledStore, one_line
from netstack.servers.rpc.pgfeed import (
    CHANGE_LOG_SQL,
    TRIGGER_FUNCTION_SQL,
    TRIGGER_SQL,
    PostgresChangeFeed,
)
from netstack.servers.rpc.sqlite import search_key
from netstack.servers.rpc.store import Note, StoreUnavailable, VersionConflict, like_pattern

if TYPE_CHECKING:
    from psycopg import AsyncConnection

# Any constant: serialises schema creation between instances ("note").
SCHEMA_LOCK: Final = 0x6E6F7465

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS notes (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    search_key TEXT NOT NULL,
    created BIGINT NOT NULL,
    updated BIGINT NOT NULL,
    version BIGINT NOT NULL
)
"""
_SELECT: Final = "SELECT id, title, body, created, updated, version FROM notes"
_RETURNING: Final = " RETURNING id, title, body, created, updated, version"


def _note(row: Sequence[Any]) -> Note:
    return Note(row[0], row[1], row[2], row[3], row[4], row[5])


class PostgresNoteStore(PooledStore):
    """:class:`~netstack.servers.rpc.store.NoteStore` on PostgreSQL.

    Connection plumbing (url, pool, open, close): :class:`~netstack.servers.pg.PooledStore`.
    """

    SCHEMA = (SCHEMA, CHANGE_LOG_SQL, TRIGGER_FUNCTION_SQL, TRIGGER_SQL)
    SCHEMA_LOCK = SCHEMA_LOCK
    POOL_NAME = "netstack-notes"
    UNAVAILABLE = StoreUnavailable

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[tuple[Any, ...]]]:
        """A pooled connection for one transaction; a lost server is StoreUnavailable."""
        import psycopg

        try:
            async with self.pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:  # includes the pool's PoolTimeout
            raise StoreUnavailable(f"PostgreSQL: {one_line(exc)}") from exc

    async def _all(self, sql: LiteralString, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with self._connection() as conn:
            cur = await conn.execute(sql, args)
            return await cur.fetchall()

    async def create(self, title: str, body: str, now: int) -> Note:
        rows = await self._all(
            "INSERT INTO notes (title, body, search_key, created, updated, version)"
            " VALUES (%s, %s, %s, %s, %s, 1)" + _RETURNING,
            (title, body, search_key(title, body), now, now),
        )
        return _note(rows[0])

    async def get(self, note_id: int) -> Note | None:
        rows = await self._all(_SELECT + " WHERE id = %s", (note_id,))
        return _note(rows[0]) if rows else None

    async def page(self, *, before: int | None, limit: int) -> list[Note]:
        if before is None:
            rows = await self._all(_SELECT + " ORDER BY id DESC LIMIT %s", (limit,))
        else:
            rows = await self._all(
                _SELECT + " WHERE id < %s ORDER BY id DESC LIMIT %s", (before, limit)
            )
        return [_note(r) for r in rows]

    async def search(self, query: str, *, before: int | None, limit: int) -> list[Note]:
        pattern = like_pattern(query.casefold())
        rows = await self._all(
            _SELECT + " WHERE search_key LIKE %s ESCAPE '\\' AND id < %s ORDER BY id DESC LIMIT %s",
            (pattern, before if before is not None else 2**63 - 1, limit),
        )
        return [_note(r) for r in rows]

    async def update(
        self,
        note_id: int,
        *,
        title: str | None,
        body: str | None,
        expected_version: int | None,
        now: int,
    ) -> Note | None:
        async with self._connection() as conn:
            cur = await conn.execute(_SELECT + " WHERE id = %s FOR UPDATE", (note_id,))
            row = await cur.fetchone()
            if row is None:
                return None
            old = _note(row)
            if expected_version is not None and expected_version != old.version:
                raise VersionConflict(note_id, expected_version, old.version)
            new_title = old.title if title is None else title
            new_body = old.body if body is None else body
            cur = await conn.execute(
                "UPDATE notes SET title = %s, body = %s, search_key = %s, updated = %s,"
                " version = version + 1 WHERE id = %s" + _RETURNING,
                (new_title, new_body, search_key(new_title, new_body), now, note_id),
            )
            updated = await cur.fetchone()
            assert updated is not None
            return _note(updated)

    async def delete(self, note_id: int) -> Note | None:
        rows = await self._all("DELETE FROM notes WHERE id = %s" + _RETURNING, (note_id,))
        return _note(rows[0]) if rows else None

    def change_feed(self) -> PostgresChangeFeed:
        """LISTEN for the changes every instance commits (the ``notes_notify`` trigger)."""
        return PostgresChangeFeed(self)
