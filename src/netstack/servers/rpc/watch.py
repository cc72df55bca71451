"""In-process fan-out of note changes to WatchNotes subscribers, with bounded queues.

Each subscriber has its own queue of at most ``backlog`` events. ``publish`` never blocks
and never grows a queue past that bound: a subscriber that falls behind is ended (its
queue dropped, :class:`SubscriptionEnded` raised from its next ``get``) so that one slow
reader costs at most ``backlog`` events of memory and never slows the writers.

A hub fed from a shared database (:mod:`.pgfeed`) can be :meth:`Hub.suspend`-ed when its
feed loses the database: changes may then be missed, so every subscription ends
(reason ``"interrupted"``) and new subscribes are refused until :meth:`Hub.resume`.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
EndReason = Literal["overflow", "closed", "interrupted"]


class TooManySubscribers(Exception):
    """The hub already has ``max_subscribers`` subscribers."""


class SubscriptionEnded(Exception):
    """The subscription is over; ``reason`` says why."""

    def __init__(self, reason: EndReason, message: str) -> None:
        super().__init__(message)
        self.reason: EndReason = reason


class Subscription(Generic[T]):
    """One subscriber's bounded queue. Create through :meth:`Hub.subscribe`."""

    def __init__(self, backlog: int) -> None:
        self._backlog = backlog
        self._queue: collections.deque[T] = collections.deque()
        self._wakeup = asyncio.Event()
        self._ended: SubscriptionEnded | None = None

    def _push(self, item: T) -> None:
        if self._ended is not None:
            return
        if len(self._queue) >= self._backlog:
            self._end(
                SubscriptionEnded(
                    "overflow",
                    f"subscriber fell more than {self._backlog} events behind; subscribe again",
                )
            )
            return
        self._queue.append(item)
        self._wakeup.set()

    def _end(self, ended: SubscriptionEnded) -> None:
        if self._ended is None:
            self._ended = ended
            self._queue.clear()
            self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def get(self) -> T:
        """The next event, waiting for one.

        Raises:
            SubscriptionEnded: the subscriber fell behind or the hub closed.
        """
        while True:
            if self._ended is not None:
                raise self._ended
            if self._queue:
                return self._queue.popleft()
            self._wakeup.clear()
            await self._wakeup.wait()


class Hub(Generic[T]):
    """Subscribers and the events published to all of them (one event loop)."""

    def __init__(self, *, backlog: int, max_subscribers: int) -> None:
        self.backlog = backlog
        self.max_subscribers = max_subscribers
        self._subscribers: set[Subscription[T]] = set()
        self.closed = False
        self.suspended: str | None = None  # why, while suspended

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscription[T]:
        """Raises TooManySubscribers or SubscriptionEnded (hub closed or suspended)."""
        if self.closed:
            raise SubscriptionEnded("closed", "the server is shutting down")
        if self.suspended is not None:
            raise SubscriptionEnded("interrupted", self.suspended)
        if len(self._subscribers) >= self.max_subscribers:
            raise TooManySubscribers(f"{self.max_subscribers} watchers already")
        sub: Subscription[T] = Subscription(self.backlog)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription[T]) -> None:
        self._subscribers.discard(sub)

    def publish(self, item: T) -> None:
        for sub in list(self._subscribers):
            sub._push(item)

    def close(self) -> None:
        """End every subscription (server shutdown); later subscribes fail."""
        self.closed = True
        for sub in list(self._subscribers):
            sub._end(SubscriptionEnded("closed", "the server is shutting down"))

    def suspend(self, message: str) -> None:
        """End every subscription with ``message`` and refuse new ones until :meth:`resume`
        (the hub's source may have missed events)."""
        if self.closed:
            return
        self.suspended = message
        for sub in list(self._subscribers):
            sub._end(SubscriptionEnded("interrupted", message))

    def resume(self) -> None:
        """Accept subscribers again: the source delivers every event from now on."""
        self.suspended = None
