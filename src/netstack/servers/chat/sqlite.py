"""SQLite store (stdlib ``sqlite3``): WAL mode, one connection in one worker thread.

Every query runs in a single-thread executor, so the event loop never blocks on disk and
SQLite sees one writer (its own model). WAL lets readers of the file (a backup, the CLI)
run alongside. The SQL is plain enough to port to PostgreSQL behind the same
:class:`~netstack.servers.chat.store.Store` interface (``INTEGER PRIMARY KEY`` becomes
``BIGSERIAL``/identity, ``?`` becomes ``%s``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar, cast

from netstack.servers.chat.store import (
    FileInfo,
    Member,
    Message,
    Role,
    Room,
    RoomSummary,
    StoreConflict,
    User,
    Visibility,
)

T = TypeVar("T")

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    nick TEXT NOT NULL,
    nick_key TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions(expires);
CREATE TABLE IF NOT EXISTS rooms (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    visibility TEXT NOT NULL CHECK (visibility IN ('public', 'invite')),
    topic TEXT NOT NULL DEFAULT '',
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    room_id INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('owner', 'moderator', 'member')),
    muted_until INTEGER,
    joined INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX IF NOT EXISTS members_user ON members(user_id);
CREATE TABLE IF NOT EXISTS bans (
    room_id INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    by_user INTEGER NOT NULL,
    reason TEXT NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE TABLE IF NOT EXISTS invites (
    room_id INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    by_user INTEGER NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE TABLE IF NOT EXISTS files (
    hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    mime TEXT NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL,
    uploader INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts INTEGER NOT NULL,
    sender INTEGER NOT NULL REFERENCES users(id),
    room_id INTEGER REFERENCES rooms(id) ON DELETE CASCADE,
    recipient INTEGER REFERENCES users(id),
    text TEXT NOT NULL,
    file_hash TEXT REFERENCES files(hash),
    CHECK ((room_id IS NULL) <> (recipient IS NULL))
);
CREATE INDEX IF NOT EXISTS messages_room ON messages(room_id, id);
CREATE INDEX IF NOT EXISTS messages_dm ON messages(recipient, sender, id);
CREATE INDEX IF NOT EXISTS messages_sender ON messages(sender, id);
CREATE INDEX IF NOT EXISTS messages_dm_sent ON messages(sender, id, recipient)
    WHERE recipient IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_dm_received ON messages(recipient, id, sender)
    WHERE recipient IS NOT NULL;
CREATE TABLE IF NOT EXISTS pending_dms (
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, message_id)
);
"""

_MESSAGE_SELECT: Final = """
SELECT m.id, m.ts, s.nick, m.text, r.name, u.nick, f.hash, f.name, f.size, f.mime
FROM messages m
JOIN users s ON s.id = m.sender
LEFT JOIN rooms r ON r.id = m.room_id
LEFT JOIN users u ON u.id = m.recipient
LEFT JOIN files f ON f.hash = m.file_hash
"""


def _message(row: Sequence[Any]) -> Message:
    file = FileInfo(row[6], row[7], row[8], row[9]) if row[6] is not None else None
    return Message(row[0], row[1], row[2], row[3], room=row[4], recipient=row[5], file=file)


def _switch_to_wal(db: sqlite3.Connection, attempts: int = 50) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another connection switches it too.

    Two connections switching a new file at the same moment can deadlock on the lock
    upgrade; SQLite then fails one of them at once ("database is locked") without waiting
    for the busy timeout. The switch is done once per file, so a short retry settles it.
    """
    for attempt in range(attempts):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.02 * (attempt + 1))


# The partners of a user's last 1000 DMs each way (so a login costs O(1), however many DMs
# a user has), through the indexes messages_dm_sent / messages_dm_received.
_DM_PARTNERS: Final = """
SELECT u.id, u.nick FROM (
    SELECT recipient AS other, id FROM (
        SELECT recipient, id FROM messages WHERE sender=? AND recipient IS NOT NULL
         ORDER BY id DESC LIMIT 1000) s
    UNION ALL
    SELECT sender AS other, id FROM (
        SELECT sender, id FROM messages WHERE recipient=?
         ORDER BY id DESC LIMIT 1000) r
) d JOIN users u ON u.id=d.other WHERE d.other<>?
GROUP BY u.id, u.nick ORDER BY MAX(d.id) DESC LIMIT ?
"""


class SQLiteStore:
    """:class:`~netstack.servers.chat.store.Store` on a SQLite file.

    Args:
        path: database file (created with its directory if missing), or ``:memory:``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="chat-sqlite"
        )
        self._db: sqlite3.Connection | None = None

    # ------------------------------------------------------------------ plumbing

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "open() first"
        return self._db

    def _open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # autocommit (BEGIN explicitly); wait up to 5 s for other connections' locks.
        db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        _switch_to_wal(db)
        db.execute("PRAGMA synchronous=NORMAL")  # durable across app crashes in WAL mode
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        self._db = db

    async def open(self) -> None:
        await self._run(self._open)

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self.db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def _one(self, sql: str, *args: Any) -> Any:
        return self.db.execute(sql, args).fetchone()

    def _all(self, sql: str, *args: Any) -> list[Any]:
        return self.db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ accounts

    async def create_user(self, nick: str, password_hash: str, now: int) -> User:
        def do() -> User:
            try:
                cur = self.db.execute(
                    "INSERT INTO users (nick, nick_key, password_hash, created) VALUES (?,?,?,?)",
                    (nick, nick.lower(), password_hash, now),
                )
            except sqlite3.IntegrityError as exc:
                raise StoreConflict(f"nick {nick!r} is taken") from exc
            return User(cast(int, cur.lastrowid), nick, password_hash)

        return await self._run(do)

    async def get_user(self, nick: str) -> User | None:
        row = await self._run(
            self._one, "SELECT id, nick, password_hash FROM users WHERE nick_key=?", nick.lower()
        )
        return User(*row) if row else None

    async def get_user_by_id(self, user_id: int) -> User | None:
        row = await self._run(
            self._one, "SELECT id, nick, password_hash FROM users WHERE id=?", user_id
        )
        return User(*row) if row else None

    async def create_session(self, token_hash: str, user_id: int, expires: int, now: int) -> None:
        def do(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM sessions WHERE expires<=?", (now,))
            db.execute(
                "INSERT INTO sessions (token_hash, user_id, expires) VALUES (?,?,?)",
                (token_hash, user_id, expires),
            )

        await self._run(self._transaction, do)

    async def session_user(self, token_hash: str, now: int) -> User | None:
        row = await self._run(
            self._one,
            "SELECT u.id, u.nick, u.password_hash FROM sessions s JOIN users u ON u.id=s.user_id"
            " WHERE s.token_hash=? AND s.expires>?",
            token_hash,
            now,
        )
        return User(*row) if row else None

    async def delete_session(self, token_hash: str) -> None:
        await self._run(self._one, "DELETE FROM sessions WHERE token_hash=?", token_hash)

    # ------------------------------------------------------------------ rooms

    async def create_room(
        self, name: str, visibility: Visibility, topic: str, owner_id: int, now: int
    ) -> Room:
        def do(db: sqlite3.Connection) -> Room:
            cur = db.execute(
                "INSERT INTO rooms (name, visibility, topic, created) VALUES (?,?,?,?)",
                (name, visibility, topic, now),
            )
            room_id = cast(int, cur.lastrowid)
            db.execute(
                "INSERT INTO members (room_id, user_id, role, joined) VALUES (?,?,?,?)",
                (room_id, owner_id, "owner", now),
            )
            return Room(room_id, name, visibility, topic)

        try:
            return await self._run(self._transaction, do)
        except sqlite3.IntegrityError as exc:
            raise StoreConflict(f"room {name!r} exists") from exc

    async def get_room(self, name: str) -> Room | None:
        row = await self._run(
            self._one, "SELECT id, name, visibility, topic FROM rooms WHERE name=?", name
        )
        return Room(*row) if row else None

    async def set_topic(self, room_id: int, topic: str) -> None:
        await self._run(self._one, "UPDATE rooms SET topic=? WHERE id=?", topic, room_id)

    async def list_rooms(self, user_id: int) -> list[RoomSummary]:
        rows = await self._run(
            self._all,
            "SELECT r.id, r.name, r.visibility, r.topic,"
            " (SELECT COUNT(*) FROM members c WHERE c.room_id=r.id), m.role"
            " FROM rooms r LEFT JOIN members m ON m.room_id=r.id AND m.user_id=?"
            " WHERE r.visibility='public' OR m.user_id IS NOT NULL ORDER BY r.name",
            user_id,
        )
        return [RoomSummary(Room(*row[:4]), row[4], row[5]) for row in rows]

    async def user_rooms(self, user_id: int) -> list[str]:
        rows = await self._run(
            self._all,
            "SELECT r.name FROM members m JOIN rooms r ON r.id=m.room_id WHERE m.user_id=?"
            " ORDER BY r.name",
            user_id,
        )
        return [row[0] for row in rows]

    _MEMBER: Final = (
        "SELECT m.user_id, u.nick, m.role, m.muted_until FROM members m"
        " JOIN users u ON u.id=m.user_id"
    )

    async def get_member(self, room_id: int, user_id: int) -> Member | None:
        row = await self._run(
            self._one, self._MEMBER + " WHERE m.room_id=? AND m.user_id=?", room_id, user_id
        )
        return Member(*row) if row else None

    async def members(self, room_id: int) -> list[Member]:
        rows = await self._run(
            self._all, self._MEMBER + " WHERE m.room_id=? ORDER BY u.nick_key", room_id
        )
        return [Member(*row) for row in rows]

    async def add_member(self, room_id: int, user_id: int, role: Role, now: int) -> None:
        def do(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR IGNORE INTO members (room_id, user_id, role, joined) VALUES (?,?,?,?)",
                (room_id, user_id, role, now),
            )
            db.execute("DELETE FROM invites WHERE room_id=? AND user_id=?", (room_id, user_id))

        await self._run(self._transaction, do)

    async def remove_member(self, room_id: int, user_id: int) -> bool:
        def do() -> bool:
            cur = self.db.execute(
                "DELETE FROM members WHERE room_id=? AND user_id=?", (room_id, user_id)
            )
            return cur.rowcount > 0

        return await self._run(do)

    async def set_role(self, room_id: int, user_id: int, role: Role) -> None:
        await self._run(
            self._one,
            "UPDATE members SET role=? WHERE room_id=? AND user_id=?",
            role,
            room_id,
            user_id,
        )

    async def set_mute(self, room_id: int, user_id: int, until: int | None) -> None:
        await self._run(
            self._one,
            "UPDATE members SET muted_until=? WHERE room_id=? AND user_id=?",
            until,
            room_id,
            user_id,
        )

    async def add_ban(self, room_id: int, user_id: int, by: int, reason: str, now: int) -> None:
        await self._run(
            self._one,
            "INSERT OR REPLACE INTO bans (room_id, user_id, by_user, reason, created)"
            " VALUES (?,?,?,?,?)",
            room_id,
            user_id,
            by,
            reason,
            now,
        )

    async def remove_ban(self, room_id: int, user_id: int) -> bool:
        def do() -> bool:
            cur = self.db.execute(
                "DELETE FROM bans WHERE room_id=? AND user_id=?", (room_id, user_id)
            )
            return cur.rowcount > 0

        return await self._run(do)

    async def is_banned(self, room_id: int, user_id: int) -> bool:
        row = await self._run(
            self._one, "SELECT 1 FROM bans WHERE room_id=? AND user_id=?", room_id, user_id
        )
        return row is not None

    async def add_invite(self, room_id: int, user_id: int, by: int, now: int) -> None:
        await self._run(
            self._one,
            "INSERT OR REPLACE INTO invites (room_id, user_id, by_user, created) VALUES (?,?,?,?)",
            room_id,
            user_id,
            by,
            now,
        )

    async def has_invite(self, room_id: int, user_id: int) -> bool:
        row = await self._run(
            self._one, "SELECT 1 FROM invites WHERE room_id=? AND user_id=?", room_id, user_id
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
        def do(db: sqlite3.Connection) -> Message:
            cur = db.execute(
                "INSERT INTO messages (ts, sender, room_id, recipient, text, file_hash)"
                " VALUES (?,?,?,?,?,?)",
                (
                    now,
                    sender.id,
                    room.id if room else None,
                    recipient.id if recipient else None,
                    text,
                    file.hash if file else None,
                ),
            )
            msg_id = cast(int, cur.lastrowid)
            if pending and recipient is not None:
                db.execute(
                    "INSERT INTO pending_dms (user_id, message_id) VALUES (?,?)",
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

        return await self._run(self._transaction, do)

    async def room_history(self, room: Room, before: int | None, limit: int) -> list[Message]:
        rows = await self._run(
            self._all,
            _MESSAGE_SELECT + " WHERE m.room_id=? AND m.id<? ORDER BY m.id DESC LIMIT ?",
            room.id,
            before if before is not None else 2**62,
            limit,
        )
        return [_message(row) for row in reversed(rows)]

    async def dm_history(self, a: User, b: User, before: int | None, limit: int) -> list[Message]:
        rows = await self._run(
            self._all,
            _MESSAGE_SELECT
            + " WHERE ((m.sender=? AND m.recipient=?) OR (m.sender=? AND m.recipient=?))"
            " AND m.id<? ORDER BY m.id DESC LIMIT ?",
            a.id,
            b.id,
            b.id,
            a.id,
            before if before is not None else 2**62,
            limit,
        )
        return [_message(row) for row in reversed(rows)]

    async def dm_partners(self, user_id: int, limit: int) -> list[tuple[int, str]]:
        rows = await self._run(self._all, _DM_PARTNERS, user_id, user_id, user_id, limit)
        return [(row[0], row[1]) for row in rows]

    async def backfill(self, user_id: int, since: int, limit: int) -> list[Message]:
        rows = await self._run(
            self._all,
            _MESSAGE_SELECT
            + " WHERE m.id>? AND (m.recipient=? OR (m.sender=? AND m.room_id IS NULL)"
            " OR m.room_id IN (SELECT room_id FROM members WHERE user_id=?))"
            " ORDER BY m.id LIMIT ?",
            since,
            user_id,
            user_id,
            user_id,
            limit,
        )
        return [_message(row) for row in rows]

    async def last_message_id(self) -> int:
        row = await self._run(self._one, "SELECT COALESCE(MAX(id), 0) FROM messages")
        return cast(int, row[0])

    async def pending(self, user_id: int, limit: int) -> list[Message]:
        rows = await self._run(
            self._all,
            _MESSAGE_SELECT + " JOIN pending_dms p ON p.message_id=m.id WHERE p.user_id=?"
            " ORDER BY m.id LIMIT ?",
            user_id,
            limit,
        )
        return [_message(row) for row in rows]

    async def clear_pending(self, user_id: int, up_to: int) -> None:
        await self._run(
            self._one,
            "DELETE FROM pending_dms WHERE user_id=? AND message_id<=?",
            user_id,
            up_to,
        )

    # ------------------------------------------------------------------ files

    async def put_file(self, info: FileInfo, data: bytes, uploader_id: int, now: int) -> None:
        await self._run(
            self._one,
            "INSERT OR IGNORE INTO files (hash, name, mime, size, data, uploader, created)"
            " VALUES (?,?,?,?,?,?,?)",
            info.hash,
            info.name,
            info.mime,
            info.size,
            data,
            uploader_id,
            now,
        )

    async def file_info(self, file_hash: str) -> FileInfo | None:
        row = await self._run(
            self._one, "SELECT hash, name, size, mime FROM files WHERE hash=?", file_hash
        )
        return FileInfo(*row) if row else None

    async def get_file(self, file_hash: str) -> tuple[FileInfo, bytes] | None:
        row = await self._run(
            self._one, "SELECT hash, name, size, mime, data FROM files WHERE hash=?", file_hash
        )
        return (FileInfo(*row[:4]), bytes(row[4])) if row else None
