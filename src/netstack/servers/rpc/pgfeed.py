"""WatchNotes across instances on PostgreSQL: a trigger NOTIFYs, each instance LISTENs.

Several ``netstack rpc`` instances on one database each have their own watchers; a change
made through any of them must reach all of them. The mechanism:

* **Publish, in the writer's transaction.** An ``AFTER INSERT OR UPDATE OR DELETE`` row
  trigger on ``notes`` (:data:`TRIGGER_SQL`) calls ``pg_notify`` with the change. A
  notification is part of its transaction: it is delivered after the commit, and never
  when the transaction rolls back. Every writer is covered, ``psql`` included.
* **One channel per schema**: ``notes:<schema>`` (``notes:<md5 of schema>`` when that
  is longer than PostgreSQL's 63-byte channel names); notifications are already per
  database, so two deployments in two schemas (or databases) never hear each other.
* **Small payloads, never truncated.** The payload is JSON: kind (``I``/``U``/``D``), note
  id, version and the note's other fields, ``{"k":"U","id":7,"v":3,"n":[title, body,
  created, updated]}``. NOTIFY payloads must stay under 8000 bytes: a change whose JSON
  would not is written to the ``note_changes`` table (same transaction) and the payload
  carries only ``{"k","id","v","seq"}``; a listener reads the full change back by
  ``seq``. That row holds the change itself, not the note's current state, so a later
  update or a delete cannot change what is delivered (a deleted note has no row left to
  fetch). Entries older than :data:`CHANGE_LOG_RETENTION` are pruned by the next
  oversized change. Inlining the note when it fits spares every instance one query per
  change; only notes of several KB cost a read-back.
* **One listener per instance**: :class:`PostgresChangeFeed` holds one dedicated psycopg
  async connection (outside the pool, autocommit, TCP keepalives on, so a dead peer is
  noticed), runs ``LISTEN`` on it and hands each change to the service, which publishes
  it to its :class:`~.watch.Hub`. The service publishes nothing itself on PostgreSQL:
  every delivery, including an instance's own changes, comes through NOTIFY, so a
  watcher sees each change exactly once.
* **Order.** PostgreSQL delivers notifications in commit order, and two changes of one
  note commit in version order (each update and delete locks the row), so one note's
  changes arrive in order. The listener handles notifications one at a time (an
  oversized change is read back before the next one is handled).

**When the LISTEN connection drops** (server restart, ``pg_terminate_backend``, network),
notifications sent meanwhile are lost for good: PostgreSQL does not queue them for a
listener that is gone. Replaying from a change log would need every change logged and a
commit-ordered position to resume from (sequence values are not commit-ordered), so we do
the honest thing instead: every open WatchNotes stream ends with ``UNAVAILABLE`` ("watch
interrupted ... re-read and watch again"), new WatchNotes calls get ``UNAVAILABLE``
until the listener is back, and the listener reconnects with jittered exponential backoff
(:data:`RECONNECT_MIN` doubling to :data:`RECONNECT_MAX`). A client re-reads what it
shows (``ListNotes``) and watches again; no watcher ever misses a change silently. The
same happens when an oversized change cannot be read back (its log entry was pruned, or
the database is unreachable) or cannot be sent (a bug, logged with its traceback).
Notifications on our channel that are not in our format (someone's manual ``NOTIFY``)
are logged and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from typing import TYPE_CHECKING, Any, Final

from netstack.servers.pg import CONNECT_TIMEOUT, one_line
from netstack.servers.rpc.store import ChangeKind, ChangeSink, Note, StoreUnavailable

if TYPE_CHECKING:
    from psycopg import AsyncConnection

    from netstack.servers.rpc.postgres import PostgresNoteStore

logger = logging.getLogger(__name__)

# PostgreSQL's limit on a NOTIFY payload (default build): "shorter than 8000 bytes".
MAX_PAYLOAD_BYTES: Final = 8000
# An oversized change waits this long in note_changes for the listeners to read it back;
# a listener further behind than this has a bigger problem, and ends its watchers.
CHANGE_LOG_RETENTION: Final = "10 minutes"
# Reconnect backoff of the LISTEN connection: a restarted server is not stormed, and a
# short blip costs watchers a tenth of a second.
RECONNECT_MIN: Final = 0.1  # seconds
RECONNECT_MAX: Final = 5.0
# libpq TCP keepalives on the LISTEN connection: an idle listener whose server vanished
# without a FIN (host down, partition) notices in about 10 + 3 * 5 = 25 s.
KEEPALIVES_IDLE: Final = 10  # seconds
KEEPALIVES_INTERVAL: Final = 5
KEEPALIVES_COUNT: Final = 3
APPLICATION_NAME: Final = "netstack-notes-listen"


def _channel_sql(schema: str) -> str:
    """SQL for the channel of the notes table in ``schema`` (an SQL expression).

    The trigger and the listener both use it, so they cannot disagree.
    """
    return (
        f"CASE WHEN octet_length('notes:' || {schema}) <= 63 THEN 'notes:' || {schema}"
        f" ELSE 'notes:' || md5({schema}) END"
    )


CHANGE_LOG_SQL: Final = """
CREATE TABLE IF NOT EXISTS note_changes (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL DEFAULT now(),
    payload TEXT NOT NULL
)
"""

# Every name is qualified through TG_TABLE_SCHEMA or lives in pg_catalog, so the trigger
# works whatever the writing session's search_path is.
TRIGGER_FUNCTION_SQL: Final = f"""
CREATE OR REPLACE FUNCTION notes_notify() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    note RECORD;
    payload TEXT;
    entry BIGINT;
BEGIN
    IF TG_OP = 'DELETE' THEN note := OLD; ELSE note := NEW; END IF;
    payload := json_build_object(
        'k', left(TG_OP, 1), 'id', note.id, 'v', note.version,
        'n', json_build_array(note.title, note.body, note.created, note.updated))::text;
    IF octet_length(payload) >= {MAX_PAYLOAD_BYTES} THEN
        EXECUTE format('DELETE FROM %I.note_changes'
                       ' WHERE at < now() - interval ''{CHANGE_LOG_RETENTION}''',
                       TG_TABLE_SCHEMA);
        EXECUTE format('INSERT INTO %I.note_changes (payload) VALUES ($1) RETURNING seq',
                       TG_TABLE_SCHEMA)
            INTO entry USING payload;
        payload := json_build_object(
            'k', left(TG_OP, 1), 'id', note.id, 'v', note.version, 'seq', entry)::text;
    END IF;
    PERFORM pg_notify({_channel_sql("TG_TABLE_SCHEMA")}, payload);
    RETURN NULL;
END
$fn$
"""

TRIGGER_SQL: Final = """
DO $do$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_trigger
                   WHERE tgname = 'notes_notify' AND tgrelid = 'notes'::regclass) THEN
        CREATE TRIGGER notes_notify AFTER INSERT OR UPDATE OR DELETE ON notes
            FOR EACH ROW EXECUTE FUNCTION notes_notify();
    END IF;
END $do$
"""

# The channel of the notes table the store's connections see (same URL, same search_path).
CHANNEL_QUERY: Final = (
    f"SELECT {_channel_sql('n.nspname')} FROM pg_class c"
    " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = 'notes'::regclass"
)

_KINDS: Final[dict[str, ChangeKind]] = {"I": "created", "U": "updated", "D": "deleted"}


class ChangeLost(Exception):
    """A change was announced but cannot be delivered (its log entry is gone)."""


class BadNotification(Exception):
    """A notification on our channel that is not one of ours (someone else's NOTIFY)."""


def parse(payload: str) -> tuple[ChangeKind, Note | int]:
    """A notification payload: (kind, the note) or (kind, the ``note_changes`` seq).

    Raises:
        BadNotification: the payload is not a change in our format.
    """
    try:
        change = json.loads(payload)
        kind = _KINDS[change["k"]]
        if "seq" in change:
            seq = change["seq"]
            if not isinstance(seq, int):
                raise TypeError("seq")
            return kind, seq
        title, body, created, updated = change["n"]
        note = Note(change["id"], title, body, created, updated, change["v"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadNotification(f"not a notes change: {payload[:80]!r}") from exc
    if not (
        isinstance(note.id, int)
        and isinstance(note.version, int)
        and isinstance(note.title, str)
        and isinstance(note.body, str)
        and isinstance(note.created, int)
        and isinstance(note.updated, int)
    ):
        raise BadNotification(f"not a notes change: {payload[:80]!r}")
    return kind, note


class PostgresChangeFeed:
    """The LISTEN side of the mechanism above, for one instance.

    Args:
        store: the (opened) store: its URL for the LISTEN connection, its pool to read
            oversized changes back.
    """

    def __init__(self, store: PostgresNoteStore) -> None:
        self.store = store
        self.backend_pid: int | None = None  # of the LISTEN connection, while connected
        self.reconnects = 0
        self._sink: ChangeSink | None = None
        self._task: asyncio.Task[None] | None = None
        self._conn: AsyncConnection[tuple[Any, ...]] | None = None  # the LISTEN connection

    async def start(self, sink: ChangeSink) -> None:
        """LISTEN, then deliver to ``sink`` in a task until :meth:`close`.

        Raises:
            StoreUnavailable: the LISTEN connection cannot be made.
        """
        self._sink = sink
        conn = await self._connect()
        self._task = asyncio.create_task(self._run(conn), name="notes-change-feed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._conn is not None:  # the task may have been cancelled before it began
            await self._conn.close()
            self._conn = None
        self.backend_pid = None

    async def _connect(self) -> AsyncConnection[tuple[Any, ...]]:
        import psycopg
        from psycopg import sql

        try:
            conn = await psycopg.AsyncConnection.connect(
                self.store.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                application_name=APPLICATION_NAME,
                keepalives=1,
                keepalives_idle=KEEPALIVES_IDLE,
                keepalives_interval=KEEPALIVES_INTERVAL,
                keepalives_count=KEEPALIVES_COUNT,
            )
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {one_line(exc)}") from exc
        try:
            row = await (await conn.execute(CHANNEL_QUERY)).fetchone()
            assert row is not None
            channel: str = row[0]
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException as exc:  # cancelled too: never leave the connection open
            await conn.close()
            if isinstance(exc, psycopg.Error):
                raise StoreUnavailable(f"cannot LISTEN on PostgreSQL: {one_line(exc)}") from exc
            raise
        self._conn = conn
        self.backend_pid = conn.info.backend_pid
        logger.debug("listening on %s (backend %d)", channel, self.backend_pid)
        return conn

    async def _run(self, conn: AsyncConnection[tuple[Any, ...]]) -> None:
        import psycopg

        assert self._sink is not None
        while True:
            try:
                async with conn, contextlib.aclosing(conn.notifies()) as notifies:
                    async for notify in notifies:
                        await self._deliver(notify.payload)
                reason = "the connection closed"  # pragma: no cover - notifies() never ends
            except (psycopg.Error, StoreUnavailable, ChangeLost) as exc:
                reason = one_line(exc)
            except Exception as exc:  # a bug: still never leave the watchers silently stale
                logger.exception("notes change feed failed")
                reason = f"internal error: {type(exc).__name__}"
            self._conn = None
            self.backend_pid = None
            logger.warning("notes change feed interrupted (%s): reconnecting", reason)
            self._sink.interrupted(reason)
            conn = await self._reconnect()
            self.reconnects += 1
            logger.info("notes change feed listening again")
            self._sink.resumed()

    async def _reconnect(self) -> AsyncConnection[tuple[Any, ...]]:
        """Connect and LISTEN again, retrying with jittered exponential backoff."""
        delay = RECONNECT_MIN
        while True:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter
            try:
                return await self._connect()
            except StoreUnavailable as exc:
                logger.warning("notes change feed: %s", exc)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _deliver(self, payload: str) -> None:
        assert self._sink is not None
        try:
            kind, found = parse(payload)
        except BadNotification as exc:
            logger.warning("notes change feed: ignored %s", exc)
            return
        if isinstance(found, int):
            found = await self._read_back(found)
        self._sink.changed(kind, found)

    async def _read_back(self, seq: int) -> Note:
        """The oversized change ``seq`` from ``note_changes``.

        Raises:
            ChangeLost: the entry is gone (pruned).
            StoreUnavailable: the database cannot be reached.
        """
        rows = await self.store._all("SELECT payload FROM note_changes WHERE seq = %s", (seq,))
        if not rows:
            raise ChangeLost(f"change {seq} is no longer in note_changes")
        try:
            _, note = parse(rows[0][0])
        except BadNotification as exc:
            raise ChangeLost(f"change {seq} is unreadable: {exc}") from exc
        if not isinstance(note, Note):
            raise ChangeLost(f"change {seq} is unreadable")
        return note
