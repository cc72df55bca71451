"""FlowControl against a recording transport."""

from __future__ import annotations

import asyncio

import pytest

from netstack.errors import ConnectionClosed
from netstack.transport.flow import FlowControl
from tests.transport.fakes import RecordingTransport


def make(max_backlog: int = 4) -> tuple[FlowControl, RecordingTransport]:
    t = RecordingTransport()
    return FlowControl(t, high=100, low=10, max_backlog=max_backlog), t  # type: ignore[arg-type]


def test_sets_water_marks_and_pauses_reading_while_writes_back_up():
    flow, t = make()
    assert t.limits == (100, 10)
    flow.pause_writing()
    assert not t.reading
    assert flow.reading_paused
    assert flow.pauses == 1
    flow.resume_writing()
    assert t.reading
    assert not flow.reading_paused


def test_app_backlog_pauses_with_hysteresis():
    flow, t = make(max_backlog=4)
    flow.set_backlog(3)
    assert t.reading
    flow.set_backlog(4)
    assert not t.reading
    flow.set_backlog(3)  # still above half
    assert not t.reading
    flow.set_backlog(2)
    assert t.reading


def test_both_reasons_must_clear_before_reading_resumes():
    flow, t = make(max_backlog=2)
    flow.pause_writing()
    flow.set_backlog(2)
    flow.resume_writing()
    assert not t.reading
    flow.set_backlog(0)
    assert t.reading


def test_no_pause_on_a_closing_transport():
    flow, t = make()
    t.closing = True
    flow.pause_writing()
    assert t.reading
    assert flow.pauses == 0


async def test_drain_waits_for_resume_writing():
    flow, _ = make()
    await flow.drain()  # not paused: returns at once
    flow.pause_writing()
    waiter = asyncio.ensure_future(flow.drain())
    await asyncio.sleep(0)
    assert not waiter.done()
    flow.resume_writing()
    await asyncio.wait_for(waiter, 1)


async def test_drain_fails_when_the_connection_is_lost():
    flow, _ = make()
    flow.pause_writing()
    waiter = asyncio.ensure_future(flow.drain())
    await asyncio.sleep(0)
    flow.connection_lost()
    with pytest.raises(ConnectionClosed):
        await waiter
    with pytest.raises(ConnectionClosed):
        await flow.drain()
    flow.pause_writing()  # after close: no transport calls
    flow.resume_writing()
