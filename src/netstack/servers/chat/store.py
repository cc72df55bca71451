"""The chat store interface: what the session logic needs from a database.

:class:`Store` is a ``typing.Protocol`` of coroutines, so an implementation may block in a
thread (:class:`~netstack.servers.chat.sqlite.SQLiteStore`) or be natively asynchronous
(a PostgreSQL store on ``psycopg``'s async API, later). Every method takes plain values and
returns the frozen records below; times are integer milliseconds since the epoch, passed
in by the caller so that tests can control them.

Message ids come from one sequence shared by rooms and direct messages, so a client's
"last seen id" is a single number and ``backfill(since=...)`` can return everything newer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from netstack.errors import NetstackError

Role = Literal["owner", "moderator", "member"]
Visibility = Literal["public", "invite"]
ROLE_RANK: dict[str, int] = {"member": 0, "moderator": 1, "owner": 2}


class StoreUnavailable(NetstackError):
    """The database cannot be opened (missing directory, permissions, bad URL target)."""


class StoreConflict(Exception):
    """A unique constraint failed (nick or room name taken)."""


@dataclass(frozen=True, slots=True)
class User:
    id: int
    nick: str
    password_hash: str


@dataclass(frozen=True, slots=True)
class Room:
    id: int
    name: str
    visibility: Visibility
    topic: str


@dataclass(frozen=True, slots=True)
class RoomSummary:
    room: Room
    members: int
    role: Role | None  # the asking user's role, None when not a member


@dataclass(frozen=True, slots=True)
class Member:
    user_id: int
    nick: str
    role: Role
    muted_until: int | None  # ms; None: not muted


@dataclass(frozen=True, slots=True)
class FileInfo:
    hash: str
    name: str
    size: int
    mime: str


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    ts: int
    sender: str
    text: str
    room: str | None = None
    recipient: str | None = None
    file: FileInfo | None = None

    def to_json(self) -> dict[str, object]:
        """The wire form: ``{id, ts, from, text, room | to, file?}``."""
        out: dict[str, object] = {"id": self.id, "ts": self.ts, "from": self.sender}
        if self.room is not None:
            out["room"] = self.room
        else:
            out["to"] = self.recipient
        out["text"] = self.text
        if self.file is not None:
            out["file"] = file_json(self.file)
        return out


def file_json(info: FileInfo) -> dict[str, object]:
    return {
        "hash": info.hash,
        "name": info.name,
        "size": info.size,
        "mime": info.mime,
        "url": f"/files/{info.hash}",
    }


class Store(Protocol):
    """Persistence for accounts, sessions, rooms, memberships, messages and files."""

    async def open(self) -> None:
        """Connect and create the schema if needed."""

    async def close(self) -> None: ...

    # Accounts and sessions.
    async def create_user(self, nick: str, password_hash: str, now: int) -> User:
        """Raises StoreConflict when the nick is taken (ignoring case)."""

    async def get_user(self, nick: str) -> User | None:
        """Look a user up by nick, ignoring case."""

    async def get_user_by_id(self, user_id: int) -> User | None: ...

    async def create_session(self, token_hash: str, user_id: int, expires: int, now: int) -> None:
        """Store a new session; sessions expired by ``now`` are purged on the way."""

    async def session_user(self, token_hash: str, now: int) -> User | None:
        """The user of an unexpired session, else None."""

    async def delete_session(self, token_hash: str) -> None: ...

    # Rooms and memberships.
    async def create_room(
        self, name: str, visibility: Visibility, topic: str, owner_id: int, now: int
    ) -> Room:
        """Create the room with ``owner_id`` as its owner. Raises StoreConflict."""

    async def get_room(self, name: str) -> Room | None: ...

    async def set_topic(self, room_id: int, topic: str) -> None: ...

    async def list_rooms(self, user_id: int) -> list[RoomSummary]:
        """Public rooms and the rooms ``user_id`` belongs to."""

    async def user_rooms(self, user_id: int) -> list[str]:
        """Names of the rooms ``user_id`` belongs to."""

    async def get_member(self, room_id: int, user_id: int) -> Member | None: ...

    async def members(self, room_id: int) -> list[Member]: ...

    async def add_member(self, room_id: int, user_id: int, role: Role, now: int) -> None:
        """Add (or keep) a membership; consumes any invite."""

    async def remove_member(self, room_id: int, user_id: int) -> bool:
        """Returns whether the user was a member."""

    async def set_role(self, room_id: int, user_id: int, role: Role) -> None: ...

    async def set_mute(self, room_id: int, user_id: int, until: int | None) -> None: ...

    async def add_ban(self, room_id: int, user_id: int, by: int, reason: str, now: int) -> None: ...

    async def remove_ban(self, room_id: int, user_id: int) -> bool: ...

    async def is_banned(self, room_id: int, user_id: int) -> bool: ...

    async def add_invite(self, room_id: int, user_id: int, by: int, now: int) -> None: ...

    async def has_invite(self, room_id: int, user_id: int) -> bool: ...

    # Messages.
    async def add_message(
        self,
        *,
        sender: User,
        text: str,
        now: int,
        room: Room | None = None,
        recipient: User | None = None,
        file: FileInfo | None = None,
        pending: bool = False,
    ) -> Message:
        """Store a room message or a DM; ``pending`` queues a DM for the next login."""

    async def room_history(self, room: Room, before: int | None, limit: int) -> list[Message]:
        """Up to ``limit`` messages older than ``before``, oldest first."""

    async def dm_history(
        self, a: User, b: User, before: int | None, limit: int
    ) -> list[Message]: ...

    async def dm_partners(self, user_id: int, limit: int) -> list[tuple[int, str]]:
        """(id, nick) of the users ``user_id`` exchanged DMs with, the most recent first.

        Only the last 1000 DMs sent and 1000 received are looked at: bounded work per call.
        """

    async def backfill(self, user_id: int, since: int, limit: int) -> list[Message]:
        """Messages newer than ``since`` in the user's rooms and DMs, oldest first."""

    async def last_message_id(self) -> int: ...

    async def pending(self, user_id: int, limit: int) -> list[Message]:
        """The oldest ``limit`` DMs that arrived while ``user_id`` was offline, oldest first."""

    async def clear_pending(self, user_id: int, up_to: int) -> None:
        """Forget the pending DMs of ``user_id`` with ids up to ``up_to`` (delivered)."""

    # Files (stored by content hash).
    async def put_file(self, info: FileInfo, data: bytes, uploader_id: int, now: int) -> None: ...

    async def file_info(self, file_hash: str) -> FileInfo | None: ...

    async def get_file(self, file_hash: str) -> tuple[FileInfo, bytes] | None: ...
