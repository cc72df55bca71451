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
