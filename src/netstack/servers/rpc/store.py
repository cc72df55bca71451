"""The notes store interface: what the gRPC service needs from a database.

:class:`NoteStore` is a ``typing.Protocol`` of coroutines: the SQLite store runs its
queries in one worker thread (:mod:`.sqlite`), the PostgreSQL store is natively
asynchronous (:mod:`.postgres`). Times are integer milliseconds since the epoch, passed in
by the caller. Ids grow monotonically, so "newest first" is "highest id first" and a page
boundary is just the last id seen (keyset paging: stable while notes are added).

A store call may be cancelled (the caller's deadline passed): each implementation stops
the database work it started (``sqlite3.Connection.interrupt``, psycopg's cancel) so an
abandoned call does not keep the database busy.

Changes reach WatchNotes one of two ways. A store that only this process writes (SQLite)
has no :class:`ChangeFeed`: the service publishes each change it makes itself. A store
that several instances share (PostgreSQL) has one: it tells a :class:`ChangeSink` of every
committed change, whichever instance made it, and the service publishes nothing itself,
so each change reaches each watcher exactly once (:mod:`.pgfeed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

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


ChangeKind = Literal["created", "updated", "deleted"]


class ChangeSink(Protocol):
    """Where a :class:`ChangeFeed` delivers (the service, which feeds its watchers)."""

    def changed(self, kind: ChangeKind, note: Note) -> None:
        """A committed change (a deleted note as it was), in commit order per note."""

    def interrupted(self, reason: str) -> None:
        """The feed lost its database connection: changes from now on may be missed."""

    def resumed(self) -> None:
        """The feed listens again: changes from now on are delivered."""


class ChangeFeed(Protocol):
    """Every change committed to a shared database, from whichever instance made it."""

    async def start(self, sink: ChangeSink) -> None:
        """Listen (returns once listening), then deliver to ``sink`` until :meth:`close`.

        Raises:
            StoreUnavailable: the first connection cannot be made.
        """

    async def close(self) -> None: ...


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

    def change_feed(self) -> ChangeFeed | None:
        """The feed of changes made through any instance, or None when this process is
        the only writer (the service then publishes its own changes)."""


def like_pattern(query: str) -> str:
    """A LIKE pattern matching ``query`` anywhere, with ``\\`` escaping ``%`` and ``_``."""
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"
