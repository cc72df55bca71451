"""SQLite notes store (stdlib ``sqlite3``): WAL mode, one connection in one worker thread.

Queries run in a single-thread executor, so the event loop never blocks on disk and
SQLite sees one writer. When the awaiting call is cancelled (a gRPC deadline passed), the
running statement is stopped with ``Connection.interrupt()``: an abandoned call frees the
worker thread at once instead of finishing a query nobody waits for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from netstack.servers.rpc.store import Note, StoreUnavailable, VersionConflict, like_pattern

T = TypeVar("T")

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    search_key TEXT NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    version INTEGER NOT NULL
);
"""
_COLUMNS: Final = "id, title, body, created, updated, version"


def search_key(title: str, body: str) -> str:
    """What search matches against: title and body, case-folded (Unicode, not just ASCII)."""
    return f"{title}\n{body}".casefold()


def _note(row: Sequence[Any]) -> Note:
    return Note(row[0], row[1], row[2], row[3], row[4], row[5])


class _Job:
    """One store call for the worker thread, which an abandoning caller can stop."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.abandoned = False
        self.running = False

    def __call__(self) -> Any:
        if self.abandoned:
            raise sqlite3.OperationalError("abandoned before it started")
        self.running = True
        try:
            return self.fn()
        finally:
            self.running = False


class SQLiteNoteStore:
    """:class:`~netstack.servers.rpc.store.NoteStore` on a SQLite file.

    Args:
        path: database file (created with its directory if missing), or ``:memory:``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="notes-sqlite"
        )
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "open() first"
        return self._db

    async def _run(self, fn: Callable[[], T]) -> T:
        job = _Job(fn)
        future = asyncio.get_running_loop().run_in_executor(self._executor, job)
        try:
            return await asyncio.shield(future)
        except sqlite3.OperationalError as exc:  # disk I/O error, database locked too long
            raise StoreUnavailable(f"SQLite: {exc}") from exc
        except asyncio.CancelledError:
            job.abandoned = True  # a queued job will not start
            if job.running and self._db is not None:
                self._db.interrupt()  # the running statement fails with "interrupted"
            raise

    def _open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # durable across app crashes in WAL mode
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(SCHEMA)
        self._db = db

    async def open(self) -> None:
        try:
            await self._run(self._open)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self.db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    def _page(self, where: str, args: tuple[Any, ...], before: int | None, limit: int) -> Any:
        clauses = [where] if where else []
        if before is not None:
            clauses.append("id < ?")
            args = (*args, before)
        sql = f"SELECT {_COLUMNS} FROM notes"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY id DESC LIMIT ?"
        return [_note(r) for r in self.db.execute(sql, (*args, limit)).fetchall()]

    async def create(self, title: str, body: str, now: int) -> Note:
        def do() -> Note:
            row = self.db.execute(
                "INSERT INTO notes (title, body, search_key, created, updated, version) "
                f"VALUES (?, ?, ?, ?, ?, 1) RETURNING {_COLUMNS}",
                (title, body, search_key(title, body), now, now),
            ).fetchone()
            return _note(row)

        return await self._run(do)

    async def get(self, note_id: int) -> Note | None:
        def do() -> Note | None:
            row = self.db.execute(
                f"SELECT {_COLUMNS} FROM notes WHERE id = ?", (note_id,)
            ).fetchone()
            return None if row is None else _note(row)

        return await self._run(do)

    async def page(self, *, before: int | None, limit: int) -> list[Note]:
        result: list[Note] = await self._run(lambda: self._page("", (), before, limit))
        return result

    async def search(self, query: str, *, before: int | None, limit: int) -> list[Note]:
        pattern = like_pattern(query.casefold())
        result: list[Note] = await self._run(
            lambda: self._page("search_key LIKE ? ESCAPE '\\'", (pattern,), before, limit)
        )
        return result

    async def update(
        self,
        note_id: int,
        *,
        title: str | None,
        body: str | None,
        expected_version: int | None,
        now: int,
    ) -> Note | None:
        def do() -> Note | None:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM notes WHERE id = ?", (note_id,)
                ).fetchone()
                if row is None:
                    db.execute("ROLLBACK")
                    return None
                old = _note(row)
                if expected_version is not None and expected_version != old.version:
                    raise VersionConflict(note_id, expected_version, old.version)
                new_title = old.title if title is None else title
                new_body = old.body if body is None else body
                row = db.execute(
                    "UPDATE notes SET title = ?, body = ?, search_key = ?, updated = ?, "
                    f"version = version + 1 WHERE id = ? RETURNING {_COLUMNS}",
                    (new_title, new_body, search_key(new_title, new_body), now, note_id),
                ).fetchone()
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return _note(row)

        return await self._run(do)

    async def delete(self, note_id: int) -> Note | None:
        def do() -> Note | None:
            row = self.db.execute(
                f"DELETE FROM notes WHERE id = ? RETURNING {_COLUMNS}", (note_id,)
            ).fetchone()
            return None if row is None else _note(row)

        return await self._run(do)

    def change_feed(self) -> None:
        """None: one instance writes a SQLite file, and its service publishes its changes."""
        return None
