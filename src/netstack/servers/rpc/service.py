"""The notes servicer: validation, deadlines, store calls, change events, status codes.

Every unary method runs through :func:`_unary`, the one place that turns an error into a
gRPC status (STYLE §3): :class:`InvalidArgument` -> INVALID_ARGUMENT, :class:`NotFound` ->
NOT_FOUND, :class:`~.store.VersionConflict` -> ABORTED, a store call that cannot finish
before the caller's deadline -> DEADLINE_EXCEEDED, a database failure -> UNAVAILABLE
(logged once with its traceback). The store call is bounded by the time the client has
left (``context.time_remaining()``), or by ``store_timeout`` without a client deadline;
when the bound passes the call is cancelled, which stops its database work.

Changes reach the watchers (:attr:`NotesService.hub`) from the service itself after each
successful write, or, when the store is shared by several instances, only from the
store's change feed (the service is its :class:`~.store.ChangeSink`; :mod:`.pgfeed`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from netstack.config import RPCLimits
from netstack.servers.rpc import paging
from netstack.servers.rpc._pb import notes_pb2 as pb
from netstack.servers.rpc._pb import notes_pb2_grpc as pb_grpc
from netstack.servers.rpc.store import (
    ChangeKind,
    Note,
    NoteStore,
    StoreUnavailable,
    VersionConflict,
)
from netstack.servers.rpc.watch import Hub, SubscriptionEnded, TooManySubscribers

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")

SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["Notes"].full_name  # "notes.v1.Notes"
_KIND: Final[dict[ChangeKind, pb.NoteEvent.Kind.ValueType]] = {
    "created": pb.NoteEvent.CREATED,
    "updated": pb.NoteEvent.UPDATED,
    "deleted": pb.NoteEvent.DELETED,
}


class InvalidArgument(Exception):
    """A request field is malformed; the message names it."""


class NotFound(Exception):
    """The request names a note that does not exist."""


def _timestamp(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def to_message(note: Note) -> pb.Note:
    return pb.Note(
        id=note.id,
        title=note.title,
        body=note.body,
        create_time=_timestamp(note.created),
        update_time=_timestamp(note.updated),
        version=note.version,
    )


def _unary(
    method: Callable[[Any, Req, Context], Awaitable[Resp]],
) -> Callable[[Any, Req, Context], Coroutine[Any, Any, Resp]]:
    """Map the errors of one unary method to status codes (the one place that does)."""

    @functools.wraps(method)
    async def wrapper(self: NotesService, request: Req, context: Context) -> Resp:
        try:
            return await method(self, request, context)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except VersionConflict as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the store call did not finish before the deadline",
            )
        except StoreUnavailable as exc:
            logger.error("store unavailable in %s: %s", method.__name__, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the database is unavailable")
        except Exception:  # a bug: log it once, tell the client nothing internal
            logger.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged by the server)")
        raise AssertionError("unreachable: abort() raises")  # pragma: no cover

    return wrapper


class NotesService(pb_grpc.NotesServicer):
    """``notes.v1.Notes`` on a :class:`~.store.NoteStore`.

    Args:
        store: an opened store.
        limits: field and page limits.
        store_timeout: bound on a store call when the client sets no deadline.
        clock: milliseconds since the epoch (tests pass their own).
        publish_locally: publish each change this service makes to its watchers; False
            when a change feed delivers every change instead (:meth:`changed`).
    """

    def __init__(
        self,
        store: NoteStore,
        *,
        limits: RPCLimits,
        store_timeout: float,
        clock: Callable[[], int] | None = None,
        publish_locally: bool = True,
    ) -> None:
        self.store = store
        self.publish_locally = publish_locally
        self.limits = limits
        self.store_timeout = store_timeout
        self.clock = clock or (lambda: time.time_ns() // 1_000_000)
        self.hub: Hub[pb.NoteEvent] = Hub(
            backlog=limits.max_watch_backlog, max_subscribers=limits.max_watchers
        )
        self.calls = 0  # for `netstack up`'s dashboard: calls/s

    # ------------------------------------------------------------------ helpers

    async def _store(self, context: Context, call: Awaitable[T]) -> T:
        """Await a store call within the caller's remaining time (or store_timeout)."""
        remaining = context.time_remaining()
        bound = self.store_timeout if remaining is None else min(remaining, self.store_timeout)
        async with asyncio.timeout(max(bound, 0.0)):
            return await call

    def _title(self, title: str) -> str:
        title = title.strip()
        if not title:
            raise InvalidArgument("title: must not be empty")
        if len(title) > self.limits.max_title_chars:
            raise InvalidArgument(
                f"title: {len(title)} characters, the limit is {self.limits.max_title_chars}"
            )
        if any(c in title for c in "\r\n"):
            raise InvalidArgument("title: must be one line")
        return title

    def _body(self, body: str) -> str:
        size = len(body.encode())
        if size > self.limits.max_note_bytes:
            raise InvalidArgument(f"body: {size} bytes, the limit is {self.limits.max_note_bytes}")
        return body

    @staticmethod
    def _id(note_id: int) -> int:
        if note_id <= 0:
            raise InvalidArgument(f"id: must be a positive note id, got {note_id}")
        return note_id

    def _page_size(self, size: int) -> int:
        if size < 0:
            raise InvalidArgument(f"page_size: must be >= 0, got {size}")
        return min(size or self.limits.default_page_size, self.limits.max_page_size)

    @staticmethod
    def _before(token: str, scope: str) -> int | None:
        if not token:
            return None
        try:
            return paging.decode(token, scope)
        except paging.BadPageToken as exc:
            raise InvalidArgument(str(exc)) from None

    @staticmethod
    def _next_token(notes: list[Note], size: int, scope: str) -> str:
        # One extra row was fetched: its presence says whether a next page exists.
        return paging.encode(notes[size - 1].id, scope) if len(notes) > size else ""

    def _publish(self, kind: ChangeKind, note: Note) -> None:
        if self.publish_locally:
            self.changed(kind, note)

    # ------------------------------------------------------------------ ChangeSink

    def changed(self, kind: ChangeKind, note: Note) -> None:
        """Publish a change to the watchers."""
        self.hub.publish(pb.NoteEvent(kind=_KIND[kind], note=to_message(note)))

    def interrupted(self, reason: str) -> None:
        """The change feed lost the database: end the watch streams, refuse new ones."""
        self.hub.suspend(
            f"watch interrupted, changes may have been missed ({reason}): re-read and watch again"
        )

    def resumed(self) -> None:
        self.hub.resume()

    # ------------------------------------------------------------------ methods

    @_unary
    async def CreateNote(self, request: pb.CreateNoteRequest, context: Context) -> pb.Note:
        self.calls += 1
        title, body = self._title(request.title), self._body(request.body)
        note = await self._store(context, self.store.create(title, body, self.clock()))
        self._publish("created", note)
        return to_message(note)

    @_unary
    async def GetNote(self, request: pb.GetNoteRequest, context: Context) -> pb.Note:
        self.calls += 1
        note_id = self._id(request.id)
        note = await self._store(context, self.store.get(note_id))
        if note is None:
            raise NotFound(f"note {note_id} does not exist")
        return to_message(note)

    @_unary
    async def ListNotes(
        self, request: pb.ListNotesRequest, context: Context
    ) -> pb.ListNotesResponse:
        self.calls += 1
        size = self._page_size(request.page_size)
        before = self._before(request.page_token, "list")
        notes = await self._store(context, self.store.page(before=before, limit=size + 1))
        return pb.ListNotesResponse(
            notes=[to_message(n) for n in notes[:size]],
            next_page_token=self._next_token(notes, size, "list"),
        )

    @_unary
    async def SearchNotes(
        self, request: pb.SearchNotesRequest, context: Context
    ) -> pb.SearchNotesResponse:
        self.calls += 1
        query = request.query.strip()
        if not query:
            raise InvalidArgument("query: must not be empty")
        if len(query) > self.limits.max_query_chars:
            raise InvalidArgument(
                f"query: {len(query)} characters, the limit is {self.limits.max_query_chars}"
            )
        size = self._page_size(request.page_size)
        scope = f"search:{query}"
        before = self._before(request.page_token, scope)
        notes = await self._store(context, self.store.search(query, before=before, limit=size + 1))
        return pb.SearchNotesResponse(
            notes=[to_message(n) for n in notes[:size]],
            next_page_token=self._next_token(notes, size, scope),
        )

    @_unary
    async def UpdateNote(self, request: pb.UpdateNoteRequest, context: Context) -> pb.Note:
        self.calls += 1
        note_id = self._id(request.id)
        title = self._title(request.title) if request.HasField("title") else None
        body = self._body(request.body) if request.HasField("body") else None
        if title is None and body is None:
            raise InvalidArgument("nothing to update: set title and/or body")
        if request.expected_version < 0:
            raise InvalidArgument(f"expected_version: must be >= 0, got {request.expected_version}")
        note = await self._store(
            context,
            self.store.update(
                note_id,
                title=title,
                body=body,
                expected_version=request.expected_version or None,
                now=self.clock(),
            ),
        )
        if note is None:
            raise NotFound(f"note {note_id} does not exist")
        self._publish("updated", note)
        return to_message(note)

    @_unary
    async def DeleteNote(
        self, request: pb.DeleteNoteRequest, context: Context
    ) -> pb.DeleteNoteResponse:
        self.calls += 1
        note_id = self._id(request.id)
        note = await self._store(context, self.store.delete(note_id))
        if note is None:
            raise NotFound(f"note {note_id} does not exist")
        self._publish("deleted", note)
        return pb.DeleteNoteResponse()

    async def WatchNotes(  # type: ignore[override]  # a coroutine writing with context.write
        self, request: pb.WatchNotesRequest, context: Context
    ) -> None:
        self.calls += 1
        try:
            sub = self.hub.subscribe()
        except TooManySubscribers as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"watch: {exc}")
        except SubscriptionEnded as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        try:
            # The subscription is live: a client that waits for these headers cannot miss
            # a change made after they arrive.
            await context.send_initial_metadata(())
            while True:
                try:
                    event = await sub.get()
                except SubscriptionEnded as exc:
                    code = (
                        grpc.StatusCode.RESOURCE_EXHAUSTED
                        if exc.reason == "overflow"
                        else grpc.StatusCode.UNAVAILABLE
                    )
                    if exc.reason == "overflow":
                        logger.warning("watch: dropped a slow subscriber (%s)", context.peer())
                    await context.abort(code, f"watch: {exc}")
                await context.write(event)
        finally:
            self.hub.unsubscribe(sub)
