"""Fan-out: deliver one encoded event to every subscriber of a topic.

Topics are ``room:<name>``, ``user:<id>`` (every session of one user) and
``presence:<name>`` (the sessions watching a room's online/offline changes). Events are
encoded once by the publisher and handed over as text, so a broadcast to N clients costs
one ``json.dumps``, and a Redis implementation (several chat instances sharing rooms) can
pass the same text through ``PUBLISH`` unchanged. :class:`LocalFanout` is the in-process
implementation; :class:`~.scaleout.RedisFanout` passes events between instances over
Redis and calls the same ``deliver`` on each instance's subscribers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeAlias

UsersHandler: TypeAlias = Callable[[list[int]], Awaitable[None]]


class Subscriber(Protocol):
    def deliver(self, text: str) -> None:
        """Queue one encoded event for the client; must not block."""


class Fanout(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def subscribe(self, topic: str, subscriber: Subscriber) -> None: ...

    def unsubscribe(self, topic: str, subscriber: Subscriber) -> None: ...

    def publish(self, topic: str, text: str) -> None:
        """Deliver ``text`` to every subscriber of ``topic`` (on every instance)."""


class Presence(Protocol):
    """Who is connected, counted in connections per user across every instance.

    The session logic calls :meth:`connect` / :meth:`disconnect` once per logged-in
    connection and announces ``online`` / ``offline`` on the first and last one. With
    several instances (Redis) the counts must be shared, or a DM to a user connected to
    another instance would be queued as if they were offline. The methods are coroutines:
    a shared implementation asks a server.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def connect(self, user_id: int) -> bool:
        """Count one more connection; ``True`` if it is the user's first."""

    async def disconnect(self, user_id: int) -> bool:
        """Count one connection less; ``True`` if it was the user's last."""

    async def is_online(self, user_id: int) -> bool: ...

    async def online(self, user_ids: Sequence[int]) -> set[int]:
        """The ones of ``user_ids`` that are connected (one round trip for a room)."""

    def on_expired(self, handler: UsersHandler) -> None:
        """Have ``handler(user_ids)`` called with users who went offline without a
        :meth:`disconnect`: their instance died (see :class:`~.scaleout.RedisPresence`)."""

    def on_returned(self, handler: UsersHandler) -> None:
        """Have ``handler(user_ids)`` called with this instance's users when they may have
        been announced offline although connected (this instance was taken for dead)."""


class LocalPresence:
    """Presence within one process (which cannot outlive its own users)."""

    def __init__(self) -> None:
        self._connections: dict[int, int] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def connect(self, user_id: int) -> bool:
        count = self._connections.get(user_id, 0) + 1
        self._connections[user_id] = count
        return count == 1

    async def disconnect(self, user_id: int) -> bool:
        count = self._connections.get(user_id, 0) - 1
        if count > 0:
            self._connections[user_id] = count
            return False
        self._connections.pop(user_id, None)
        return count == 0

    async def is_online(self, user_id: int) -> bool:
        return user_id in self._connections

    async def online(self, user_ids: Sequence[int]) -> set[int]:
        return {uid for uid in user_ids if uid in self._connections}

    def on_expired(self, handler: UsersHandler) -> None:
        return None

    def on_returned(self, handler: UsersHandler) -> None:
        return None


class LoginThrottle(Protocol):
    """Failed logins per nick, so password guessing is slowed down everywhere.

    Shared across instances with Redis: otherwise a guesser spreading attempts over N
    instances would get N times the budget.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def blocked(self, key: str) -> float | None:
        """Seconds until logins for ``key`` are allowed again; ``None``: allowed now."""

    async def failed(self, key: str) -> None:
        """Count one failed login for ``key``."""

    async def succeeded(self, key: str) -> None:
        """Forget the failures of ``key``."""


class LocalThrottle:
    """Login throttle within one process: ``max_failures`` per ``window`` seconds, the
    window starting at the first failure.

    Args:
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self, clock: Callable[[], float], *, max_failures: int = 10, window: float = 300.0
    ) -> None:
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (count, first time)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def blocked(self, key: str) -> float | None:
        now = self.clock()
        count, first = self._failures.get(key, (0, now))
        if now - first >= self.window:
            del self._failures[key]
        elif count >= self.max_failures:
            return self.window - (now - first)
        return None

    async def failed(self, key: str) -> None:
        now = self.clock()
        if len(self._failures) > 100_000:  # bound the table: forget windows that have passed
            self._failures = {k: v for k, v in self._failures.items() if now - v[1] < self.window}
        count, first = self._failures.get(key, (0, now))
        self._failures[key] = (count + 1, first)

    async def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)


# Subscription changes for a user's sessions on every instance (see service.py).
CONTROL_TOPIC = "control"


def room_topic(name: str) -> str:
    return f"room:{name}"


def user_topic(user_id: int) -> str:
    return f"user:{user_id}"


def watch_topic(room: str) -> str:
    """Sessions watching a room's online/offline changes (after ``who``)."""
    return f"presence:{room}"


class LocalFanout:
    """Fan-out within one process."""

    def __init__(self) -> None:
        self._topics: defaultdict[str, set[Subscriber]] = defaultdict(set)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._topics.clear()

    def subscribe(self, topic: str, subscriber: Subscriber) -> None:
        self._topics[topic].add(subscriber)

    def unsubscribe(self, topic: str, subscriber: Subscriber) -> None:
        subs = self._topics.get(topic)
        if subs is not None:
            subs.discard(subscriber)
            if not subs:
                del self._topics[topic]

    def subscribers(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

    def publish(self, topic: str, text: str) -> None:
        # A copy: a delivery may drop a slow subscriber, which unsubscribes it.
        for subscriber in list(self._topics.get(topic, ())):
            subscriber.deliver(text)
