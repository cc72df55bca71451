"""The writer: status lines, header blocks, request heads, chunks."""

from __future__ import annotations

import pytest

from netstack.errors import LocalProtocolError
from netstack.proto.http11 import write


def test_status_line_memoised_and_bounded() -> None:
    assert write.status_line(200) == b"HTTP/1.1 200 OK\r\n"
    assert write.status_line(299) == b"HTTP/1.1 299 \r\n"  # no standard phrase
    assert write.status_line(200, b"Fine", b"1.0") == b"HTTP/1.0 200 Fine\r\n"
    for i in range(600):
        write.status_line(200, b"reason %d" % i)
    assert len(write._STATUS_LINES) <= 512


@pytest.mark.parametrize(("status", "reason"), [(99, b""), (1000, b""), (200, b"a\nb")])
def test_bad_status_line(status: int, reason: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        write.status_line(status, reason)


def test_reason_phrase() -> None:
    assert write.reason_phrase(404) == b"Not Found"
    assert write.reason_phrase(599) == b""


def test_encode_headers_checks_names_and_values() -> None:
    assert write.encode_headers([(b"a", b"1")], b"t: 2\r\n") == b"a: 1\r\nt: 2\r\n\r\n"
    assert write.encode_headers([(b"a", b"tab\there \xff")]) == b"a: tab\there \xff\r\n\r\n"
    for bad in [
        [(b"a", b"1\r\nb: 2")],
        [(b"a\tb", b"1")],
        [(b"a b", b"1")],
        [(b"a", b"\x7f")],
        [(b"a", b"1\r"), (b"b", b"2\n")],
    ]:
        with pytest.raises(LocalProtocolError):
            write.encode_headers(bad)


def test_good_names_cache_is_bounded() -> None:
    for i in range(1100):
        write.encode_headers([(b"x-name-%d" % i, b"v")])
    assert len(write._GOOD_NAMES) <= 1025


def test_encode_request_head() -> None:
    head = write.encode_request_head(b"GET", b"/a?b", [(b"host", b"h")])
    assert head == b"GET /a?b HTTP/1.1\r\nhost: h\r\n\r\n"
    for _ in range(2):  # checked once, then known
        assert write.encode_request_head(b"PURGE", b"*", []) == b"PURGE * HTTP/1.1\r\n\r\n"
    assert b"PURGE" in write._GOOD_METHODS
    for i in range(100):
        write.encode_request_head(b"M%d" % i, b"/", [])
    assert len(write._GOOD_METHODS) <= 64
    for method, target in [(b"G T", b"/"), (b"GET", b""), (b"GET", b"/a b"), (b"GET", b"/\xff")]:
        with pytest.raises(LocalProtocolError):
            write.encode_request_head(method, target, [])


def test_check_header_block() -> None:
    write.check_header_block(b"")
    write.check_header_block(b"host: h\r\nx-a: b\tc \x80\r\n")
    for bad in [
        b"x: a\x01b\r\n",  # a control character
        b"x: a\x7f\r\n",  # DEL
        b"x: a\nb: c\r\n",  # a bare LF (a smuggled header line)
        b"x: a\rb\r\n",  # a bare CR
        b"x: a\r\ny: b",  # the last line unterminated
    ]:
        with pytest.raises(LocalProtocolError):
            write.check_header_block(bad)


def test_chunks() -> None:
    assert write.encode_chunk(b"") == b""
    assert write.encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert write.encode_trailers([]) == b"0\r\n\r\n"
    assert write.encode_trailers([(b"t", b"1")]) == b"0\r\nt: 1\r\n\r\n"
