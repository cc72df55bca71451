"""The Store interface, run against SQLite and a real PostgreSQL server alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from netstack.servers.chat.server import open_store, redact
from netstack.servers.chat.store import FileInfo, Store, StoreConflict, StoreUnavailable
from tests.helpers import TIMEOUT, apoll_until

NOW = 1_700_000_000_000


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file, or a URL into a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return str(tmp_path / "chat.sqlite3")
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def store(store_location: str) -> AsyncIterator[Store]:
    s = open_store(store_location)
    await s.open()
    yield s
    await s.close()


async def test_users_and_sessions(store: Store) -> None:
    alice = await store.create_user("Alice", "hash-a", NOW)
    with pytest.raises(StoreConflict):
        await store.create_user("ALICE", "hash-b", NOW)  # unique ignoring case
    found = await store.get_user("aLiCe")
    assert found == alice
    assert found.nick == "Alice"
    assert await store.get_user("bob") is None

    await store.create_session("t1", alice.id, expires=NOW + 1000, now=NOW)
    await store.create_session("t2", alice.id, expires=NOW + 10, now=NOW)
    assert await store.session_user("t1", NOW + 5) == alice
    assert await store.session_user("t2", NOW + 10) is None  # expired at its deadline
    assert await store.session_user("nope", NOW) is None
    # A new session purges the expired ones.
    await store.create_session("t3", alice.id, expires=NOW + 5000, now=NOW + 100)
    assert await store.session_user("t2", NOW) is None
    await store.delete_session("t1")
    assert await store.session_user("t1", NOW) is None
    assert await store.session_user("t3", NOW) == alice


async def test_rooms_members_roles(store: Store) -> None:
    alice = await store.create_user("alice", "h", NOW)
    bob = await store.create_user("bob", "h", NOW)
    general = await store.create_room("general", "public", "hi", alice.id, NOW)
    with pytest.raises(StoreConflict):
        await store.create_room("general", "invite", "", bob.id, NOW)
    secret = await store.create_room("secret", "invite", "", alice.id, NOW)
    await store.create_room("a-b", "public", "", bob.id, NOW)
    await store.create_room("a_b", "public", "", bob.id, NOW)
    assert await store.get_room("general") == general
    assert await store.get_room("nope") is None

    await store.set_topic(general.id, "new topic")
    assert (await store.get_room("general")).topic == "new topic"  # type: ignore[union-attr]

    # Bob sees the public rooms, not alice's invite-only one; ordering is bytewise.
    bob_view = await store.list_rooms(bob.id)
    assert [(s.room.name, s.members, s.role) for s in bob_view] == [
        ("a-b", 1, "owner"),
        ("a_b", 1, "owner"),
        ("general", 1, None),
    ]
    assert [s.room.name for s in await store.list_rooms(alice.id)] == [
        "a-b",
        "a_b",
        "general",
        "secret",
    ]

    await store.add_invite(secret.id, bob.id, alice.id, NOW)
    await store.add_invite(secret.id, bob.id, alice.id, NOW + 1)  # again: one invite
    assert await store.has_invite(secret.id, bob.id)
    await store.add_member(secret.id, bob.id, "member", NOW)
    assert not await store.has_invite(secret.id, bob.id)  # consumed by joining
    await store.add_member(secret.id, bob.id, "moderator", NOW)  # already in: kept as is
    assert (await store.get_member(secret.id, bob.id)).role == "member"  # type: ignore[union-attr]
    assert await store.user_rooms(bob.id) == ["a-b", "a_b", "secret"]

    await store.set_role(secret.id, bob.id, "moderator")
    await store.set_mute(secret.id, bob.id, NOW + 60_000)
    members = await store.members(secret.id)
    assert [(m.nick, m.role, m.muted_until) for m in members] == [
        ("alice", "owner", None),
        ("bob", "moderator", NOW + 60_000),
    ]
    await store.set_mute(secret.id, bob.id, None)
    assert (await store.get_member(secret.id, bob.id)).muted_until is None  # type: ignore[union-attr]

    assert await store.remove_member(secret.id, bob.id)
    assert not await store.remove_member(secret.id, bob.id)
    assert await store.get_member(secret.id, bob.id) is None

    await store.add_ban(general.id, bob.id, alice.id, "spam", NOW)
    await store.add_ban(general.id, bob.id, alice.id, "spam again", NOW + 1)  # replaces
    assert await store.is_banned(general.id, bob.id)
    assert not await store.is_banned(general.id, alice.id)
    assert await store.remove_ban(general.id, bob.id)
    assert not await store.remove_ban(general.id, bob.id)


async def test_messages_history_backfill_pending(store: Store) -> None:
    alice = await store.create_user("alice", "h", NOW)
    bob = await store.create_user("bob", "h", NOW)
    carol = await store.create_user("carol", "h", NOW)
    room = await store.create_room("general", "public", "", alice.id, NOW)
    other = await store.create_room("other", "public", "", carol.id, NOW)
    await store.add_member(room.id, bob.id, "member", NOW)
    assert await store.last_message_id() == 0

    said = [
        await store.add_message(sender=alice, text=f"m{i}", now=NOW + i, room=room)
        for i in range(5)
    ]
    assert [m.id for m in said] == sorted(m.id for m in said)
    elsewhere = await store.add_message(sender=carol, text="not for bob", now=NOW, room=other)
    dm = await store.add_message(
        sender=alice, text="psst", now=NOW + 9, recipient=bob, pending=True
    )
    dm2 = await store.add_message(sender=carol, text="hey", now=NOW + 10, recipient=bob)
    assert dm.to_json() == {
        "id": dm.id,
        "ts": NOW + 9,
        "from": "alice",
        "to": "bob",
        "text": "psst",
    }
    assert await store.last_message_id() == dm2.id

    # History pages, oldest first within a page.
    latest = await store.room_history(room, None, 2)
    assert [m.text for m in latest] == ["m3", "m4"]
    older = await store.room_history(room, latest[0].id, 10)
    assert [m.text for m in older] == ["m0", "m1", "m2"]
    assert older[0].room == "general"
    assert [m.text for m in await store.dm_history(bob, alice, None, 10)] == ["psst"]
    assert await store.dm_history(alice, carol, None, 10) == []

    # Backfill: bob's rooms and DMs only, in id order, resumable.
    first = await store.backfill(bob.id, said[1].id, 3)
    assert [m.text for m in first] == ["m2", "m3", "m4"]
    rest = await store.backfill(bob.id, first[-1].id, 10)
    assert [m.text for m in rest] == ["psst", "hey"]
    assert elsewhere.id not in {m.id for m in first + rest}
    # The sender of a DM gets it back too.
    assert [m.text for m in await store.backfill(alice.id, said[-1].id, 10)] == ["psst"]

    assert [m.id for m in await store.pending(bob.id, 10)] == [dm.id]
    later = await store.add_message(
        sender=carol, text="later", now=NOW + 11, recipient=bob, pending=True
    )
    assert [m.id for m in await store.pending(bob.id, 1)] == [dm.id]  # a page, oldest first
    await store.clear_pending(bob.id, dm.id)
    assert [m.id for m in await store.pending(bob.id, 10)] == [later.id]
    await store.clear_pending(bob.id, later.id)
    assert await store.pending(bob.id, 10) == []


async def test_user_by_id_and_dm_partners(store: Store) -> None:
    alice, bob, carol, dave = [
        await store.create_user(nick, "h", NOW) for nick in ("alice", "Bob", "carol", "dave")
    ]
    assert await store.get_user_by_id(bob.id) == bob
    assert await store.get_user_by_id(10_000) is None
    assert await store.dm_partners(alice.id, 10) == []
    room = await store.create_room("general", "public", "", alice.id, NOW)
    await store.add_message(sender=alice, text="room", now=NOW, room=room)
    await store.add_message(sender=alice, text="1", now=NOW, recipient=bob)
    await store.add_message(sender=carol, text="2", now=NOW, recipient=alice)
    await store.add_message(sender=alice, text="3", now=NOW, recipient=alice)  # a note to self
    await store.add_message(sender=dave, text="4", now=NOW, recipient=bob)
    # Both directions, the most recent first, without herself or room messages.
    assert await store.dm_partners(alice.id, 10) == [(carol.id, "carol"), (bob.id, "Bob")]
    await store.add_message(sender=bob, text="5", now=NOW, recipient=alice)
    assert await store.dm_partners(alice.id, 10) == [(bob.id, "Bob"), (carol.id, "carol")]
    assert await store.dm_partners(alice.id, 1) == [(bob.id, "Bob")]
    assert await store.dm_partners(bob.id, 10) == [(alice.id, "alice"), (dave.id, "dave")]


async def test_files(store: Store) -> None:
    alice = await store.create_user("alice", "h", NOW)
    data = bytes(range(256)) * 4  # binary, with NUL bytes
    info = FileInfo("ab" * 32, "blob.bin", len(data), "application/octet-stream")
    await store.put_file(info, data, alice.id, NOW)
    await store.put_file(info, b"ignored", alice.id, NOW)  # same hash: stored once
    assert await store.file_info(info.hash) == info
    assert await store.get_file(info.hash) == (info, data)
    assert await store.file_info("00" * 32) is None
    assert await store.get_file("00" * 32) is None
    room = await store.create_room("general", "public", "", alice.id, NOW)
    msg = await store.add_message(sender=alice, text="", now=NOW, room=room, file=info)
    (back,) = await store.room_history(room, None, 10)
    assert back == msg
    assert back.to_json()["file"] == {
        "hash": info.hash,
        "name": "blob.bin",
        "size": len(data),
        "mime": "application/octet-stream",
        "url": f"/files/{info.hash}",
    }


async def test_concurrent_writers_get_distinct_increasing_ids(store: Store) -> None:
    alice = await store.create_user("alice", "h", NOW)
    room = await store.create_room("general", "public", "", alice.id, NOW)
    sent = await asyncio.gather(
        *(store.add_message(sender=alice, text=str(i), now=NOW, room=room) for i in range(40))
    )
    ids = [m.id for m in sent]
    assert len(set(ids)) == 40
    history = await store.room_history(room, None, 100)
    assert [m.id for m in history] == sorted(ids)


async def test_schema_creation_is_idempotent(store_location: str) -> None:
    first, second = open_store(store_location), open_store(store_location)
    await asyncio.gather(first.open(), second.open())  # two instances starting together
    user = await first.create_user("alice", "h", NOW)
    assert await second.get_user("alice") == user
    await first.close()
    await second.close()


async def test_unreachable_postgres_is_store_unavailable(postgres: str) -> None:
    from tests.helpers import free_port

    url = f"postgresql://netstack:netstack@127.0.0.1:{free_port()}/netstack_test"
    store = open_store(url)
    with pytest.raises(StoreUnavailable, match="cannot connect to PostgreSQL"):
        await store.open()
    await store.close()
    bad_password = postgres.replace("netstack:netstack@", "netstack:wrong@")
    store = open_store(bad_password)
    with pytest.raises(StoreUnavailable, match="password authentication failed"):
        await store.open()


def test_redact() -> None:
    assert redact("/var/lib/chat.db") == "/var/lib/chat.db"
    assert redact("postgresql://u:secret@db:5432/chat") == "postgresql://u:***@db:5432/chat"
    assert redact("postgresql://u@db/chat") == "postgresql://u@db/chat"
    assert redact("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"


async def test_postgres_message_ids_commit_in_order(pg_url: str) -> None:
    """Backfill asks for ids above the last one seen, so an id must never become visible
    after a higher one: an insert waits while another instance's insert is uncommitted."""
    import psycopg

    from netstack.servers.chat.postgres import MESSAGE_LOCK

    store = open_store(pg_url)
    await store.open()
    try:
        alice = await store.create_user("alice", "h", NOW)
        room = await store.create_room("general", "public", "", alice.id, NOW)
        async with await psycopg.AsyncConnection.connect(pg_url) as other:  # a 2nd instance
            await other.execute("SELECT pg_advisory_xact_lock(%s)", (MESSAGE_LOCK,))
            cur = await other.execute(
                "INSERT INTO messages (ts, sender, room_id, text) VALUES (%s,%s,%s,%s)"
                " RETURNING id",
                (NOW, alice.id, room.id, "slow"),
            )
            row = await cur.fetchone()
            assert row is not None
            slow_id = row[0]
            fast = asyncio.create_task(
                store.add_message(sender=alice, text="fast", now=NOW, room=room)
            )
            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as watch:

                async def waiting_on_the_lock() -> bool:
                    cur = await watch.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE '%%pg_advisory_xact_lock%%' AND pid <> pg_backend_pid()"
                    )
                    found = await cur.fetchone()
                    return found is not None and found[0] >= 1

                await apoll_until(waiting_on_the_lock, TIMEOUT)
            assert not fast.done()
            await other.commit()
        said = await fast
        assert said.id > slow_id
        assert [m.text for m in await store.backfill(alice.id, 0, 10)] == ["slow", "fast"]
    finally:
        await store.close()
