"""The notes store interface: what the gRPC service needs from a database.

:class:`NoteStore` is a ``typing.Protocol`` of coroutines: the SQLite store runs its
queries in one worker thread (:mod:`.sqlite`), the PostgreSQL store is natively
asynchronous (:mod:`.postgres`). Times are integer milliseconds since the epoch, passed in
by the caller. Ids grow monotonically, so "newest first" is "highest id first" and a page
boundary is just the last id seen (keyset paging: stable while notes are added).

A store call may be cancelled (the caller's deadline passed): each implementation stops
the database work it started (``sqlite3.Connection.interrupt``, psycopg's cancel) so an
abandoned call does not keep the database busy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from netstack.errors import NetstackError


class StoreUnavailable(NetstackError):
    """The database cannot be opened or reached."""


class VersionConflict(NetstackError):
    """An update named an ``expected_version`` that is no longer current.

    Attributes:
        current: the note's current version.
    """

    def __init__(self, note_id: int, expected: int, current: int) -> None:
        super().__init__(f"note {note_id} is at version {current}, not the expected {expected}")
        self.current = current


@dataclass(frozen=True, slots=True)
class Note:
    id: int
    title: str
    body: str
    created: int  # ms since the epoch
    updated: int
    version: int


class NoteStore(Protocol):
    """Persistence for notes."""

    async def open(self) -> None:
        """Connect and create the schema if needed. Raises StoreUnavailable."""

    async def close(self) -> None: ...

    async def create(self, title: str, body: str, now: int) -> Note: ...

    async def get(self, note_id: int) -> Note | None: ...

    async def page(self, *, before: int | None, limit: int) -> list[Note]:
        """Up to ``limit`` notes with ids below ``before`` (all when None), newest first."""

    async def search(self, query: str, *, before: int | None, limit: int) -> list[Note]:
        """As :meth:`page`, only notes whose title or body contains ``query`` (any case)."""

    async def update(
        self,
        note_id: int,
        *,
        title: str | None,
        body: str | None,
        expected_version: int | None,
        now: int,
    ) -> Note | None:
        """Change a note; None when it does not exist. Raises VersionConflict."""

    async def delete(self, note_id: int) -> Note | None:
        """Delete a note and return it as it was; None when it did not exist."""


def like_pattern(query: str) -> str:
    """A LIKE pattern matching ``query`` anywhere, with ``\\`` escaping ``%`` and ``_``."""
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"
