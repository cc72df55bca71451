"""Several chat instances behind one redis-server and one PostgreSQL: real servers only.

Clients connect to each instance directly, through ``netstack balance`` in TCP mode
(WebSocket is relayed as bytes) and through ``netstack balance --mode http`` (L7: the
balancer parses the upgrade request, then tunnels the WebSocket).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from netstack.config import ChatTimeouts
from netstack.servers.chat import ChatServer
from netstack.servers.chat.scaleout import (
    RedisFanout,
    RedisPresence,
    RedisThrottle,
    ScaleOutUnavailable,
)
from tests.helpers import TIMEOUT, apoll_until, free_port
from tests.helpers.services import RedisServer, redis_server
from tests.servers.chat.support import (
    PASSWORD,
    Client,
    TCPClient,
    WSClient,
    chat_config,
    tcp,
    ws,
)


@pytest.fixture
def prefix() -> str:
    """Channels and keys of this test only (the redis-server is shared by the run)."""
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def pair(pg_url: str, redis: RedisServer, prefix: str) -> AsyncIterator[list[ChatServer]]:
    """Two chat instances sharing one database and one Redis."""
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                ChatServer(chat_config(pg_url, redis=redis.url, redis_prefix=prefix))
            )
            for _ in range(2)
        ]
        yield servers


async def closing(*clients: Client) -> None:
    for client in clients:
        await client.close()


async def test_users_on_different_instances_talk(pair: list[ChatServer]) -> None:
    one, two = pair
    alice, bob = await tcp(one), await ws(two)
    await alice.register("alice")
    await bob.register("bob")
    await alice.ok("create", room="general")
    await bob.ok("join", room="general")
    await alice.presence("general", joined="bob")

    first = await alice.ok("say", room="general", text="hello from one")
    assert (await bob.expect("message"))["message"] == first["message"]
    second = await bob.ok("say", room="general", text="hello from two")
    assert (await alice.expect("message", message=second["message"]))["message"]["from"] == "bob"
    # Each side gets its own message once (locally), not a second time through Redis.
    await alice.ok("ping")
    await bob.ok("ping")
    assert [e["message"]["id"] for e in alice.events if e["type"] == "message"] == [1]
    assert [e["message"]["id"] for e in bob.events if e["type"] == "message"] == [2]

    # Shared presence: one sees who is connected to two.
    who = await alice.ok("who", room="general")
    assert {m["nick"]: m["online"] for m in who["members"]} == {"alice": True, "bob": True}
    dm = await alice.ok("dm", to="bob", text="psst")
    assert dm["delivered"] is True
    assert (await bob.expect("dm"))["message"]["text"] == "psst"
    await closing(alice, bob)


async def test_two_instances_behind_the_tcp_balancer(pair: list[ChatServer]) -> None:
    from netstack.config import BalancerQuickConfig, HealthConfig
    from netstack.servers.lb.server import Balancer

    cfg = BalancerQuickConfig(
        listen="127.0.0.1:0",
        backend=tuple(f"127.0.0.1:{srv.ws_address[1]}" for srv in pair),
        mode="tcp",
        algorithm="round_robin",
        health=HealthConfig(check_interval=None),
    ).to_balancer()
    async with Balancer(cfg) as lb:
        front = lb.address()
        alice = await WSClient.open(front)
        bob = await WSClient.open(front)
        await alice.register("alice")
        await bob.register("bob")
        # Round robin: one user per instance.
        homes = [{s.nick for s in srv.service.sessions} for srv in pair]
        assert sorted(homes, key=sorted) == [{"alice"}, {"bob"}]
        await alice.ok("create", room="general")
        await bob.ok("join", room="general")
        said = await bob.ok("say", room="general", text="through the balancer")
        assert (await alice.expect("message", message=said["message"]))["message"]["from"] == "bob"
        assert (await alice.ok("dm", to="bob", text="hi"))["delivered"] is True
        assert (await bob.expect("dm"))["message"]["text"] == "hi"
        await closing(alice, bob)


async def test_two_instances_behind_the_http_balancer(pair: list[ChatServer]) -> None:
    # The real CLI, L7 mode; round robin without health checks puts the first WebSocket
    # upgrade on the first instance and the second on the second (checked below).
    backends = [arg for srv in pair for arg in ("--backend", f"127.0.0.1:{srv.ws_address[1]}")]
    lb = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "netstack",
        "balance",
        "--mode",
        "http",
        "--listen",
        "127.0.0.1:0",
        *backends,
        "--algorithm",
        "round_robin",
        "--check-interval",
        "none",
        "--drain-timeout",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert lb.stdout is not None
    assert lb.stderr is not None
    try:
        async with asyncio.timeout(TIMEOUT):
            line = (await lb.stdout.readline()).decode()
        assert line.startswith("listening on http 127.0.0.1:"), line
        front = ("127.0.0.1", int(line.rsplit(":", 1)[1]))
        alice = await WSClient.open(front)
        # Bob's upgrade carries the Origin a browser on the page served through the
        # balancer sends: the Host the instance sees must still be the balancer's.
        bob = await WSClient.open(front, origin=f"http://{front[0]}:{front[1]}")
        await alice.register("alice")
        await bob.register("bob")
        homes = [{s.nick for s in srv.service.sessions} for srv in pair]
        assert homes == [{"alice"}, {"bob"}]

        await alice.ok("create", room="general")
        await bob.ok("join", room="general")
        await alice.presence("general", joined="bob")  # batched presence crosses instances
        said = await bob.ok("say", room="general", text="through the L7 balancer")
        assert (await alice.expect("message", message=said["message"]))["message"]["from"] == "bob"
        answer = await alice.ok("say", room="general", text="heard you")
        assert (await bob.expect("message", message=answer["message"]))["message"]["from"] == (
            "alice"
        )
        dm = await alice.ok("dm", to="bob", text="psst, from instance one")
        assert dm["delivered"] is True  # bob counts as online although he is on two
        assert (await bob.expect("dm"))["message"]["text"] == "psst, from instance one"
        back = await bob.ok("dm", to="alice", text="hi from two")
        assert (await alice.expect("dm", message=back["message"]))["message"]["from"] == "bob"
        await closing(alice, bob)
    finally:
        if lb.returncode is None:
            lb.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(TIMEOUT):
                    await lb.wait()
            except TimeoutError:
                lb.kill()
                await lb.wait()
        stderr = (await lb.stderr.read()).decode()
    assert lb.returncode == 0, stderr


async def test_offline_dm_is_delivered_at_login_on_the_other_instance(
    pair: list[ChatServer],
) -> None:
    one, two = pair
    alice, bob = await tcp(one), await tcp(two)
    await alice.register("alice")
    await bob.register("bob")
    await alice.ok("create", room="general")
    await bob.ok("join", room="general")
    await alice.ok("who", room="general")  # watch online/offline (bob is on two)
    await bob.close()
    # Bob's last connection (on two) closed: one hears it and knows he is offline.
    await alice.presence("general", offline="bob")
    who = await alice.ok("who", room="general")
    assert {m["nick"]: m["online"] for m in who["members"]} == {"alice": True, "bob": False}
    dm = await alice.ok("dm", to="bob", text="while you were out")
    assert dm["delivered"] is False

    bob = await ws(one)  # back, on the other instance
    await bob.login("bob")
    pending = await bob.expect("dm", pending=True)
    assert pending["message"]["text"] == "while you were out"
    await alice.presence("general", online="bob")
    await closing(alice, bob)


async def test_subscriptions_follow_a_user_across_instances(pair: list[ChatServer]) -> None:
    one, two = pair
    alice = await tcp(one)
    await alice.register("alice")
    await alice.ok("create", room="general")
    bob_one, bob_two = await tcp(one), await ws(two)  # bob is connected to both
    await bob_one.register("bob")
    await bob_two.login("bob")
    await bob_one.ok("join", room="general")  # joined through one...
    said = await alice.ok("say", room="general", text="both of you")
    # ...and his session on two hears the room too.
    assert (await bob_two.expect("message"))["message"] == said["message"]
    assert (await bob_one.expect("message"))["message"] == said["message"]

    await alice.ok("kick", room="general", nick="bob", reason="out")
    await bob_two.expect("kicked", room="general", nick="bob")
    await bob_one.expect("kicked", room="general", nick="bob")
    await alice.ok("say", room="general", text="not for bob")
    marker = await bob_two.ok("ping")  # replies come in order: anything sent before is here
    assert marker["type"] == "ack"
    assert [e for e in bob_two.events if e["type"] == "message"] == []
    await closing(alice, bob_one, bob_two)


async def test_failed_logins_count_on_every_instance(pair: list[ChatServer]) -> None:
    one, two = pair
    alice = await tcp(one)
    await alice.register("alice")
    guesser = await tcp(one)
    for _ in range(10):
        await guesser.fails("login", "auth_failed", nick="alice", password="wrong guess")
    elsewhere = await ws(two)  # the other instance knows: no fresh budget there
    refused = await elsewhere.fails("login", "too_many_attempts", nick="alice", password=PASSWORD)
    assert "retry in" in refused["message"]
    await closing(alice, guesser, elsewhere)


async def test_redis_throttle(redis: RedisServer, prefix: str) -> None:
    a = RedisThrottle(redis.url, prefix=prefix, max_failures=2, window=TIMEOUT)
    b = RedisThrottle(redis.url, prefix=prefix, max_failures=2, window=0.2)
    await a.start()
    await b.start()
    assert await b.blocked("alice") is None
    await a.failed("alice")
    await b.failed("alice")
    wait = await b.blocked("alice")
    assert wait is not None
    assert 0 < wait <= TIMEOUT  # the window started at the first failure (a's)
    assert await a.blocked("bob") is None
    await a.succeeded("alice")
    assert await b.blocked("alice") is None
    await b.failed("carol")  # b's window is 0.2 s: it passes by itself
    await b.failed("carol")
    assert await b.blocked("carol") is not None
    await apoll_until(unblocked(b, "carol"))
    await a.close()
    await b.close()


async def test_redis_throttle_fails_open(
    tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with redis_server(tmp_path / "r") as private:
        throttle = RedisThrottle(private.url, prefix=prefix, max_failures=1)
        await throttle.start()
        await throttle.failed("alice")
        assert await throttle.blocked("alice") is not None
    # Redis is gone: nobody is locked out, and it is logged.
    with caplog.at_level(logging.WARNING, logger="netstack"):
        assert await throttle.blocked("alice") is None
        await throttle.failed("alice")
        await throttle.succeeded("alice")
    assert "not throttling" in caplog.text
    await throttle.close()


def unblocked(throttle: RedisThrottle, key: str) -> Any:
    async def check() -> bool:
        return await throttle.blocked(key) is None

    return check


async def test_redis_fanout_between_two_instances(redis: RedisServer, prefix: str) -> None:
    got: dict[str, list[str]] = {"a": [], "b": []}

    class Sub:
        def __init__(self, name: str) -> None:
            self.name = name

        def deliver(self, text: str) -> None:
            got[self.name].append(text)

    a, b = RedisFanout(redis.url, prefix=prefix), RedisFanout(redis.url, prefix=prefix)
    await a.start()
    await b.start()
    a.subscribe("room:x", Sub("a"))
    b.subscribe("room:x", Sub("b"))
    for i in range(50):  # order is kept
        a.publish("room:x", f'{{"n":{i}}}')
    b.publish("room:y", "nobody listens")
    await a.flush()
    await apoll_until(lambda: len(got["b"]) == 50)
    assert got["a"] == got["b"] == [f'{{"n":{i}}}' for i in range(50)]
    # Garbage on the channel is ignored; the reader goes on.
    redis.cli("publish", f"{prefix}:events", "no newline here")
    a.publish("room:x", "after")
    await apoll_until(lambda: got["b"][-1:] == ["after"])
    await a.close()
    await b.close()
    assert a.dropped == b.dropped == 0


async def test_fanout_survives_a_redis_restart(
    tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[str] = []

    class Sub:
        def deliver(self, text: str) -> None:
            got.append(text)

    port = free_port()
    with redis_server(tmp_path / "r1", port) as private:
        a = RedisFanout(private.url, prefix=prefix)
        b = RedisFanout(private.url, prefix=prefix)
        await a.start()
        await b.start()
        b.subscribe("room:x", Sub())
        a.publish("room:x", "before")
        await apoll_until(lambda: got == ["before"])
    # Redis is gone: local delivery goes on, publishing waits and retries.
    with caplog.at_level(logging.WARNING, logger="netstack"):
        a.publish("room:x", "during")
        await apoll_until(lambda: "Redis publish failed" in caplog.text)
    with redis_server(tmp_path / "r2", port):
        # Back on the same address: b re-subscribes by itself; what a keeps publishing
        # reaches it (events published while nobody could subscribe may be lost).
        async def delivered() -> bool:
            a.publish("room:x", "after")
            await a.flush()
            return "after" in got

        await apoll_until(delivered, timeout=TIMEOUT * 3, interval=0.2)
        await a.close()
        await b.close()
    assert got[0] == "before"


async def test_presence_of_a_crashed_instance_expires(redis: RedisServer, prefix: str) -> None:
    crashed = RedisPresence(redis.url, prefix=prefix, ttl=0.3)
    alive = RedisPresence(redis.url, prefix=prefix, ttl=TIMEOUT)
    await crashed.start()
    await alive.start()
    assert await crashed.connect(5) is True
    assert await alive.connect(5) is False  # connected to both: not the first
    assert await crashed.connect(6) is True
    assert await alive.online([5, 6, 7]) == {5, 6}
    assert await alive.disconnect(5) is False  # still on the other instance
    assert await alive.disconnect(5) is False  # never counted here twice: not the last
    crashed.stop_heartbeat()  # what a crash looks like from outside
    await apoll_until(alive_is_offline(alive, 6), timeout=TIMEOUT)
    assert await alive.online([5, 6]) == set()
    assert await alive.connect(6) is True  # first again
    await alive.close()  # a clean stop forgets its users at once
    other = RedisPresence(redis.url, prefix=prefix, ttl=TIMEOUT)
    await other.start()
    assert not await other.is_online(6)
    await other.close()
    await crashed.close()


async def test_presence_heals_after_redis_loses_it(redis: RedisServer, prefix: str) -> None:
    here = RedisPresence(redis.url, prefix=prefix, ttl=0.3)  # heartbeat every 0.1 s
    there = RedisPresence(redis.url, prefix=prefix, ttl=TIMEOUT)
    await here.start()
    await there.start()
    assert await here.connect(5) is True
    assert await here.connect(5) is False
    redis.cli("del", f"{prefix}:instances", f"{prefix}:presence:{here.instance}")
    assert not await there.is_online(5)  # lost, as after a Redis restart
    await apoll_until(online_again(there, 5))  # the next heartbeat rewrites the counts
    assert await here.disconnect(5) is False  # two connections were restored, not one
    assert await here.disconnect(5) is True
    assert not await there.is_online(5)
    await here.close()
    await there.close()


def online_again(presence: RedisPresence, user_id: int) -> Any:
    async def check() -> bool:
        return await presence.is_online(user_id)

    return check


def alive_is_offline(presence: RedisPresence, user_id: int) -> Any:
    async def check() -> bool:
        return not await presence.is_online(user_id)

    return check


async def test_unreachable_redis_is_a_startup_error(pg_url: str, prefix: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(ScaleOutUnavailable, match="cannot reach Redis"):
        await RedisFanout(url, prefix=prefix).start()
    with pytest.raises(ScaleOutUnavailable, match="cannot reach Redis"):
        await RedisPresence(url, prefix=prefix).start()
    with pytest.raises(ScaleOutUnavailable, match="cannot reach Redis"):
        await RedisThrottle(url, prefix=prefix).start()
    server = ChatServer(chat_config(pg_url, redis=url))
    with pytest.raises(ScaleOutUnavailable):
        await server.start()
    assert server.ws is None  # nothing left listening


async def test_presence_ttl_reaches_the_server(pg_url: str, redis: RedisServer) -> None:
    cfg = chat_config(pg_url, redis=redis.url, chat_timeouts=ChatTimeouts(presence_ttl=7.5))
    async with ChatServer(cfg) as srv:
        assert isinstance(srv.presence, RedisPresence)
        assert srv.presence.ttl_ms == 7500
        assert isinstance(srv.fanout, RedisFanout)
        assert srv.fanout.instance == srv.presence.instance


# A crashed instance, for real: its entry expires after TTL, a survivor reaps it on its
# next heartbeat (every TTL / 3) and the offline goes out within INTERVAL.
TTL = 1.5  # survivors tolerate a 1 s stall of their own loop (a loaded machine)
INTERVAL = 0.05


def unmeasured_env() -> dict[str, str]:
    """This environment without coverage: a process the test kills with SIGKILL would
    leave a half-written coverage data file behind (``coverage combine`` warns)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_PROCESS_")}
    return {**env, "PYTHONUNBUFFERED": "1"}


async def start_instance(pg_url: str, redis_url: str, prefix: str) -> tuple[Any, tuple[str, int]]:
    """``netstack chat serve`` in its own process: (the process, its TCP address)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "netstack",
        "chat",
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--tcp-bind",
        "127.0.0.1:0",
        "--db",
        pg_url,
        "--redis",
        redis_url,
        "--redis-prefix",
        prefix,
        "--presence-ttl",
        str(TTL),
        "--presence-interval",
        str(INTERVAL),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=unmeasured_env(),
    )
    assert proc.stdout is not None
    async with asyncio.timeout(TIMEOUT * 2):
        while True:
            line = (await proc.stdout.readline()).decode()
            assert line, "the chat instance exited at start"
            if line.startswith("listening on tcp "):
                return proc, ("127.0.0.1", int(line.rsplit(":", 1)[1]))


def redis_parts(srv: ChatServer) -> tuple[RedisPresence, RedisFanout]:
    assert isinstance(srv.presence, RedisPresence)
    assert isinstance(srv.fanout, RedisFanout)
    return srv.presence, srv.fanout


def offline_events(client: Client, nick: str) -> list[dict[str, Any]]:
    return [e for e in client.events if e["type"] == "presence" and nick in e["offline"]]


async def test_a_killed_instance_s_users_go_offline_once(
    pg_url: str, redis: RedisServer, prefix: str
) -> None:
    timeouts = ChatTimeouts(presence_ttl=TTL, presence_interval=INTERVAL)
    cfg = chat_config(pg_url, redis=redis.url, redis_prefix=prefix, chat_timeouts=timeouts)
    async with ChatServer(cfg) as one, ChatServer(cfg) as three:
        proc, two = await start_instance(pg_url, redis.url, prefix)
        try:
            alice, dave = await tcp(one), await tcp(three)  # the watchers, on survivors
            bob = await TCPClient.open(two)  # only on the instance that will die
            carol_one, carol_two = await tcp(one), await TCPClient.open(two)  # on both
            await alice.register("alice")
            await dave.register("dave")
            await bob.register("bob")
            await carol_one.register("carol")
            await carol_two.login("carol")
            await alice.ok("create", room="general")
            for client in (dave, bob, carol_one):
                await client.ok("join", room="general")
            for watcher in (alice, dave):
                who = await watcher.ok("who", room="general")
                assert {m["nick"] for m in who["members"] if m["online"]} == {
                    "alice",
                    "bob",
                    "carol",
                    "dave",
                }

            await bob.ok("dm", to="alice", text="bye")  # DM partners: alice hears of bob
            proc.kill()  # SIGKILL: no goodbye, no offline from it
            await proc.wait()
            killed = asyncio.get_running_loop().time()
            for watcher in (alice, dave):
                await watcher.presence("general", offline="bob")
            elapsed = asyncio.get_running_loop().time() - killed
            # Within TTL + a heartbeat + the batch interval (0.84 to 1.26 s with TTL 1 on
            # an idle machine), plus slack for a loaded one.
            assert elapsed <= TTL + TTL / 3 + INTERVAL + TIMEOUT / 5, elapsed
            await alice.presence(None, offline="bob")  # to her, as his DM partner

            # One reap between the two survivors, and nothing left to reap.
            survivors = [redis_parts(one), redis_parts(three)]
            assert sum(presence.reaped for presence, _ in survivors) == 1
            for (presence, fanout), srv in zip(survivors, (one, three), strict=True):
                assert await presence.reap() == 0
                srv.service.flush_presence()
                await fanout.flush()
            await alice.ok("ping")  # anything for alice and dave before now has arrived:
            await dave.ok("ping")  # the offline went out once, carol is still online
            for watcher in (alice, dave):
                assert offline_events(watcher, "bob") == []  # the one was taken above
                assert offline_events(watcher, "carol") == []
                who = await watcher.ok("who", room="general")
                assert {m["nick"] for m in who["members"] if m["online"]} == {
                    "alice",
                    "carol",
                    "dave",
                }
            await closing(alice, dave, carol_one, bob, carol_two)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


class Reaped:
    """An ``on_expired`` / ``on_returned`` handler that records its calls."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    async def __call__(self, user_ids: list[int]) -> None:
        self.calls.append(user_ids)

    @property
    def users(self) -> list[int]:
        return sorted(u for call in self.calls for u in call)


async def test_a_dead_instance_is_reaped_in_batches_by_one_survivor(
    redis: RedisServer, prefix: str
) -> None:
    from netstack.servers.chat.scaleout import REAP_BATCH

    dead = RedisPresence(redis.url, prefix=prefix, ttl=0.3)
    a = RedisPresence(redis.url, prefix=prefix, ttl=TIMEOUT * 4)
    b = RedisPresence(redis.url, prefix=prefix, ttl=TIMEOUT * 4)
    got_a, got_b = Reaped(), Reaped()
    a.on_expired(got_a)
    b.on_expired(got_b)
    for presence in (dead, a, b):
        await presence.start()
        presence.stop_heartbeat()  # no tick of its own: the test calls reap() itself
    users = range(1, 2 * REAP_BATCH + 2)  # three batches
    # What a connect per user would leave, in one write (HSET, as the heartbeat does).
    redis.cli(
        "hset", f"{prefix}:presence:{dead.instance}", *[str(n) for u in users for n in (u, 1)]
    )
    assert await dead.connect(10_000) is True  # also on a (below): stays online
    assert await a.connect(10_000) is False
    assert await dead.connect(10_001) is True  # leaves a before the reap: offline then, once
    assert await a.connect(10_001) is False
    assert await a.reap() == 0  # not expired yet
    await apoll_until(alive_is_offline(a, 1))
    assert await a.disconnect(10_001) is True  # its last live connection: announced here

    assert await a.reap() == 1
    assert await b.reap() == 0  # claimed and finished by a: nothing for b
    assert len(got_a.calls) == 3  # 2 * REAP_BATCH + 2 users left on it
    assert all(len(call) <= REAP_BATCH for call in got_a.calls)
    assert got_a.users == list(users)  # each once; not 10_000 (on a), not 10_001 (gone)
    assert got_b.calls == []
    assert redis.cli("exists", f"{prefix}:presence:{dead.instance}").strip() == "0"
    assert await a.online([10_000]) == {10_000}
    for presence in (dead, a, b):
        await presence.close()


async def test_a_reap_whose_reaper_dies_is_taken_over(redis: RedisServer, prefix: str) -> None:
    from netstack.servers.chat.scaleout import CLAIM_LUA, LEAVE_LUA

    dead = RedisPresence(redis.url, prefix=prefix, ttl=0.3)
    reaper = RedisPresence(redis.url, prefix=prefix, ttl=0.3)  # its claim's lease: 0.3 s
    other = RedisPresence(redis.url, prefix=prefix, ttl=TIMEOUT * 4)
    got = Reaped()
    other.on_expired(got)
    for presence in (dead, reaper, other):
        await presence.start()
        presence.stop_heartbeat()  # no tick of its own: the test calls reap() itself
    assert await dead.connect(7) is True
    await reaper._script(LEAVE_LUA)  # out of the way: only `dead` expires
    await apoll_until(alive_is_offline(other, 7))
    # The reaper claims the dead instance, then dies before reaping a single batch.
    assert (await reaper._script(CLAIM_LUA)).decode() == dead.instance
    assert await other.reap() == 0  # claimed, lease running: left alone

    async def taken_over() -> bool:
        return await other.reap() == 1

    await apoll_until(taken_over)  # once the lease has passed
    assert got.calls == [[7]]
    for presence in (dead, reaper, other):
        await presence.close()


async def test_an_instance_taken_for_dead_announces_its_users_again(
    redis: RedisServer, prefix: str
) -> None:
    stalled = RedisPresence(redis.url, prefix=prefix, ttl=TIMEOUT)
    other = RedisPresence(redis.url, prefix=prefix, ttl=TIMEOUT)
    expired, returned = Reaped(), Reaped()
    other.on_expired(expired)
    stalled.on_returned(returned)
    await stalled.start()
    await other.start()
    stalled.stop_heartbeat()  # its ticks are run by hand below: beat()
    assert await stalled.connect(3) is True
    # A stall longer than the ttl, as seen from Redis: the entry is past its expiry.
    redis.cli("zadd", f"{prefix}:instances", "1", stalled.instance)
    assert await other.reap() == 1
    assert expired.calls == [[3]]
    assert not await other.is_online(3)
    # Its next heartbeat finds it was dropped: user 3 is online again and announced so.
    await stalled.beat()
    assert returned.calls == [[3]]
    assert await other.is_online(3)
    await stalled.beat()  # registered all along: nothing to announce
    assert returned.calls == [[3]]

    # Dropped again, and a connect comes before the heartbeat: that heartbeat announces.
    redis.cli("zadd", f"{prefix}:instances", "1", stalled.instance)
    assert await other.reap() == 1
    assert await stalled.connect(4) is True
    await stalled.beat()
    assert sorted(returned.calls[-1]) == [3, 4]
    assert await other.online([3, 4]) == {3, 4}
    await stalled.close()
    await other.close()


async def test_users_of_an_instance_taken_for_dead_come_back_online(
    pg_url: str, redis: RedisServer, prefix: str
) -> None:
    timeouts = ChatTimeouts(presence_ttl=TTL, presence_interval=INTERVAL)
    cfg = chat_config(pg_url, redis=redis.url, redis_prefix=prefix, chat_timeouts=timeouts)
    async with ChatServer(cfg) as one, ChatServer(cfg) as two:
        alice, bob = await tcp(one), await tcp(two)
        await alice.register("alice")
        await bob.register("bob")
        await alice.ok("create", room="general")
        await bob.ok("join", room="general")
        await alice.ok("who", room="general")
        stalled, _ = redis_parts(two)
        stalled.stop_heartbeat()  # it stalls longer than the ttl...
        redis.cli("zadd", f"{prefix}:instances", "1", stalled.instance)
        await alice.presence("general", offline="bob")  # ...and one reaps it
        await stalled.beat()  # back: its heartbeat finds it was dropped
        await alice.presence("general", online="bob")
        assert (await alice.ok("dm", to="bob", text="there?"))["delivered"] is True
        await closing(alice, bob)
