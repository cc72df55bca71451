"""Serialising HTTP/1.1 messages: status lines, header blocks, chunks (RFC 9112).

Both parsers share this writer, so what netstack sends never depends on the parser.
Header names and values are checked here, because a CR or LF in a value that came from
an application would let it inject headers or a second response (response splitting).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Final

from netstack.errors import LocalProtocolError

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §5.6.2 token characters.
_TOKEN: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5: field values are VCHAR, obs-text, SP and HTAB; never CR, LF or NUL.
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# Control characters other than HTAB, CR and LF (those two are counted instead).
_BAD_BLOCK: Final = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_GOOD_NAMES: set[bytes] = set()
_GOOD_METHODS: set[bytes] = {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"}
# Control characters, space, DEL and non-ASCII cannot appear in a request-target.
_BAD_TARGET: Final = re.compile(rb"[\x00-\x20\x7f-\xff]")

_REASONS: Final = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_STATUS_LINES: dict[tuple[int, bytes, bytes], bytes] = {}

LAST_CHUNK: Final = b"0\r\n\r\n"


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status``, or ``b""``."""
    return _REASONS.get(status, b"")


def status_line(status: int, reason: bytes = b"", version: bytes = b"1.1") -> bytes:
    """``HTTP/1.1 200 OK\\r\\n``, memoised (a server sends a handful of distinct ones)."""
    key = (status, reason, version)
    line = _STATUS_LINES.get(key)
    if line is None:
        if not 100 <= status <= 999:
            raise LocalProtocolError(f"status code {status} is not three digits")
        if _BAD_VALUE.search(reason):
            raise LocalProtocolError("reason phrase contains a control character")
        line = b"HTTP/%s %d %s\r\n" % (version, status, reason or reason_phrase(status))
        if len(_STATUS_LINES) < 512:  # bounded: apps could invent reason phrases
            _STATUS_LINES[key] = line
    return line


def check_header(name: bytes, value: bytes) -> None:
    """Raise LocalProtocolError unless ``name: value`` is a legal header line."""
    if _TOKEN.fullmatch(name) is None:
        raise LocalProtocolError(f"illegal header name {name!r}")
    if _BAD_VALUE.search(value) is not None:
        raise LocalProtocolError(f"illegal character in the value of header {name!r}")


def encode_headers(headers: Sequence[tuple[bytes, bytes]], trusted: bytes = b"") -> bytes:
    """Header lines plus the blank line that ends the head, each checked.

    The check is done on the joined block (one regex pass and two counts) and only falls
    back to a per-header check to name the culprit; names already seen are remembered.

    Args:
        trusted: lines already serialised and checked by the caller, appended as is.
    """
    block = b"".join([name + b": " + value + b"\r\n" for name, value in headers])
    n = len(headers)
    if (
        _BAD_BLOCK.search(block) is not None
        or block.count(b"\n") != n
        or block.count(b"\r") != n
        or not _GOOD_NAMES.issuperset([name for name, _ in headers])
    ):
        for name, value in headers:
            check_header(name, value)
        if len(_GOOD_NAMES) < 1024:  # bounded: names come from applications
            _GOOD_NAMES.update(name for name, _ in headers)
    return block + trusted + b"\r\n"


def check_header_block(block: bytes) -> None:
    """Raise LocalProtocolError unless ``block`` is whole header lines free of control
    characters (other than HTAB) and of stray CR or LF.

    For a caller that serialised ``name: value\r\n`` lines itself from names it knows to
    be tokens (parsed ones, configured ones): one regex pass and three counts.
    """
    lines = block.count(b"\r\n")
    if (
        _BAD_BLOCK.search(block) is not None
        or block.count(b"\n") != lines
        or block.count(b"\r") != lines
        or (block and not block.endswith(b"\r\n"))
    ):
        raise LocalProtocolError("illegal character in a header value")


def encode_request_line(method: bytes, target: bytes) -> bytes:
    """``GET / HTTP/1.1\\r\\n``, checked: the method is a token, the target has no
    space, control or non-ASCII byte."""
    if method not in _GOOD_METHODS:
        if _TOKEN.fullmatch(method) is None:
            raise LocalProtocolError(f"illegal method {method!r}")
        if len(_GOOD_METHODS) < 64:  # bounded: methods come from clients
            _GOOD_METHODS.add(method)
    if not target or _BAD_TARGET.search(target) is not None:
        raise LocalProtocolError(f"illegal request target {target!r}")
    return method + b" " + target + b" HTTP/1.1\r\n"


def encode_request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """A request line and headers, as a client (the L7 balancer) sends them."""
    return encode_request_line(method, target) + encode_headers(headers)


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; empty data encodes to nothing (not the last chunk)."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


def encode_trailers(headers: Headers) -> bytes:
    """The last chunk, with trailer fields if any."""
    if not headers:
        return LAST_CHUNK
    return b"0\r\n" + encode_headers(headers)
