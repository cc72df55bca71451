"""PostgreSQL notes store on psycopg 3's asyncio API (the ``db`` extra, imported lazily).

One connection in autocommit mode, used by one call at a time (an ``asyncio.Lock``);
update runs in a transaction with ``SELECT ... FOR UPDATE``. When a call is cancelled (a
gRPC deadline passed), psycopg cancels the running query on the server. The schema and the
case-folded ``search_key`` match the SQLite store, so both answer searches alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from netstack.servers.rpc.sqlite import search_key
from netstack.servers.rpc.store import Note, StoreUnavailable, VersionConflict, like_pattern

if TYPE_CHECKING:
    import psycopg

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
_COLUMNS: Final = "id, title, body, created, updated, version"


def _note(row: Sequence[Any]) -> Note:
    return Note(row[0], row[1], row[2], row[3], row[4], row[5])


class PostgresNoteStore:
    """:class:`~netstack.servers.rpc.store.NoteStore` on PostgreSQL.

    Args:
        url: ``postgresql://user:password@host:port/dbname``.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._lock = asyncio.Lock()

    @property
    def conn(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        assert self._conn is not None, "open() first"
        return self._conn

    async def open(self) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise StoreUnavailable(
                "PostgreSQL needs the psycopg package: pip install 'netstack[db]'"
            ) from exc
        try:
            self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            await self._conn.execute(SCHEMA)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect: {exc}") from exc

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with self._lock:
            cur = await self.conn.execute(sql, args)
            return await cur.fetchall()

    async def _page(
        self, where: str, args: tuple[Any, ...], before: int | None, limit: int
    ) -> list[Note]:
        clauses = [where] if where else []
        if before is not None:
            clauses.append("id < %s")
            args = (*args, before)
        sql = f"SELECT {_COLUMNS} FROM notes"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY id DESC LIMIT %s"
        return [_note(r) for r in await self._fetch(sql, (*args, limit))]

    async def create(self, title: str, body: str, now: int) -> Note:
        rows = await self._fetch(
            "INSERT INTO notes (title, body, search_key, created, updated, version) "
            f"VALUES (%s, %s, %s, %s, %s, 1) RETURNING {_COLUMNS}",
            (title, body, search_key(title, body), now, now),
        )
        return _note(rows[0])

    async def get(self, note_id: int) -> Note | None:
        rows = await self._fetch(f"SELECT {_COLUMNS} FROM notes WHERE id = %s", (note_id,))
        return _note(rows[0]) if rows else None

    async def page(self, *, before: int | None, limit: int) -> list[Note]:
        return await self._page("", (), before, limit)

    async def search(self, query: str, *, before: int | None, limit: int) -> list[Note]:
        pattern = like_pattern(query.casefold())
        return await self._page("search_key LIKE %s ESCAPE '\\'", (pattern,), before, limit)

    async def update(
        self,
        note_id: int,
        *,
        title: str | None,
        body: str | None,
        expected_version: int | None,
        now: int,
    ) -> Note | None:
        async with self._lock, self.conn.transaction():
            cur = await self.conn.execute(
                f"SELECT {_COLUMNS} FROM notes WHERE id = %s FOR UPDATE", (note_id,)
            )
            row = await cur.fetchone()
            if row is None:
                return None
            old = _note(row)
            if expected_version is not None and expected_version != old.version:
                raise VersionConflict(note_id, expected_version, old.version)
            new_title = old.title if title is None else title
            new_body = old.body if body is None else body
            cur = await self.conn.execute(
                "UPDATE notes SET title = %s, body = %s, search_key = %s, updated = %s, "
                f"version = version + 1 WHERE id = %s RETURNING {_COLUMNS}",
                (new_title, new_body, search_key(new_title, new_body), now, note_id),
            )
            updated = await cur.fetchone()
            assert updated is not None
            return _note(updated)

    async def delete(self, note_id: int) -> Note | None:
        rows = await self._fetch(
            f"DELETE FROM notes WHERE id = %s RETURNING {_COLUMNS}", (note_id,)
        )
        return _note(rows[0]) if rows else None
