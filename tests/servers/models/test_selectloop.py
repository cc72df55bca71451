"""The from-scratch event loop on its own: timers, tasks, readiness, cancellation."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator

import pytest

from netstack.servers.models.selectloop import (
    CancelledError,
    Future,
    InvalidStateError,
    SelectLoop,
)
from tests.helpers import TIMEOUT


@pytest.fixture
def loop() -> Iterator[SelectLoop]:
    lp = SelectLoop()
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_timers_fire_in_time_order(loop: SelectLoop) -> None:
    fired: list[str] = []
    loop.call_later(0.03, fired.append, "third")
    loop.call_later(0.01, fired.append, "first")
    loop.call_later(0.02, fired.append, "second")
    when = loop.time() + 0.04
    loop.call_at(when, fired.append, "tie-1")
    loop.call_at(when, fired.append, "tie-2")  # same time: call order
    loop.call_at(when, loop.stop)
    loop.run_forever()
    assert fired == ["first", "second", "third", "tie-1", "tie-2"]


def test_call_soon_is_fifo_and_new_callbacks_wait_a_turn(loop: SelectLoop) -> None:
    order: list[str] = []

    def first() -> None:
        order.append("first")
        loop.call_soon(order.append, "scheduled by first")

    loop.call_soon(first)
    loop.call_soon(order.append, "second")
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert order == ["first", "second"]  # stop took effect after this iteration
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert order[-1] == "scheduled by first"


def test_call_later_cancel(loop: SelectLoop) -> None:
    fired: list[str] = []
    handle = loop.call_later(0.01, fired.append, "cancelled")
    loop.call_later(0.02, fired.append, "kept")
    loop.call_later(0.03, loop.stop)
    handle.cancel()
    handle.cancel()  # idempotent
    assert handle.cancelled
    loop.run_forever()
    assert fired == ["kept"]


def test_cancelled_timers_are_purged(loop: SelectLoop) -> None:
    handles = [loop.call_later(60, lambda: None) for _ in range(300)]
    for h in handles[:250]:
        h.cancel()
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert len(loop._timers) == 50
    for h in handles[250:]:
        h.cancel()


def test_sleep_waits_at_least_the_delay(loop: SelectLoop) -> None:
    async def main() -> float:
        start = loop.time()
        assert await loop.sleep(0.05, "value") == "value"
        return loop.time() - start

    assert loop.run_until_complete(main()) >= 0.05


def test_two_tasks_interleave(loop: SelectLoop) -> None:
    trace: list[str] = []

    async def worker(name: str) -> str:
        for i in range(3):
            trace.append(f"{name}{i}")
            await loop.sleep(0)
        return name

    async def main() -> list[str]:
        a = loop.create_task(worker("a"))
        b = loop.create_task(worker("b"))
        return [await a, await b]

    assert loop.run_until_complete(main()) == ["a", "b"]
    assert trace == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_exception_in_task_propagates(loop: SelectLoop) -> None:
    async def boom() -> None:
        await loop.sleep(0)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        loop.run_until_complete(boom())

    async def awaits_failed_task() -> str:
        task = loop.create_task(boom())
        try:
            await task
        except ValueError as exc:
            assert isinstance(task.exception(), ValueError)
            return f"caught {exc}"
        return "not raised"

    assert loop.run_until_complete(awaits_failed_task()) == "caught boom"


def test_exception_in_callback_is_logged_and_loop_continues(
    loop: SelectLoop, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("netstack"), "propagate", True)

    def bad() -> None:
        raise RuntimeError("callback failed")

    ran: list[bool] = []
    loop.call_soon(bad)
    loop.call_soon(ran.append, True)
    loop.call_soon(loop.stop)
    with caplog.at_level(logging.ERROR, logger="netstack"):
        loop.run_forever()
    assert ran == [True]
    assert "callback failed" in caplog.text


def test_sock_recv_waits_for_readiness(loop: SelectLoop, pair) -> None:
    a, b = pair

    async def main() -> bytes:
        loop.call_later(0.02, b.send, b"hello")
        return await loop.sock_recv(a, 100)

    assert loop.run_until_complete(main()) == b"hello"
    assert not loop.remove_reader(a)  # the wait unregistered itself


def test_sock_sendall_waits_while_buffer_is_full(loop: SelectLoop, pair) -> None:
    a, b = pair
    data = b"z" * 4_000_000  # far more than a socketpair buffers

    async def reader() -> int:
        got = 0
        while got < len(data):
            chunk = await loop.sock_recv(b, 65536)
            assert chunk
            got += len(chunk)
        return got

    async def main() -> int:
        task = loop.create_task(reader())
        await loop.sock_sendall(a, data)
        return await task

    assert loop.run_until_complete(main()) == len(data)


def test_accept_and_connect(loop: SelectLoop) -> None:
    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        client.setblocking(False)

        async def main() -> bytes:
            accept = loop.create_task(loop.sock_accept(listener))
            await loop.sock_connect(client, listener.getsockname())
            conn, _addr = await accept
            with conn:
                assert conn.getblocking() is False
                await loop.sock_sendall(client, b"ping")
                return await loop.sock_recv(conn, 10)

        assert loop.run_until_complete(main()) == b"ping"


def test_connect_refused_raises(loop: SelectLoop) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connects are refused
        with socket.socket() as client:
            client.setblocking(False)
            with pytest.raises(ConnectionRefusedError):
                loop.run_until_complete(loop.sock_connect(client, ("127.0.0.1", port)))


def test_cancel_task_waiting_on_socket(loop: SelectLoop, pair) -> None:
    a, _b = pair

    async def main() -> None:
        task = loop.create_task(loop.sock_recv(a, 10))
        await loop.sleep(0)
        await loop.sleep(0)
        assert task.cancel()
        with pytest.raises(CancelledError):
            await task
        assert task.cancelled()
        assert not loop.remove_reader(a)  # the cancelled wait left no registration

    loop.run_until_complete(main())


def test_cancel_before_first_step_and_caught_cancel(loop: SelectLoop) -> None:
    async def stubborn() -> str:
        try:
            await loop.sleep(10)
        except CancelledError:
            return "cleaned up"
        return "slept"

    async def never_runs() -> None:
        raise AssertionError("not reached")

    async def main() -> str:
        early = loop.create_task(never_runs())
        early.cancel()  # scheduled but not started: CancelledError thrown at its first step
        task = loop.create_task(stubborn())
        await loop.sleep(0.01)
        task.cancel()
        with pytest.raises(CancelledError):
            await early
        return await task

    assert loop.run_until_complete(main()) == "cleaned up"


def test_cancelled_run_until_complete_raises(loop: SelectLoop) -> None:
    async def main() -> None:
        loop.current_task().cancel()  # type: ignore[union-attr]
        await loop.sleep(1)

    with pytest.raises(CancelledError):
        loop.run_until_complete(main())


def test_call_soon_threadsafe_wakes_a_blocked_loop(loop: SelectLoop) -> None:
    woke = threading.Event()

    def poke() -> None:
        loop.call_soon_threadsafe(woke.set)
        loop.call_soon_threadsafe(loop.stop)

    timer = threading.Timer(0.05, poke)
    timer.start()
    guard = loop.call_later(TIMEOUT, loop.stop)  # fail rather than hang
    loop.run_forever()
    guard.cancel()
    timer.join()
    assert woke.is_set()


def test_reader_and_writer_on_one_fd(loop: SelectLoop, pair) -> None:
    a, b = pair
    events: list[str] = []
    b.send(b"x")
    loop.add_writer(a, events.append, "w")
    loop.add_reader(a, events.append, "r")
    loop.add_reader(a, events.append, "r2")  # replaces the first reader
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert sorted(events) == ["r2", "w"]
    assert loop.remove_writer(a)
    assert not loop.remove_writer(a)
    assert loop.remove_reader(a)
    assert not loop.remove_reader(a)
    loop.add_writer(a.fileno(), lambda: None)
    loop.add_writer(a.fileno(), lambda: None)
    assert loop.remove_writer(a.fileno())


def test_future_api(loop: SelectLoop) -> None:
    fut: Future[int] = loop.create_future()
    with pytest.raises(InvalidStateError):
        fut.result()
    with pytest.raises(InvalidStateError):
        fut.exception()
    fut.set_result(3)
    assert fut.result() == 3
    assert fut.exception() is None
    with pytest.raises(InvalidStateError):
        fut.set_result(4)
    assert not fut.cancel()
    seen: list[int] = []
    fut.add_done_callback(lambda f: seen.append(f.result()))
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert seen == [3]

    failed: Future[int] = loop.create_future()
    failed.set_exception(KeyError("k"))
    assert isinstance(failed.exception(), KeyError)
    cancelled: Future[int] = loop.create_future()
    assert cancelled.cancel()
    with pytest.raises(CancelledError):
        cancelled.exception()
    assert loop.run_until_complete(_resolved(loop)) == "done"


async def _resolved(loop: SelectLoop) -> str:
    fut: Future[str] = loop.create_future()
    loop.call_later(0.01, fut.set_result, "done")
    return await fut


def test_awaiting_a_foreign_awaitable_fails(loop: SelectLoop) -> None:
    class Foreign:
        def __await__(self):
            yield 42

    async def main() -> None:
        await Foreign()

    with pytest.raises(RuntimeError, match="not a future of its loop"):
        loop.run_until_complete(main())


def test_stop_before_completion_and_lifecycle_errors(loop: SelectLoop) -> None:
    async def stops_early() -> None:
        loop.stop()
        await loop.sleep(10)

    coro = stops_early()
    with pytest.raises(RuntimeError, match="stopped before"):
        loop.run_until_complete(coro)

    def nested() -> None:
        assert loop.is_running()
        with pytest.raises(RuntimeError, match="already running"):
            loop.run_forever()
        with pytest.raises(RuntimeError, match="running loop"):
            loop.close()
        loop.stop()

    loop.call_soon(nested)
    loop.run_forever()
    assert not loop.is_running()
    loop.close()
    loop.close()  # idempotent
    orphan = _resolved(loop)
    with pytest.raises(RuntimeError, match="closed"):
        loop.create_task(orphan)
    orphan.close()
    coro.close()
