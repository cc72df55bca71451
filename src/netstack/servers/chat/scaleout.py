"""Several chat instances serving the same rooms: fan-out and presence through Redis.

``netstack chat serve --redis redis://...`` (and a shared ``--db postgresql://...``) lets
any number of instances serve the same users; a client may connect to any of them.

Fan-out (:class:`RedisFanout`): every event is delivered to this instance's subscribers at
once (so a sender still sees its own ``message`` before the ``ack``) and published on one
Redis channel, ``PREFIX:events``, as ``INSTANCE\\nTOPIC\\nJSON`` (encoded events never
contain a raw newline). Every instance subscribes to that channel and hands what other
instances published to its local subscribers. One channel keeps the order of one
instance's events everywhere and needs no per-topic SUBSCRIBE (which would race with the
first events of a new topic); the cost is that every instance sees every event, fine for
the handful of instances a chat deployment runs. Publishing is pipelined by one writer
task, in order; if Redis is unreachable, events for other instances are dropped (logged),
local delivery goes on, and clients catch up with ``backfill`` since their last id.

Presence (:class:`RedisPresence`): each instance keeps ``PREFIX:presence:INSTANCE``, a hash
of user id -> connections on that instance, and its own entry in ``PREFIX:instances``
(a sorted set scored by expiry time). A heartbeat renews both every ``ttl / 3``; an
instance that crashes stops renewing, and after ``ttl`` its users no longer count as
online anywhere. Counting runs in Lua scripts, atomic against other instances, with
Redis's own clock (instances' clocks may differ). A crashed instance's users go offline
silently: no ``offline`` event is sent for them. Each heartbeat rewrites the instance's
hash from its own counts (the truth about its connections), so presence heals by itself
after Redis loses its data (a restart without persistence); one instance's presence calls
are serialised, so a heartbeat never races a count.

Login throttle (:class:`RedisThrottle`): failed logins per nick are counted in Redis,
so a guesser gets the same budget however many instances it spreads over. Still per
instance: flood control (per connection anyway).
Tested behind ``netstack balance`` in TCP mode and in HTTP (L7) mode, where the
balancer parses the WebSocket upgrade and then tunnels it
(tests/servers/chat/test_scaleout.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from netstack.errors import NetstackError
from netstack.servers.chat.fanout import LocalFanout

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

logger = logging.getLogger(__name__)

# Events waiting for Redis while it is unreachable; past this the oldest are dropped.
MAX_OUTBOX: Final = 100_000
RETRY_MIN: Final = 0.1
RETRY_MAX: Final = 5.0
CLOSE_FLUSH_TIMEOUT: Final = 2.0


class ScaleOutUnavailable(NetstackError):
    """Redis cannot be reached when the server starts."""


def _client(url: str) -> Redis:
    import redis.asyncio

    try:
        return redis.asyncio.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
    except ValueError as exc:  # a malformed URL
        raise ScaleOutUnavailable(f"bad Redis URL: {exc}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class RedisFanout(LocalFanout):
    """:class:`~.fanout.Fanout` across instances over one Redis pub/sub channel.

    Args:
        url: ``redis://[:password@]host:port/db`` (or ``rediss://``, ``unix://``).
        prefix: channel and key prefix (several deployments may share one Redis).
        instance: this instance's id (random by default).
    """

    def __init__(self, url: str, *, prefix: str = "netstack:chat", instance: str | None = None):
        super().__init__()
        self.url = url
        self.channel = f"{prefix}:events"
        self.instance = instance or secrets.token_hex(8)
        self._redis: Redis | None = None
        self._pubsub: PubSub | None = None
        self._outbox: collections.deque[str] = collections.deque()
        self._wake = asyncio.Event()
        self._flushed = asyncio.Event()  # set while the outbox is empty
        self._flushed.set()
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = 0  # events other instances never got (Redis unreachable)

    async def start(self) -> None:
        """Connect and subscribe; events published by others from now on arrive here.

        Raises:
            ScaleOutUnavailable: Redis cannot be reached.
        """
        import redis

        client = self._redis = _client(self.url)
        pubsub = self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
        except (redis.RedisError, OSError) as exc:
            await self._release()
            raise ScaleOutUnavailable(f"cannot reach Redis: {_one_line(exc)}") from exc
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read(), name="chat-redis-read"),
            loop.create_task(self._write(), name="chat-redis-write"),
        ]

    def publish(self, topic: str, text: str) -> None:
        super().publish(topic, text)  # this instance: now, in order
        if self._redis is None:
            return
        if len(self._outbox) >= MAX_OUTBOX:
            self._outbox.popleft()
            self.dropped += 1
        self._outbox.append(f"{self.instance}\n{topic}\n{text}")
        self._flushed.clear()
        self._wake.set()

    def _received(self, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        instance, _, rest = text.partition("\n")
        topic, sep, event = rest.partition("\n")
        if not sep:
            logger.warning("ignoring a malformed chat event on %s", self.channel)
            return
        if instance != self.instance:
            super().publish(topic, event)

    async def _read(self) -> None:
        import redis

        assert self._pubsub is not None
        delay = RETRY_MIN
        while True:
            try:
                message: Any = await self._pubsub.get_message(timeout=None)
                if message is not None and message["type"] == "message":
                    self._received(message["data"])
                delay = RETRY_MIN
            except (redis.RedisError, OSError) as exc:
                # redis-py reconnects and re-subscribes on the next call.
                logger.warning("chat fan-out: Redis read failed (%s); retrying", _one_line(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def _write(self) -> None:
        import redis

        assert self._redis is not None
        delay = RETRY_MIN
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                # Take the whole outbox: publish() appends to a fresh one meanwhile.
                batch, self._outbox = self._outbox, collections.deque()
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for item in batch:
                            pipe.publish(self.channel, item)
                        await pipe.execute()
                except (redis.RedisError, OSError) as exc:
                    logger.warning(
                        "chat fan-out: Redis publish failed (%s); retrying", _one_line(exc)
                    )
                    batch.extend(self._outbox)  # the failed batch first: order is kept
                    while len(batch) > MAX_OUTBOX:
                        batch.popleft()
                        self.dropped += 1
                    self._outbox = batch
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                delay = RETRY_MIN
            self._flushed.set()

    async def flush(self) -> None:
        """Wait until every event published so far has been handed to Redis."""
        await self._flushed.wait()

    async def close(self) -> None:
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                    await self.flush()  # e.g. the offline presence of our last users
            if self._outbox:
                self.dropped += len(self._outbox)
                logger.warning("chat fan-out: %d events not published", len(self._outbox))
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        await self._release()
        await super().close()

    async def _release(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
            self._pubsub = None
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None


# KEYS[1] instances zset, KEYS[2] this instance's hash; ARGV[1] ttl ms, ARGV[2] instance,
# ARGV[3] hash key prefix; then per script ARGV[4...]. _LIVE sums the live instances' counts.
_NOW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
_LIVE: Final = """
local function total(user)
    local sum = 0
    for _, inst in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
        sum = sum + tonumber(redis.call('HGET', ARGV[3] .. inst, user) or '0')
    end
    return sum
end
"""
_RENEW: Final = """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
"""
CONNECT_LUA: Final = (
    _NOW
    + _LIVE
    + _RENEW
    + """
redis.call('HINCRBY', KEYS[2], ARGV[4], 1)
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return total(ARGV[4])
"""
)
DISCONNECT_LUA: Final = (
    _NOW
    + _LIVE
    + """
local mine = tonumber(redis.call('HGET', KEYS[2], ARGV[4]) or '0')
if mine <= 0 then return -1 end
if mine == 1 then
    redis.call('HDEL', KEYS[2], ARGV[4])
else
    redis.call('HINCRBY', KEYS[2], ARGV[4], -1)
end
return total(ARGV[4])
"""
)
ONLINE_LUA: Final = (
    _NOW
    + _LIVE
    + """
local out = {}
for i = 4, #ARGV do
    out[#out + 1] = total(ARGV[i])
end
return out
"""
)
# ARGV[4...]: user id, count pairs: this instance's connections, rewritten whole.
HEARTBEAT_LUA: Final = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('DEL', KEYS[2])
for i = 4, #ARGV, 2 do
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 1)
return 1
"""
)
LEAVE_LUA: Final = """
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""


class RedisPresence:
    """:class:`~.fanout.Presence` shared by every instance through Redis.

    Args:
        url: the Redis URL.
        prefix: key prefix (the same as the fan-out's).
        ttl: seconds after which a silent (crashed) instance's users stop counting.
        instance: this instance's id (random by default).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "netstack:chat",
        ttl: float = 30.0,
        instance: str | None = None,
    ) -> None:
        self.url = url
        self.instance = instance or secrets.token_hex(8)
        self.ttl_ms = max(int(ttl * 1000), 1)
        self._zset = f"{prefix}:instances"
        self._hash_prefix = f"{prefix}:presence:"
        self._hash = self._hash_prefix + self.instance
        self._redis: Redis | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._local: dict[int, int] = {}  # user id -> connections on this instance
        self._lock = asyncio.Lock()

    @property
    def redis(self) -> Redis:
        assert self._redis is not None, "start() first"
        return self._redis

    async def _renew(self) -> None:
        pairs = [n for item in self._local.items() for n in item]
        await self._script(HEARTBEAT_LUA, *pairs)

    async def _script(self, lua: str, *extra: int) -> Any:
        args: list[str | int] = [self.ttl_ms, self.instance, self._hash_prefix, *extra]
        return await self.redis.eval(lua, 2, self._zset, self._hash, *args)

    async def start(self) -> None:
        """Register this instance and start the heartbeat.

        Raises:
            ScaleOutUnavailable: Redis cannot be reached.
        """
        import redis

        self._redis = _client(self.url)
        try:
            async with self._lock:
                await self._renew()
        except (redis.RedisError, OSError) as exc:
            await self.redis.aclose()
            self._redis = None
            raise ScaleOutUnavailable(f"cannot reach Redis: {_one_line(exc)}") from exc
        self._heartbeat = asyncio.get_running_loop().create_task(
            self._beat(), name="chat-presence-heartbeat"
        )

    async def _beat(self) -> None:
        import redis

        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                async with self._lock:
                    await self._renew()
            except (redis.RedisError, OSError) as exc:
                logger.warning("chat presence: heartbeat failed (%s)", _one_line(exc))

    def stop_heartbeat(self) -> None:
        """Stop renewing (what a crash looks like to the other instances; for tests)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    async def close(self) -> None:
        """Forget this instance's connections at once (a clean stop) and disconnect."""
        self.stop_heartbeat()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._script(LEAVE_LUA)
            await self._redis.aclose()
            self._redis = None

    async def connect(self, user_id: int) -> bool:
        async with self._lock:
            self._local[user_id] = self._local.get(user_id, 0) + 1
            return int(await self._script(CONNECT_LUA, user_id)) == 1

    async def disconnect(self, user_id: int) -> bool:
        async with self._lock:
            count = self._local.pop(user_id, 0) - 1
            if count > 0:
                self._local[user_id] = count
            return int(await self._script(DISCONNECT_LUA, user_id)) == 0

    async def is_online(self, user_id: int) -> bool:
        return user_id in await self.online([user_id])

    async def online(self, user_ids: Sequence[int]) -> set[int]:
        if not user_ids:
            return set()
        counts = await self._script(ONLINE_LUA, *user_ids)
        return {uid for uid, count in zip(user_ids, counts, strict=True) if int(count) > 0}


# KEYS[1] the nick's failure counter; ARGV[1] window ms. The window starts at the first
# failure, as in LocalThrottle.
FAILED_LUA: Final = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""
# ARGV[1] max failures: the milliseconds left in the window when blocked, else -1.
BLOCKED_LUA: Final = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n < tonumber(ARGV[1]) then return -1 end
return redis.call('PTTL', KEYS[1])
"""


class RedisThrottle:
    """:class:`~.fanout.LoginThrottle` shared by every instance through Redis.

    If Redis cannot be reached, logins are not throttled (logged): a Redis outage must
    not lock everyone out.

    Args:
        url: the Redis URL.
        prefix: key prefix (the same as the fan-out's).
        max_failures: failed logins per nick allowed in ``window`` seconds.
        window: seconds, from the first failure.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "netstack:chat",
        max_failures: int = 10,
        window: float = 300.0,
    ) -> None:
        self.url = url
        self.prefix = f"{prefix}:login:"
        self.max_failures = max_failures
        self.window_ms = max(int(window * 1000), 1)
        self._redis: Redis | None = None

    @property
    def redis(self) -> Redis:
        assert self._redis is not None, "start() first"
        return self._redis

    async def start(self) -> None:
        """Connect (checked with a PING).

        Raises:
            ScaleOutUnavailable: Redis cannot be reached.
        """
        import redis

        self._redis = _client(self.url)
        try:
            await self.redis.ping()
        except (redis.RedisError, OSError) as exc:
            await self.redis.aclose()
            self._redis = None
            raise ScaleOutUnavailable(f"cannot reach Redis: {_one_line(exc)}") from exc

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _eval(self, lua: str, key: str, arg: int) -> int | None:
        import redis

        try:
            return int(await self.redis.eval(lua, 1, self.prefix + key, arg))
        except (redis.RedisError, OSError) as exc:
            logger.warning("chat login throttle: Redis failed (%s); not throttling", _one_line(exc))
            return None

    async def blocked(self, key: str) -> float | None:
        left = await self._eval(BLOCKED_LUA, key, self.max_failures)
        if left is None or left < 0:
            return None
        return left / 1000

    async def failed(self, key: str) -> None:
        await self._eval(FAILED_LUA, key, self.window_ms)

    async def succeeded(self, key: str) -> None:
        import redis

        try:
            await self.redis.delete(self.prefix + key)
        except (redis.RedisError, OSError) as exc:
            logger.warning("chat login throttle: Redis failed (%s)", _one_line(exc))
