"""StreamProtocol's glue against a recording transport and a scriptable core."""

from __future__ import annotations

import logging

import pytest

from netstack.config import Limits, Timeouts
from netstack.errors import LimitExceeded
from netstack.transport.stream import IDLE_TICKS, StreamProtocol
from tests.helpers import apoll_until
from tests.transport.fakes import RecordingTransport, ScriptCore


class Echoish(StreamProtocol[bytes]):
    """Echo each event; ``b"eof"`` half-closes; ``b"slow"`` starts async work."""

    core: ScriptCore

    def make_core(self) -> ScriptCore:
        return ScriptCore()

    def handle_event(self, event: bytes) -> None:
        if event == b"slow":
            self.begin_work()
        elif event == b"eof":
            self.core.outgoing.append(b"")
        else:
            self.core.outgoing.append(event)


class Registry:
    def __init__(self, admit: bool) -> None:
        self.admit = admit
        self.seen: list[StreamProtocol] = []

    def register(self, conn) -> bool:
        self.seen.append(conn)
        return self.admit

    def unregister(self, conn) -> None:
        self.seen.remove(conn)


def connect(**kw) -> tuple[Echoish, RecordingTransport]:
    kw.setdefault("timeouts", Timeouts(idle_timeout=None))
    proto = Echoish(**kw)
    t = RecordingTransport()
    proto.connection_made(t)  # type: ignore[arg-type]
    return proto, t


async def test_events_are_written_in_one_write_and_empty_chunk_half_closes(logs):
    proto, t = connect()
    proto.data_received(b"a|b|c")
    assert t.written == [b"abc"]
    proto.data_received(b"x|eof")
    assert t.written[-1] == b"x"
    assert t.eof_written
    t.eof_written = False
    proto.data_received(b"eof")
    assert t.eof_written
    assert proto.conn_id > 0
    proto.connection_lost(None)
    assert proto.closed is not None
    assert proto.closed.done()
    assert any(m.startswith("x conn") for m in logs.messages(logging.DEBUG))


async def test_events_before_a_protocol_error_are_served_then_closed(logs):
    proto, t = connect()
    proto.data_received(b"first|!")
    assert t.written == [b"first"]
    assert t.closing
    assert any("protocol error: bang" in m for m in logs.messages())


async def test_limit_exceeded_names_the_limit(logs):
    proto, t = connect()
    proto.reject(LimitExceeded("max_widgets", 3, actual=9))
    assert t.closing
    (warning,) = logs.messages()
    assert "max_widgets" in warning
    assert "got 9" in warning


async def test_eof_is_passed_to_the_core():
    proto, _ = connect()
    assert proto.eof_received() is None
    assert proto.core.eof


async def test_no_writes_once_closing():
    proto, t = connect()
    proto.close()
    proto.data_received(b"late")
    proto.core.outgoing.append(b"more")
    proto.flush()
    assert t.written == []


async def test_async_work_pauses_reading_and_delays_graceful_close():
    proto, t = connect()
    proto.flow.max_backlog = 2
    proto.data_received(b"slow|slow")
    assert proto.busy()
    assert not t.reading  # the app fell behind
    proto.shutdown()
    assert not t.closing  # in-flight work first
    proto.core.outgoing.append(b"done 1")
    proto.end_work()
    assert t.written == [b"done 1"]
    assert t.reading
    assert not t.closing
    proto.end_work()
    assert t.closing


async def test_shutdown_idle_closes_at_once_and_draining_closes_after_a_read():
    proto, t = connect()
    proto.shutdown()
    assert t.closing
    proto2, t2 = connect()
    proto2.data_received(b"slow")
    proto2.shutdown()
    proto2.end_work()
    assert t2.closing


async def test_registry_refusal_closes_and_registry_tracks(logs):
    refuse = Registry(admit=False)
    proto, t = connect(registry=refuse)
    assert t.closing
    proto.connection_lost(None)
    admit = Registry(admit=True)
    proto2, t2 = connect(registry=admit)
    assert admit.seen == [proto2]
    assert not t2.closing
    proto2.connection_lost(None)
    assert admit.seen == []


async def test_write_buffer_limits_from_config():
    proto, t = connect(limits=Limits(write_buffer_high_bytes=1000, write_buffer_low_bytes=10))
    assert t.limits == (1000, 10)
    proto.pause_writing()
    assert not t.reading
    proto.resume_writing()
    assert t.reading


@pytest.mark.parametrize("unsent", [0, 10])
async def test_idle_timeout_closes_or_aborts(unsent, logs):
    proto, t = connect(timeouts=Timeouts(idle_timeout=0.05))
    t.buffered = unsent
    proto.data_received(b"keepalive")  # pushes the deadline: the timer re-arms once
    await apoll_until(lambda: t.closing)
    assert t.aborted == bool(unsent)
    assert any("idle" in m for m in logs.messages(logging.DEBUG))
    proto.connection_lost(None)
    await proto.wait_closed()


async def test_idle_close_is_never_early_and_at_most_one_tick_late():
    proto, t = connect(timeouts=Timeouts(idle_timeout=100.0))

    def tick() -> None:  # run the idle check now instead of waiting for its timer
        assert proto._idle_handle is not None
        proto._idle_handle.cancel()
        proto._check_idle()

    for _ in range(IDLE_TICKS - 1):
        tick()
    proto.data_received(b"keepalive")  # one silent tick short of a close
    tick()  # sees the read: the silence counts from here, up to one tick after the read
    for _ in range(IDLE_TICKS - 1):
        tick()
    assert not t.closing
    tick()
    assert t.closing
    proto.connection_lost(None)


class Buggy(Echoish):
    def handle_event(self, event: bytes) -> None:
        raise ZeroDivisionError("a bug")


async def test_a_bug_in_the_handler_is_logged_once_with_traceback_and_aborts(logs):
    proto = Buggy(timeouts=Timeouts(idle_timeout=None))
    t = RecordingTransport()
    proto.connection_made(t)  # type: ignore[arg-type]
    proto.data_received(b"boom")
    assert t.aborted
    (error,) = [r for r in logs.records if r.levelno == logging.ERROR]
    assert error.exc_info is not None
    assert error.conn_id == proto.conn_id


async def test_a_bug_after_eof_is_contained_too(logs):
    proto = Buggy(timeouts=Timeouts(idle_timeout=None))
    t = RecordingTransport()
    proto.connection_made(t)  # type: ignore[arg-type]
    proto.core.events.append(b"pending")
    assert proto.eof_received() is None
    assert t.aborted
