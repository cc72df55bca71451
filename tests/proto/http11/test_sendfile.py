"""Body bytes written out of band (os.sendfile) are accounted for by the connection."""

from __future__ import annotations

import pytest

from netstack.config import HTTPLimits
from netstack.errors import LocalProtocolError
from netstack.proto.http11 import END_OF_MESSAGE, HTTPConnection, State


def connection(request: bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") -> HTTPConnection:
    conn = HTTPConnection(HTTPLimits())
    conn.receive_data(request)
    conn.events_received()
    return conn


def test_bytes_sent_elsewhere_complete_a_content_length_body() -> None:
    conn = connection()
    conn.send_head(200, [(b"content-length", b"10")])
    assert conn.sending_body
    conn.send_body_elsewhere(4)
    conn.send_body_elsewhere(6)
    conn.send(END_OF_MESSAGE)
    assert conn.our_state is State.IDLE


@pytest.mark.parametrize("count", [-1, 11])
def test_more_than_is_due_or_a_negative_count_is_refused(count: int) -> None:
    conn = connection()
    conn.send_head(200, [(b"content-length", b"10")])
    with pytest.raises(LocalProtocolError):
        conn.send_body_elsewhere(count)


def test_out_of_band_bytes_need_a_length_framed_response() -> None:
    conn = connection()
    with pytest.raises(LocalProtocolError):
        conn.send_body_elsewhere(1)  # no response started
    conn.send_head(200, [])  # chunked
    with pytest.raises(LocalProtocolError):
        conn.send_body_elsewhere(1)


def test_head_has_no_body_to_send() -> None:
    conn = connection(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.send_head(200, [(b"content-length", b"10")])
    assert not conn.sending_body


def test_eof_mid_body_after_an_early_closing_response_reports_nothing() -> None:
    """Found by the Hypothesis machine: a PUT whose body never came, answered early with
    Connection: close, then EOF. We are closing; no ConnectionClosed mid-message."""
    for parser in ("httptools", "h11"):
        conn = HTTPConnection(HTTPLimits(), parser)
        conn.receive_data(
            b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
        )
        conn.events_received()
        conn.send_response(200, [(b"content-length", b"2"), (b"connection", b"close")], b"ok")
        assert conn.our_state is State.MUST_CLOSE
        conn.receive_eof()
        assert conn.events_received() == []


def test_eof_between_messages_after_a_closing_response_is_reported() -> None:
    from netstack.proto.http11 import ConnectionClosed

    conn = connection(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    conn.send_response(200, [(b"content-length", b"0")])
    conn.receive_eof()
    assert conn.events_received() == [ConnectionClosed()]
