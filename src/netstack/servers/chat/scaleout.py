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
(a sorted set scored by expiry time). A heartbeat renews both every ``ttl / 3``
(``ttl`` is ``presence_ttl``, 30 s by default). Counting runs in Lua scripts, atomic
against other instances, with Redis's own clock (instances' clocks may differ): only
instances whose entry has not expired count.

An instance that crashes stops renewing; after ``ttl`` its users no longer count as
online anywhere, and on the next heartbeat tick of a surviving instance (at most
``ttl / 3`` later) it is reaped: the first survivor to run ``CLAIM_LUA`` moves the dead
entry to ``PREFIX:reaping`` (with a lease of one ttl, so another survivor takes over if
this one dies too), then ``REAP_LUA`` removes its users from its hash
:data:`REAP_BATCH` at a time and returns those connected to no live instance. The
service announces them ``offline`` (to the watchers of their rooms and to their DM
partners) through the usual batched presence path, from that one instance only, so every
client hears it once: ``ttl`` + up to one heartbeat + ``presence_interval`` after the
crash. A user still connected to another instance stays online (no event). A user whose
last live connection closes before the reap is announced offline by that disconnect and
removed from the unreaped hashes, so never twice. The dead instance's hash outlives its
entry (:data:`HASH_KEEP` ttls) so the reaper can read it. An instance taken for dead
that renews again (it stalled longer than the ttl, or Redis lost its data) learns it from
its heartbeat and announces its users ``online`` again. Each heartbeat rewrites the
instance's hash from its own counts (the truth about its connections), so presence heals
by itself after Redis loses its data (a restart without persistence); one instance's
presence calls are serialised, so a heartbeat never races a count. Reaping runs in its
own task beside the heartbeat, so a huge dead instance never delays a renewal.

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
from netstack.servers.chat.fanout import LocalFanout, UsersHandler

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


# KEYS[1] instances zset (instance -> expiry), KEYS[2] this instance's hash, KEYS[3] the
# reaping zset (dead instance -> its reaper's lease expiry); ARGV[1] ttl ms, ARGV[2] instance,
# ARGV[3] hash key prefix; then per script ARGV[4...]. _LIVE sums the live instances'
# counts. An instance's hash outlives its entry in KEYS[1] (HASH_KEEP ttls) so that the
# reaper can still read who was connected to it.
HASH_KEEP: Final = 3
_NOW: Final = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keep = tonumber(ARGV[1]) * {HASH_KEEP}
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
# Returns {the user's connections, 1 if this instance was not registered (see HEARTBEAT)}.
CONNECT_LUA: Final = (
    _NOW
    + _LIVE
    + """
local added = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[4], 1)
redis.call('PEXPIRE', KEYS[2], keep)
return {total(ARGV[4]), added}
"""
)
# A user whose last live connection goes is announced offline here; dead instances not yet
# reaped forget them too, so that their reaper does not announce it a second time.
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
local sum = total(ARGV[4])
if sum == 0 then
    for _, inst in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - 1)) do
        redis.call('HDEL', ARGV[3] .. inst, ARGV[4])
    end
    for _, inst in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
        redis.call('HDEL', ARGV[3] .. inst, ARGV[4])
    end
end
return sum
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
# ARGV[4...]: user id, count pairs: this instance's connections, rewritten whole. Returns 1
# when the instance was not registered (reaped while it could not renew, or Redis lost its
# data): its users may have been announced offline.
HEARTBEAT_LUA: Final = (
    _NOW
    + """
local added = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[2])
for i = 4, #ARGV, 2 do
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[2], keep)
return added
"""
)
LEAVE_LUA: Final = """
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""
# Claim one dead instance for reaping: one whose expiry has passed (moved from KEYS[1] to
# KEYS[3]), else one whose reaper died (its lease passed). Atomic, so exactly one live
# instance claims each; the lease (one ttl, renewed by every batch) lets another take over
# if that one dies too. Returns the instance id, or false.
CLAIM_LUA: Final = (
    _NOW
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - 1, 'LIMIT', 0, 1)[1]
if dead then
    redis.call('ZREM', KEYS[1], dead)
else
    dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - 1, 'LIMIT', 0, 1)[1]
    if not dead then return false end
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[1]), dead)
redis.call('PEXPIRE', ARGV[3] .. dead, keep)
return dead
"""
)
# One batch of a claimed dead instance (ARGV[4]): remove up to ARGV[5] of its users from its
# hash and return {done, users now connected nowhere}. ``done`` (1) once the hash is empty;
# the claim is then dropped. A user still connected to a live instance is not returned.
REAP_LUA: Final = (
    _NOW
    + _LIVE
    + """
if not redis.call('ZSCORE', KEYS[3], ARGV[4]) then return {1, {}} end  -- it came back
local key = ARGV[3] .. ARGV[4]
local gone = {}
for _, user in ipairs(redis.call('HRANDFIELD', key, tonumber(ARGV[5]))) do
    redis.call('HDEL', key, user)
    if total(user) == 0 then gone[#gone + 1] = user end
end
if redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', KEYS[3], ARGV[4])
    return {1, gone}
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[1]), ARGV[4])
redis.call('PEXPIRE', key, keep)
return {0, gone}
"""
)

# Users of a dead instance handled per Lua call (and per call of the service's handler):
# a big instance is reaped in steps, so neither Redis nor this event loop stalls on it.
REAP_BATCH: Final = 200


class RedisPresence:
    """:class:`~.fanout.Presence` shared by every instance through Redis.

    A crashed instance is reaped by one of the survivors: every instance, on each heartbeat
    tick (every ``ttl / 3``), looks for instances whose entry has expired, claims one
    atomically (so exactly one survivor reaps it), and takes its users off in batches of
    :data:`REAP_BATCH`. The users connected nowhere else are handed to the handler set with
    :meth:`on_expired` (the service announces them ``offline``). So the ``offline`` of a
    crashed instance's users comes ``ttl`` plus up to one heartbeat (``ttl / 3``) after
    its last renewal, plus the service's ``presence_interval``.

    Args:
        url: the Redis URL.
        prefix: key prefix (the same as the fan-out's).
        ttl: seconds after which a silent (crashed) instance's users stop counting
            (``presence_ttl``).
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
        self._reaping = f"{prefix}:reaping"
        self._hash_prefix = f"{prefix}:presence:"
        self._hash = self._hash_prefix + self.instance
        self._redis: Redis | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[int] | None = None
        self._expired: UsersHandler | None = None
        self._returned: UsersHandler | None = None
        self._dropped = False  # re-registered by a connect: announce our users again
        self._local: dict[int, int] = {}  # user id -> connections on this instance
        self._lock = asyncio.Lock()
        self.reaped = 0  # dead instances this one has finished reaping

    @property
    def redis(self) -> Redis:
        assert self._redis is not None, "start() first"
        return self._redis

    def on_expired(self, handler: UsersHandler) -> None:
        """Call ``handler(user_ids)`` with the users of a dead instance who are connected
        nowhere else, once per user and across every instance (in batches)."""
        self._expired = handler

    def on_returned(self, handler: UsersHandler) -> None:
        """Call ``handler(user_ids)`` with this instance's users when it renews after it was
        dropped (reaped after a stall longer than the ttl, or Redis lost its data)."""
        self._returned = handler

    async def _renew(self) -> bool:
        pairs = [n for item in self._local.items() for n in item]
        return int(await self._script(HEARTBEAT_LUA, *pairs)) == 1

    async def _script(self, lua: str, *extra: int | str) -> Any:
        args: list[str | int] = [self.ttl_ms, self.instance, self._hash_prefix, *extra]
        return await self.redis.eval(lua, 3, self._zset, self._hash, self._reaping, *args)

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
                self._dropped = False
        except (redis.RedisError, OSError) as exc:
            await self.redis.aclose()
            self._redis = None
            raise ScaleOutUnavailable(f"cannot reach Redis: {_one_line(exc)}") from exc
        self._heartbeat = asyncio.get_running_loop().create_task(
            self._beat(), name="chat-presence-heartbeat"
        )

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            await self.beat()

    async def beat(self) -> None:
        """One heartbeat tick: renew this instance, then reap dead ones in the background."""
        import redis

        try:
            async with self._lock:
                returned = await self._renew() or self._dropped
                self._dropped = False
                users = list(self._local)
        except (redis.RedisError, OSError) as exc:
            logger.warning("chat presence: heartbeat failed (%s)", _one_line(exc))
            return
        if returned and users and self._returned is not None:
            logger.warning("chat presence: this instance had been dropped; re-announcing")
            await self._call(self._returned, users)
        # Reaping runs beside the heartbeat: a big dead instance must not delay renewals.
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(
                self.reap(), name="chat-presence-reaper"
            )

    async def _call(self, handler: UsersHandler, users: list[int]) -> None:
        try:
            await handler(users)
        except Exception:
            logger.exception("chat presence: handling %d users failed", len(users))

    async def reap(self) -> int:
        """Reap every dead instance found now (the heartbeat calls this); returns how many.

        Errors are logged: the next tick tries again (a claim whose reaper failed is taken
        over when its lease passes).
        """
        import redis

        done = 0
        try:
            while (dead := await self._script(CLAIM_LUA)) is not None:
                dead = dead.decode() if isinstance(dead, bytes) else str(dead)
                logger.info("chat presence: reaping dead instance %s", dead)
                finished = 0
                while not finished:
                    finished, gone = await self._script(REAP_LUA, dead, REAP_BATCH)
                    if gone and self._expired is not None:
                        await self._call(self._expired, [int(u) for u in gone])
                done += 1
                self.reaped += 1
        except (redis.RedisError, OSError) as exc:
            logger.warning("chat presence: reaping failed (%s)", _one_line(exc))
        return done

    def stop_heartbeat(self) -> None:
        """Stop renewing (what a crash looks like to the other instances; for tests)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None

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
            count, added = await self._script(CONNECT_LUA, user_id)
            self._dropped = self._dropped or added == 1  # the next heartbeat re-announces
            return int(count) == 1

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
