"""PostgreSQL store (``psycopg`` 3, async, with a connection pool): ``--db postgresql://...``.

The same :class:`~netstack.servers.chat.store.Store` as the SQLite one, for several chat
instances sharing one database (with ``--redis`` for the fan-out). Queries run on
``psycopg``'s asyncio API through a ``psycopg_pool.AsyncConnectionPool``: each method
borrows a connection for one transaction (the pool commits at the end of the block, or
rolls back on an exception), so commands of different sessions run concurrently.

Differences from the SQLite schema: identity columns instead of ``INTEGER PRIMARY KEY``,
``BYTEA`` for file data, ``ON CONFLICT`` instead of ``INSERT OR IGNORE/REPLACE``, and
``COLLATE "C"`` where rows are ordered by name, so both stores sort alike. The schema is
created under an advisory lock: instances starting together do not race on
``CREATE TABLE IF NOT EXISTS``. Message ids come from one identity sequence, like SQLite's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, LiteralString, cast

from netstack.servers.chat.store import (
    FileInfo,
    Member,
    Message,
    Role,
    Room,
    RoomSummary,
    StoreConflict,
    StoreUnavailable,
    User,
    Visibility,
)
from netstack.servers.pg import PooledStore

if TYPE_CHECKING:
    pass

# Any constant: the advisory lock that serialises schema creation between instances.
SCHEMA_LOCK: Final = 0x6E657473  # "nets"
# Serialises message inserts (ids are taken and committed in the same order): backfill asks
# for "ids above the last one I saw", so an id that commits after a higher one would be
# skipped by a client that reconnected in between. One lock for all instances: a chat
# insert is a few hundred microseconds, far below what one lock can serialise.
MESSAGE_LOCK: Final = 0x6D736773  # "msgs"

SCHEMA: Final[tuple[LiteralString, ...]] = (
    """CREATE TABLE IF NOT EXISTS users (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        nick TEXT NOT NULL,
        nick_key TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS sessions (
        token_hash TEXT PRIMARY KEY,
        user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        expires BIGINT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS sessions_expires ON sessions(expires)",
    """CREATE TABLE IF NOT EXISTS rooms (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        visibility TEXT NOT NULL CHECK (visibility IN ('public', 'invite')),
        topic TEXT NOT NULL DEFAULT '',
        created BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS members (
        room_id BIGINT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
        user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('owner', 'moderator', 'member')),
        muted_until BIGINT,
        joined BIGINT NOT NULL,
        PRIMARY KEY (room_id, user_id)
    )""",
    "CREATE INDEX IF NOT EXISTS members_user ON members(user_id)",
    """CREATE TABLE IF NOT EXISTS bans (
        room_id BIGINT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
        user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        by_user BIGINT NOT NULL,
        reason TEXT NOT NULL,
        created BIGINT NOT NULL,
        PRIMARY KEY (room_id, user_id)
    )""",
    """CREATE TABLE IF NOT EXISTS invites (
        room_id BIGINT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
        user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        by_user BIGINT NOT NULL,
        created BIGINT NOT NULL,
        PRIMARY KEY (room_id, user_id)
    )""",
    """CREATE TABLE IF NOT EXISTS files (
        hash TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        mime TEXT NOT NULL,
        size BIGINT NOT NULL,
        data BYTEA NOT NULL,
        uploader BIGINT NOT NULL,
        created BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS messages (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts BIGINT NOT NULL,
        sender BIGINT NOT NULL REFERENCES users(id),
        room_id BIGINT REFERENCES rooms(id) ON DELETE CASCADE,
        recipient BIGINT REFERENCES users(id),
        text TEXT NOT NULL,
        file_hash TEXT REFERENCES files(hash),
        CHECK ((room_id IS NULL) <> (recipient IS NULL))
    )""",
    "CREATE INDEX IF NOT EXISTS messages_room ON messages(room_id, id)",
    "CREATE INDEX IF NOT EXISTS messages_dm ON messages(recipient, sender, id)",
    "CREATE INDEX IF NOT EXISTS messages_sender ON messages(sender, id)",
    "CREATE INDEX IF NOT EXISTS messages_dm_sent ON messages(sender, id, recipient)"
    " WHERE recipient IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS messages_dm_received ON messages(recipient, id, sender)"
    " WHERE recipient IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS pending_dms (
        user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        message_id BIGINT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        PRIMARY KEY (user_id, message_id)
    )""",
)

_MESSAGE_SELECT: Final = """
SELECT m.id, m.ts, s.nick, m.text, r.name, u.nick, f.hash, f.name, f.size, f.mime
FROM messages m
JOIN users s ON s.id = m.sender
LEFT JOIN rooms r ON r.id = m.room_id
LEFT JOIN users u ON u.id = m.recipient
LEFT JOIN files f ON f.hash = m.file_hash
"""

_MEMBER: Final = (
    "SELECT m.user_id, u.nick, m.role, m.muted_until FROM members m JOIN users u ON u.id=m.user_id"
)

NO_LIMIT: Final = 2**62


def _message(row: Sequence[Any]) -> Message:
    file = FileInfo(row[6], row[7], row[8], row[9]) if row[6] is not None else None
    return Message(row[0], row[1], row[2], row[3], room=row[4], recipient=row[5], file=file)


# The partners of a user's last 1000 DMs each way (so a login costs O(1), however many DMs
# a user has), through the indexes messages_dm_sent / messages_dm_received.
_DM_PARTNERS: Final = """
SELECT u.id, u.nick FROM (
    SELECT recipient AS other, id FROM (
        SELECT recipient, id FROM messages WHERE sender=%s AND recipient IS NOT NULL
         ORDER BY id DESC LIMIT 1000) s
    UNION ALL
    SELECT sender AS other, id FROM (
        SELECT sender, id FROM messages WHERE recipient=%s
         ORDER BY id DESC LIMIT 1000) r
) d JOIN users u ON u.id=d.other WHERE d.other<>%s
GROUP BY u.id, u.nick ORDER BY MAX(d.id) DESC LIMIT %s
"""


class PostgresStore(PooledStore):
    """:class:`~netstack.servers.chat.store.Store` on a PostgreSQL database.

    Connection plumbing (url, pool, open, close): :class:`~netstack.servers.pg.PooledStore`.
    """

    SCHEMA = SCHEMA
    SCHEMA_LOCK = SCHEMA_LOCK
    POOL_NAME = "netstack-chat"
    UNAVAILABLE = StoreUnavailable

    async def _one(self, sql: LiteralString, *args: Any) -> tuple[Any, ...] | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, args)
            return await cur.fetchone() if cur.description is not None else None

    async def _all(self, sql: LiteralString, *args: Any) -> list[tuple[Any, ...]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, args)
            return await cur.fetchall()

    async def _count(self, sql: LiteralString, *args: Any) -> int:
        """Run a write; returns the number of rows it touched."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, args)
            return cur.rowcount

    # ------------------------------------------------------------------ accounts

    async def create_user(self, nick: str, password_hash: str, now: int) -> User:
        from psycopg.errors import UniqueViolation

        try:
            row = await self._one(
                "INSERT INTO users (nick, nick_key, password_hash, created)"
                " VALUES (%s,%s,%s,%s) RETURNING id",
                nick,
                nick.lower(),
                password_hash,
                now,
            )
        except UniqueViolation as exc:
            raise StoreConflict(f"nick {nick!r} is taken") from exc
        assert row is not None
        return User(row[0], nick, password_hash)

    async def get_user(self, nick: str) -> User | None:
        row = await self._one(
            "SELECT id, nick, password_hash FROM users WHERE nick_key=%s", nick.lower()
        )
        return User(*row) if row else None

    async def get_user_by_id(self, user_id: int) -> User | None:
        row = await self._one("SELECT id, nick, password_hash FROM users WHERE id=%s", user_id)
        return User(*row) if row else None

    async def create_session(self, token_hash: str, user_id: int, expires: int, now: int) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("DELETE FROM sessions WHERE expires<=%s", (now,))
            await conn.execute(
                "INSERT INTO sessions (token_hash, user_id, expires) VALUES (%s,%s,%s)",
                (token_hash, user_id, expires),
            )

    async def session_user(self, token_hash: str, now: int) -> User | None:
        row = await self._one(
            "SELECT u.id, u.nick, u.password_hash FROM sessions s JOIN users u ON u.id=s.user_id"
            " WHERE s.token_hash=%s AND s.expires>%s",
            token_hash,
            now,
        )
        return User(*row) if row else None

    async def delete_session(self, token_hash: str) -> None:
        await self._count("DELETE FROM sessions WHERE token_hash=%s", token_hash)

    # ------------------------------------------------------------------ rooms

    async def create_room(
        self, name: str, visibility: Visibility, topic: str, owner_id: int, now: int
    ) -> Room:
        from psycopg.errors import UniqueViolation

        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    "INSERT INTO rooms (name, visibility, topic, created) VALUES (%s,%s,%s,%s)"
                    " RETURNING id",
                    (name, visibility, topic, now),
                )
                row = await cur.fetchone()
                assert row is not None
                await conn.execute(
                    "INSERT INTO members (room_id, user_id, role, joined) VALUES (%s,%s,%s,%s)",
                    (row[0], owner_id, "owner", now),
                )
        except UniqueViolation as exc:
            raise StoreConflict(f"room {name!r} exists") from exc
        return Room(row[0], name, visibility, topic)

    async def get_room(self, name: str) -> Room | None:
        row = await self._one("SELECT id, name, visibility, topic FROM rooms WHERE name=%s", name)
        return Room(*row) if row else None

    async def set_topic(self, room_id: int, topic: str) -> None:
        await self._count("UPDATE rooms SET topic=%s WHERE id=%s", topic, room_id)

    async def list_rooms(self, user_id: int) -> list[RoomSummary]:
        rows = await self._all(
            "SELECT r.id, r.name, r.visibility, r.topic,"
            " (SELECT COUNT(*) FROM members c WHERE c.room_id=r.id), m.role"
            " FROM rooms r LEFT JOIN members m ON m.room_id=r.id AND m.user_id=%s"
            " WHERE r.visibility='public' OR m.user_id IS NOT NULL ORDER BY r.name COLLATE \"C\"",
            user_id,
        )
        return [RoomSummary(Room(*row[:4]), row[4], row[5]) for row in rows]

    async def user_rooms(self, user_id: int) -> list[str]:
        rows = await self._all(
            "SELECT r.name FROM members m JOIN rooms r ON r.id=m.room_id WHERE m.user_id=%s"
            ' ORDER BY r.name COLLATE "C"',
            user_id,
        )
        return [row[0] for row in rows]

    async def get_member(self, room_id: int, user_id: int) -> Member | None:
        row = await self._one(_MEMBER + " WHERE m.room_id=%s AND m.user_id=%s", room_id, user_id)
        return Member(*row) if row else None

    async def members(self, room_id: int) -> list[Member]:
        rows = await self._all(
            _MEMBER + ' WHERE m.room_id=%s ORDER BY u.nick_key COLLATE "C"', room_id
        )
        return [Member(*row) for row in rows]

    async def add_member(self, room_id: int, user_id: int, role: Role, now: int) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO members (room_id, user_id, role, joined) VALUES (%s,%s,%s,%s)"
                " ON CONFLICT DO NOTHING",
                (room_id, user_id, role, now),
            )
            await conn.execute(
                "DELETE FROM invites WHERE room_id=%s AND user_id=%s", (room_id, user_id)
            )

    async def remove_member(self, room_id: int, user_id: int) -> bool:
        return (
            await self._count(
                "DELETE FROM members WHERE room_id=%s AND user_id=%s", room_id, user_id
            )
            > 0
        )

    async def set_role(self, room_id: int, user_id: int, role: Role) -> None:
        await self._count(
            "UPDATE members SET role=%s WHERE room_id=%s AND user_id=%s", role, room_id, user_id
        )

    async def set_mute(self, room_id: int, user_id: int, until: int | None) -> None:
        await self._count(
            "UPDATE members SET muted_until=%s WHERE room_id=%s AND user_id=%s",
            until,
            room_id,
            user_id,
        )

    async def add_ban(self, room_id: int, user_id: int, by: int, reason: str, now: int) -> None:
        await self._count(
            "INSERT INTO bans (room_id, user_id, by_user, reason, created)"
            " VALUES (%s,%s,%s,%s,%s) ON CONFLICT (room_id, user_id) DO UPDATE SET"
            " by_user=EXCLUDED.by_user, reason=EXCLUDED.reason, created=EXCLUDED.created",
            room_id,
            user_id,
            by,
            reason,
            now,
        )

    async def remove_ban(self, room_id: int, user_id: int) -> bool:
        return (
            await self._count("DELETE FROM bans WHERE room_id=%s AND user_id=%s", room_id, user_id)
            > 0
        )

    async def is_banned(self, room_id: int, user_id: int) -> bool:
        row = await self._one(
            "SELECT 1 FROM bans WHERE room_id=%s AND user_id=%s", room_id, user_id
        )
        return row is not None

    async def add_invite(self, room_id: int, user_id: int, by: int, now: int) -> None:
        await self._count(
            "INSERT INTO invites (room_id, user_id, by_user, created) VALUES (%s,%s,%s,%s)"
            " ON CONFLICT (room_id, user_id) DO UPDATE SET"
            " by_user=EXCLUDED.by_user, created=EXCLUDED.created",
            room_id,
            user_id,
            by,
            now,
        )

    async def has_invite(self, room_id: int, user_id: int) -> bool:
        row = await self._one(
            "SELECT 1 FROM invites WHERE room_id=%s AND user_id=%s", room_id, user_id
        )
        return row is not None

    # ------------------------------------------------------------------ messages

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
        async with self.pool.connection() as conn:  # one transaction, committed at exit
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MESSAGE_LOCK,))
            cur = await conn.execute(
                "INSERT INTO messages (ts, sender, room_id, recipient, text, file_hash)"
                " VALUES (%s,%s,%s,%s,%s,%s) RETURNING id",
                (
                    now,
                    sender.id,
                    room.id if room else None,
                    recipient.id if recipient else None,
                    text,
                    file.hash if file else None,
                ),
            )
            row = await cur.fetchone()
            assert row is not None
            msg_id = cast(int, row[0])
            if pending and recipient is not None:
                await conn.execute(
                    "INSERT INTO pending_dms (user_id, message_id) VALUES (%s,%s)",
                    (recipient.id, msg_id),
                )
        return Message(
            msg_id,
            now,
            sender.nick,
            text,
            room=room.name if room else None,
            recipient=recipient.nick if recipient else None,
            file=file,
        )

    async def room_history(self, room: Room, before: int | None, limit: int) -> list[Message]:
        rows = await self._all(
            _MESSAGE_SELECT + " WHERE m.room_id=%s AND m.id<%s ORDER BY m.id DESC LIMIT %s",
            room.id,
            before if before is not None else NO_LIMIT,
            limit,
        )
        return [_message(row) for row in reversed(rows)]

    async def dm_history(self, a: User, b: User, before: int | None, limit: int) -> list[Message]:
        rows = await self._all(
            _MESSAGE_SELECT
            + " WHERE ((m.sender=%s AND m.recipient=%s) OR (m.sender=%s AND m.recipient=%s))"
            " AND m.id<%s ORDER BY m.id DESC LIMIT %s",
            a.id,
            b.id,
            b.id,
            a.id,
            before if before is not None else NO_LIMIT,
            limit,
        )
        return [_message(row) for row in reversed(rows)]

    async def dm_partners(self, user_id: int, limit: int) -> list[tuple[int, str]]:
        rows = await self._all(_DM_PARTNERS, user_id, user_id, user_id, limit)
        return [(row[0], row[1]) for row in rows]

    async def backfill(self, user_id: int, since: int, limit: int) -> list[Message]:
        rows = await self._all(
            _MESSAGE_SELECT
            + " WHERE m.id>%s AND (m.recipient=%s OR (m.sender=%s AND m.room_id IS NULL)"
            " OR m.room_id IN (SELECT room_id FROM members WHERE user_id=%s))"
            " ORDER BY m.id LIMIT %s",
            since,
            user_id,
            user_id,
            user_id,
            limit,
        )
        return [_message(row) for row in rows]

    async def last_message_id(self) -> int:
        row = await self._one("SELECT COALESCE(MAX(id), 0) FROM messages")
        assert row is not None
        return cast(int, row[0])

    async def pending(self, user_id: int, limit: int) -> list[Message]:
        rows = await self._all(
            _MESSAGE_SELECT + " JOIN pending_dms p ON p.message_id=m.id WHERE p.user_id=%s"
            " ORDER BY m.id LIMIT %s",
            user_id,
            limit,
        )
        return [_message(row) for row in rows]

    async def clear_pending(self, user_id: int, up_to: int) -> None:
        await self._count(
            "DELETE FROM pending_dms WHERE user_id=%s AND message_id<=%s", user_id, up_to
        )

    # ------------------------------------------------------------------ files

    async def put_file(self, info: FileInfo, data: bytes, uploader_id: int, now: int) -> None:
        await self._count(
            "INSERT INTO files (hash, name, mime, size, data, uploader, created)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
            info.hash,
            info.name,
            info.mime,
            info.size,
            data,
            uploader_id,
            now,
        )

    async def file_info(self, file_hash: str) -> FileInfo | None:
        row = await self._one("SELECT hash, name, size, mime FROM files WHERE hash=%s", file_hash)
        return FileInfo(*row) if row else None

    async def get_file(self, file_hash: str) -> tuple[FileInfo, bytes] | None:
        row = await self._one(
            "SELECT hash, name, size, mime, data FROM files WHERE hash=%s", file_hash
        )
        return (FileInfo(*row[:4]), bytes(row[4])) if row else None
