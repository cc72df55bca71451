from __future__ import annotations

import dataclasses
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netstack.errors import LimitExceeded, LocalProtocolError, RemoteProtocolError
from netstack.proto.proxy_protocol import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    V1_MAX_BYTES,
    V2_SIGNATURE,
    ProxyHeader,
    encode,
    encode_v1,
    encode_v2,
    for_connection,
    parse,
    receive,
)
from tests.helpers import splits


def feed(chunks: list[bytes], **kwargs: int) -> tuple[ProxyHeader, int]:
    """Deliver chunks as a transport would: parse the growing buffer after each arrival.

    Every call before the last chunk must ask for more; the last must complete.
    """
    buf = b""
    for i, chunk in enumerate(chunks):
        buf += chunk
        result = parse(buf, **kwargs)
        if result is not None:
            assert i == len(chunks) - 1, f"completed early, at chunk {i} of {len(chunks)}"
            return result
    raise AssertionError("incomplete header: parse() still wants more bytes")


def feed_error(chunks: list[bytes], **kwargs: int) -> RemoteProtocolError:
    buf = b""
    for chunk in chunks:
        buf += chunk
        try:
            assert parse(buf, **kwargs) is None
        except RemoteProtocolError as exc:
            return exc
    raise AssertionError("no error raised")


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", size) + body


def ip4(a: str, b: str, sp: int, dp: int) -> bytes:
    return (
        ipaddress.IPv4Address(a).packed
        + ipaddress.IPv4Address(b).packed
        + struct.pack("!HH", sp, dp)
    )


def ip6(a: str, b: str, sp: int, dp: int) -> bytes:
    return (
        ipaddress.IPv6Address(a).packed
        + ipaddress.IPv6Address(b).packed
        + struct.pack("!HH", sp, dp)
    )


def tlv(type_: int, value: bytes) -> bytes:
    return struct.pack("!BH", type_, len(value)) + value


def unix(path: bytes) -> bytes:
    return path.ljust(108, b"\x00")


H = ProxyHeader
UNSPEC1 = H(1, "PROXY", "UNSPEC", "UNSPEC")
UNSPEC2 = H(2, "PROXY", "UNSPEC", "UNSPEC")
LOCAL = H(2, "LOCAL", "UNSPEC", "UNSPEC")
MAX_V6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"

# (id, header bytes, expected header). Every case is also fed with trailing payload.
VALID: list[tuple[str, bytes, ProxyHeader]] = [
    # spec §2.1 example
    (
        "v1-spec-example",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        H(1, "PROXY", "INET", "STREAM", "192.168.0.1", 56324, "192.168.0.11", 443),
    ),
    # spec §2.1 longest TCP4 line: 56 chars
    (
        "v1-tcp4-max",
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        H(1, "PROXY", "INET", "STREAM", "255.255.255.255", 65535, "255.255.255.255", 65535),
    ),
    (
        "v1-tcp4-zero-ports",
        b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n",
        H(1, "PROXY", "INET", "STREAM", "0.0.0.0", 0, "10.0.0.1", 0),
    ),
    # spec §2.1 longest TCP6 line: 104 chars; upper case hex is allowed, output is canonical
    (
        "v1-tcp6-max",
        f"PROXY TCP6 {MAX_V6.upper()} {MAX_V6} 65535 65535\r\n".encode(),
        H(1, "PROXY", "INET6", "STREAM", MAX_V6, 65535, MAX_V6, 65535),
    ),
    (
        "v1-tcp6-compressed",
        b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n",
        H(1, "PROXY", "INET6", "STREAM", "2001:db8::1", 1, "::1", 2),
    ),
    ("v1-unknown-short", b"PROXY UNKNOWN\r\n", UNSPEC1),
    # spec §2.1 worst case: 107 chars, the rest of an UNKNOWN line is ignored
    (
        "v1-unknown-worst-case",
        f"PROXY UNKNOWN {MAX_V6} {MAX_V6} 65535 65535\r\n".encode(),
        UNSPEC1,
    ),
    ("v1-unknown-garbage-ignored", b"PROXY UNKNOWN whatever \xff\r\n", UNSPEC1),
    (
        "v2-tcp4",
        v2(0x21, 0x11, ip4("192.168.0.1", "192.168.0.11", 56324, 443)),
        H(2, "PROXY", "INET", "STREAM", "192.168.0.1", 56324, "192.168.0.11", 443),
    ),
    (
        "v2-udp4",
        v2(0x21, 0x12, ip4("10.0.0.1", "10.0.0.2", 53, 5353)),
        H(2, "PROXY", "INET", "DGRAM", "10.0.0.1", 53, "10.0.0.2", 5353),
    ),
    (
        "v2-tcp6",
        v2(0x21, 0x21, ip6("2001:db8::1", "2001:db8::2", 1234, 443)),
        H(2, "PROXY", "INET6", "STREAM", "2001:db8::1", 1234, "2001:db8::2", 443),
    ),
    (
        "v2-udp6",
        v2(0x21, 0x22, ip6("::1", "::2", 1, 2)),
        H(2, "PROXY", "INET6", "DGRAM", "::1", 1, "::2", 2),
    ),
    (
        "v2-unix-stream",
        v2(0x21, 0x31, unix(b"/run/client.sock") + unix(b"/run/server.sock")),
        H(2, "PROXY", "UNIX", "STREAM", "/run/client.sock", None, "/run/server.sock", None),
    ),
    (
        "v2-unix-dgram-abstract",
        v2(0x21, 0x32, unix(b"\x00abstract") + unix(b"")),
        H(2, "PROXY", "UNIX", "DGRAM", "\x00abstract", None, "", None),
    ),
    (
        "v2-tcp4-tlvs",
        v2(
            0x21,
            0x11,
            ip4("1.2.3.4", "5.6.7.8", 1, 2)
            + tlv(PP2_TYPE_ALPN, b"h2")
            + tlv(PP2_TYPE_AUTHORITY, b"example.com")
            + tlv(0xE0, b""),
        ),
        H(
            2,
            "PROXY",
            "INET",
            "STREAM",
            "1.2.3.4",
            1,
            "5.6.7.8",
            2,
            ((PP2_TYPE_ALPN, b"h2"), (PP2_TYPE_AUTHORITY, b"example.com"), (0xE0, b"")),
        ),
    ),
    ("v2-local", v2(0x20, 0x00, b""), LOCAL),
    # LOCAL: "must not assume zero is presented": the block is skipped, family ignored
    ("v2-local-with-addresses", v2(0x20, 0x11, ip4("1.1.1.1", "2.2.2.2", 3, 4)), LOCAL),
    ("v2-unspec", v2(0x21, 0x00, b""), UNSPEC2),
    ("v2-unspec-with-bytes-skipped", v2(0x21, 0x00, b"\x01\x02\x03"), UNSPEC2),
    ("v2-inet-unspec-protocol", v2(0x21, 0x10, b"junk"), UNSPEC2),
    ("v2-unspec-family-stream", v2(0x21, 0x01, b""), UNSPEC2),
]


@pytest.mark.parametrize(("data", "expected"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_corpus(data: bytes, expected: ProxyHeader) -> None:
    for chunks in splits(data):
        assert feed(chunks) == (expected, len(data))
    # Bytes after the header belong to the relayed protocol and are not consumed.
    assert parse(data + b"GET / HTTP/1.1\r\n\r\n") == (expected, len(data))
    assert parse(bytearray(data)) == (expected, len(data))


def test_spec_v1_example_with_request() -> None:
    data = (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    )
    result = parse(data)
    assert result is not None
    header, consumed = result
    assert data[consumed:].startswith(b"GET / HTTP/1.1\r\n")
    assert (header.src_addr, header.src_port) == ("192.168.0.1", 56324)


def test_v1_max_lengths_match_the_spec() -> None:
    """spec §2.1: 56 chars for TCP4, 104 for TCP6, 15 and 107 for UNKNOWN."""
    sizes = {case[0]: len(case[1]) for case in VALID}
    assert sizes["v1-tcp4-max"] == 56
    assert sizes["v1-tcp6-max"] == 104
    assert sizes["v1-unknown-short"] == 15
    assert sizes["v1-unknown-worst-case"] == 107 == V1_MAX_BYTES


# (id, bytes, message fragment). Fed whole, a byte at a time and in random splits: the
# error must come out whatever the split.
INVALID: list[tuple[str, bytes, str]] = [
    ("http-request", b"GET / HTTP/1.1\r\n\r\n", "signature"),
    ("tls-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "signature"),
    ("lowercase-proxy", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "signature"),
    ("proxy-no-space", b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "signature"),
    ("v2-bad-signature-tail", V2_SIGNATURE[:11] + b"X\x21\x11\x00\x0c", "signature"),
    ("v1-bad-protocol", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
    ("v1-udp4", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
    ("v1-empty-protocol", b"PROXY \r\n", "TCP4, TCP6 or UNKNOWN"),
    ("v1-unknownx", b"PROXY UNKNOWNX\r\n", "TCP4, TCP6 or UNKNOWN"),
    ("v1-missing-port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "4 fields"),
    ("v1-extra-field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "4 fields"),
    ("v1-double-space", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "4 fields"),
    ("v1-trailing-space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "4 fields"),
    ("v1-leading-zero-ip", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "source address"),
    ("v1-ip-out-of-range", b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "source address"),
    ("v1-short-ip", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "source address"),
    ("v1-hostname", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "source address"),
    ("v1-v6-in-tcp4", b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "source address"),
    ("v1-v4-in-tcp6", b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", "destination address"),
    ("v1-v6-scope", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "source address"),
    ("v1-v6-too-long", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "source address"),
    ("v1-port-too-big", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "source port"),
    ("v1-port-leading-zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n", "destination port"),
    ("v1-port-negative", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "source port"),
    ("v1-port-plus", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "source port"),
    ("v1-port-hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 0x10 2\r\n", "source port"),
    ("v1-port-non-ascii-digit", "PROXY TCP4 1.2.3.4 5.6.7.8 1 \u0661\r\n".encode(), "port"),
    ("v1-lf-only", b"PROXY UNKNOWN\n", "CRLF"),
    ("v1-cr-only", b"PROXY UNKNOWN\rX", "CRLF"),
    ("v1-cr-inside", b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n", "CRLF"),
    ("v1-lf-inside", b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n", "CRLF"),
    ("v1-cr-cr-lf", b"PROXY UNKNOWN\r\r\n", "CRLF"),
    ("v2-version-1", v2(0x11, 0x11, ip4("1.2.3.4", "5.6.7.8", 1, 2)), "version nibble"),
    ("v2-version-3", v2(0x31, 0x11, ip4("1.2.3.4", "5.6.7.8", 1, 2)), "version nibble"),
    ("v2-command-2", v2(0x22, 0x11, ip4("1.2.3.4", "5.6.7.8", 1, 2)), "command"),
    ("v2-command-f", v2(0x2F, 0x00, b""), "command"),
    ("v2-family-4", v2(0x21, 0x41, b""), "not assigned"),
    ("v2-protocol-3", v2(0x21, 0x13, b""), "not assigned"),
    ("v2-local-bad-family", v2(0x20, 0xF0, b""), "not assigned"),
    ("v2-inet-short", v2(0x21, 0x11, ip4("1.2.3.4", "5.6.7.8", 1, 2)[:11]), "too short"),
    ("v2-inet6-short", v2(0x21, 0x21, ip4("1.2.3.4", "5.6.7.8", 1, 2)), "too short"),
    ("v2-unix-short", v2(0x21, 0x31, unix(b"/a")), "too short"),
    (
        "v2-tlv-truncated-head",
        v2(0x21, 0x11, ip4("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01\x00"),
        "TLV header truncated",
    ),
    (
        "v2-tlv-overrun",
        v2(0x21, 0x11, ip4("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01\x00\x05abc"),
        "overruns",
    ),
]


@pytest.mark.parametrize(
    ("data", "fragment"), [v[1:] for v in INVALID], ids=[v[0] for v in INVALID]
)
def test_invalid_corpus(data: bytes, fragment: str) -> None:
    for chunks in splits(data):
        exc = feed_error(chunks)
        assert fragment in str(exc)
        assert exc.status_hint == 400
        assert str(exc).startswith("invalid PROXY protocol header")


def test_bad_signature_is_refused_at_the_first_wrong_byte() -> None:
    with pytest.raises(RemoteProtocolError, match="signature"):
        parse(b"G")
    with pytest.raises(RemoteProtocolError, match="signature"):
        parse(b"PROXX")
    with pytest.raises(RemoteProtocolError, match="signature"):
        parse(b"\r\n\r\n\x01")


def test_v2_version_nibble_is_refused_before_the_length() -> None:
    with pytest.raises(RemoteProtocolError, match="version nibble"):
        parse(V2_SIGNATURE + b"\x11")


def test_prefixes_ask_for_more() -> None:
    assert parse(b"") is None
    assert parse(b"PROX") is None
    assert parse(b"PROXY") is None
    assert parse(b"PROXY TCP4 1.2.3.4") is None
    assert parse(V2_SIGNATURE[:5]) is None
    assert parse(V2_SIGNATURE + b"\x21\x11\x00") is None
    assert parse(v2(0x21, 0x11, b"", length=12)) is None  # head says 12, body missing
    assert parse(b"PROXY UNKNOWN\r") is None  # a CR at the end may still become CRLF


def test_v1_without_crlf_in_107_bytes_is_a_limit() -> None:
    line = b"PROXY UNKNOWN " + b"a" * 200
    for chunks in splits(line):
        exc = feed_error(chunks)
        assert isinstance(exc, LimitExceeded)
        assert exc.limit == "proxy_v1_line_bytes"
        assert exc.value == 107
        assert exc.status_hint == 400
    # 106 bytes without CRLF may still end in a CRLF at 107, and a CR at byte 107 cannot.
    assert parse(line[:106]) is None
    with pytest.raises(LimitExceeded):
        parse(line[:106] + b"\r")
    assert parse(line[:105] + b"\r\n") == (UNSPEC1, 107)


def test_v2_length_limit_is_checked_before_the_body() -> None:
    head = v2(0x21, 0x11, b"", length=5000)
    with pytest.raises(LimitExceeded) as info:
        parse(head)  # only the 16-byte head has arrived
    assert info.value.limit == "max_v2_bytes"
    assert info.value.actual == 5016
    assert info.value.status_hint == 400
    body = ip4("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0xE0, b"x" * 100)
    with pytest.raises(LimitExceeded):
        parse(v2(0x21, 0x11, body), max_v2_bytes=100)
    assert parse(v2(0x21, 0x11, body), max_v2_bytes=16 + len(body)) is not None


def test_v2_largest_wire_header_parses_with_a_raised_limit() -> None:
    body = ip4("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0x04, b"\x00" * (65535 - 12 - 3))
    data = v2(0x21, 0x11, body)
    result = parse(data, max_v2_bytes=16 + 65535)
    assert result is not None
    assert result[1] == 16 + 65535
    assert result[0].tlvs == ((0x04, b"\x00" * 65520),)


def test_header_helpers() -> None:
    header = parse(dict((v[0], v[1]) for v in VALID)["v2-tcp4-tlvs"])
    assert header is not None
    assert header[0].tlv(PP2_TYPE_AUTHORITY) == b"example.com"
    assert header[0].tlv(0x30) is None
    assert not header[0].is_unspecified
    assert LOCAL.is_unspecified


# ------------------------------------------------------------------------------ encode


def test_encode_v1_spec_example() -> None:
    header = H(1, "PROXY", "INET", "STREAM", "192.168.0.1", 56324, "192.168.0.11", 443)
    assert encode_v1(header) == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert encode(header) == encode_v1(header)
    assert encode_v1(UNSPEC1) == b"PROXY UNKNOWN\r\n"


def test_encode_v2_bytes() -> None:
    header = H(2, "PROXY", "INET", "STREAM", "192.168.0.1", 56324, "192.168.0.11", 443)
    assert encode_v2(header) == v2(0x21, 0x11, ip4("192.168.0.1", "192.168.0.11", 56324, 443))
    assert encode(header) == encode_v2(header)
    assert encode_v2(LOCAL) == v2(0x20, 0x00, b"")
    assert encode_v2(UNSPEC2) == v2(0x21, 0x00, b"")


def test_encode_ignores_header_version() -> None:
    header = H(2, "PROXY", "INET6", "STREAM", "::1", 1, "::2", 2)
    assert encode_v1(header) == b"PROXY TCP6 ::1 ::2 1 2\r\n"


BAD_HEADERS: list[tuple[str, ProxyHeader, str]] = [
    ("command", H(2, "NOPE", "UNSPEC", "UNSPEC"), "unknown PROXY command"),  # type: ignore[arg-type]
    ("family", H(2, "PROXY", "IPX", "STREAM"), "unknown family"),  # type: ignore[arg-type]
    ("protocol", H(2, "PROXY", "INET", "SEQPACKET"), "unknown family"),  # type: ignore[arg-type]
    ("half-unspec", H(2, "PROXY", "INET", "UNSPEC", "1.2.3.4", 1, "1.2.3.4", 2), "both"),
    ("half-unspec-2", H(2, "PROXY", "UNSPEC", "STREAM"), "both"),
    ("local-addresses", H(2, "LOCAL", "INET", "STREAM", "1.1.1.1", 1, "1.1.1.1", 1), "LOCAL"),
    ("unspec-address", H(2, "PROXY", "UNSPEC", "UNSPEC", "1.2.3.4"), "UNSPEC header"),
    ("unspec-port", H(2, "PROXY", "UNSPEC", "UNSPEC", dst_port=1), "UNSPEC header"),
    ("unspec-tlvs", H(2, "PROXY", "UNSPEC", "UNSPEC", tlvs=((1, b"x"),)), "UNSPEC header"),
    ("local-tlvs", H(2, "LOCAL", "UNSPEC", "UNSPEC", tlvs=((1, b"x"),)), "UNSPEC header"),
    ("unix-no-path", H(2, "PROXY", "UNIX", "STREAM", "/a"), "both paths"),
    ("unix-port", H(2, "PROXY", "UNIX", "STREAM", "/a", 1, "/b"), "no ports"),
    ("unix-dst-port", H(2, "PROXY", "UNIX", "STREAM", "/a", None, "/b", 1), "no ports"),
    ("no-address", H(2, "PROXY", "INET", "STREAM", None, 1, "1.2.3.4", 2), "not an IP"),
    ("hostname", H(2, "PROXY", "INET", "STREAM", "localhost", 1, "1.2.3.4", 2), "not an IP"),
    ("scope", H(2, "PROXY", "INET6", "STREAM", "fe80::1%lo", 1, "::1", 2), "not an IP"),
    ("v6-in-inet", H(2, "PROXY", "INET", "STREAM", "::1", 1, "1.2.3.4", 2), "not an INET"),
    ("v4-in-inet6", H(2, "PROXY", "INET6", "STREAM", "::1", 1, "1.2.3.4", 2), "not an INET6"),
    ("no-port", H(2, "PROXY", "INET", "STREAM", "1.2.3.4", None, "1.2.3.4", 2), "port"),
    ("port-big", H(2, "PROXY", "INET", "STREAM", "1.2.3.4", 1, "1.2.3.4", 65536), "port"),
    ("port-neg", H(2, "PROXY", "INET", "STREAM", "1.2.3.4", -1, "1.2.3.4", 1), "port"),
]


@pytest.mark.parametrize(
    ("header", "fragment"), [b[1:] for b in BAD_HEADERS], ids=[b[0] for b in BAD_HEADERS]
)
@pytest.mark.parametrize("encoder", [encode_v1, encode_v2])
def test_encode_refuses_broken_headers(header: ProxyHeader, fragment: str, encoder) -> None:
    with pytest.raises(LocalProtocolError, match=fragment):
        encoder(header)


@pytest.mark.parametrize(
    "header",
    [
        LOCAL,
        H(2, "PROXY", "UNIX", "STREAM", "/a", None, "/b", None),
        H(2, "PROXY", "INET", "DGRAM", "1.2.3.4", 1, "1.2.3.4", 2),
        H(2, "PROXY", "INET", "STREAM", "1.2.3.4", 1, "1.2.3.4", 2, ((1, b"h2"),)),
    ],
    ids=["local", "unix", "dgram", "tlvs"],
)
def test_v1_cannot_carry_v2_only_headers(header: ProxyHeader) -> None:
    with pytest.raises(LocalProtocolError, match="v2"):
        encode_v1(header)
    assert parse(encode_v2(header)) is not None


def test_encode_v2_limits() -> None:
    long_path = H(2, "PROXY", "UNIX", "STREAM", "/" + "a" * 108, None, "/b", None)
    with pytest.raises(LocalProtocolError, match="exceeds 108"):
        encode_v2(long_path)
    edge = H(2, "PROXY", "UNIX", "STREAM", "a" * 108, None, "/b", None)
    assert parse(encode_v2(edge), max_v2_bytes=1000) == (edge, 16 + 216)
    base = H(2, "PROXY", "INET", "STREAM", "1.2.3.4", 1, "1.2.3.4", 2)
    for tlvs in [((256, b""),), ((-1, b""),), ((1, b"x" * 65536),)]:
        with pytest.raises(LocalProtocolError, match="out of range"):
            encode_v2(dataclasses.replace(base, tlvs=tlvs))
    fits = dataclasses.replace(base, tlvs=((4, b"x" * 65520),))  # 12 + 3 + 65520 = 65535
    assert len(encode_v2(fits)) == 16 + 65535
    too_big = dataclasses.replace(base, tlvs=((4, b"x" * 65521),))
    with pytest.raises(LocalProtocolError, match="exceeds 65535"):
        encode_v2(too_big)


# ---------------------------------------------------------------------- for_connection


def test_for_connection_ipv4() -> None:
    header = for_connection(("203.0.113.5", 50000), ("10.0.0.1", 80))
    assert header == H(1, "PROXY", "INET", "STREAM", "203.0.113.5", 50000, "10.0.0.1", 80)
    assert encode_v1(header) == b"PROXY TCP4 203.0.113.5 10.0.0.1 50000 80\r\n"


def test_for_connection_ipv6_tuples_and_scope() -> None:
    header = for_connection(("fe80::1%eth0", 1, 0, 2), ("fe80::2", 2, 0, 2), 2)  # type: ignore[arg-type]
    assert header == H(2, "PROXY", "INET6", "STREAM", "fe80::1", 1, "fe80::2", 2)
    assert parse(encode_v2(header)) == (header, 52)


def test_for_connection_mixed_families() -> None:
    # A dual-stack listener reports an IPv4 client as IPv4-mapped: unmapped to agree.
    header = for_connection(("::ffff:192.0.2.1", 1), ("10.0.0.1", 2))
    assert (header.family, header.src_addr, header.dst_addr) == ("INET", "192.0.2.1", "10.0.0.1")
    header = for_connection(("10.0.0.1", 2), ("::ffff:192.0.2.1", 1))
    assert (header.family, header.src_addr, header.dst_addr) == ("INET", "10.0.0.1", "192.0.2.1")
    # A real IPv6 client reaching an IPv4 socket: the IPv4 side is mapped (as HAProxy does).
    header = for_connection(("2001:db8::1", 1), ("10.0.0.1", 2))
    assert header.family == "INET6"
    assert ipaddress.IPv6Address(header.dst_addr or "").ipv4_mapped == ipaddress.IPv4Address(
        "10.0.0.1"
    )
    assert parse(encode_v1(header)) == (header, len(encode_v1(header)))


def test_for_connection_unknown_and_errors() -> None:
    assert for_connection(None, ("10.0.0.1", 80)) == UNSPEC1
    assert for_connection(("10.0.0.1", 80), None, 2) == UNSPEC2
    with pytest.raises(LocalProtocolError, match="not an IP"):
        for_connection(("example.com", 1), ("10.0.0.1", 80))
    header = for_connection(("1.2.3.4", 1), ("5.6.7.8", 2), 2, tlvs=((PP2_TYPE_ALPN, b"h2"),))
    assert header.tlvs == ((PP2_TYPE_ALPN, b"h2"),)


# ------------------------------------------------------------------- encode -> parse


ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)


@st.composite
def inet_headers(draw: st.DrawFn, version: int) -> ProxyHeader:
    family = draw(st.sampled_from(["INET", "INET6"]))
    addrs = ipv4 if family == "INET" else ipv6
    protocol = "STREAM" if version == 1 else draw(st.sampled_from(["STREAM", "DGRAM"]))
    tlvs: tuple[tuple[int, bytes], ...] = ()
    if version == 2:
        tlvs = tuple(
            draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4))
        )
    return H(
        version,  # type: ignore[arg-type]
        "PROXY",
        family,
        protocol,
        draw(addrs),
        draw(ports),
        draw(addrs),
        draw(ports),
        tlvs,
    )


unix_paths = (
    st.binary(max_size=108)
    .filter(lambda b: not b.endswith(b"\x00"))
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
)


@st.composite
def unix_headers(draw: st.DrawFn) -> ProxyHeader:
    tlvs = tuple(draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=20)), max_size=8)))
    protocol = draw(st.sampled_from(["STREAM", "DGRAM"]))
    return H(2, "PROXY", "UNIX", protocol, draw(unix_paths), None, draw(unix_paths), None, tlvs)


@given(st.one_of(inet_headers(1), st.just(UNSPEC1)), st.binary(max_size=20))
def test_v1_encode_parse_identity(header: ProxyHeader, tail: bytes) -> None:
    data = encode_v1(header)
    assert len(data) <= V1_MAX_BYTES
    assert parse(data + tail) == (header, len(data))


@given(
    st.one_of(inet_headers(2), unix_headers(), st.just(UNSPEC2), st.just(LOCAL)),
    st.binary(max_size=20),
)
def test_v2_encode_parse_identity(header: ProxyHeader, tail: bytes) -> None:
    data = encode_v2(header)
    assert parse(data + tail) == (header, len(data))


@given(st.binary(max_size=120))
def test_arbitrary_bytes_parse_or_fail_cleanly(data: bytes) -> None:
    try:
        result = parse(data)
    except RemoteProtocolError:
        return
    if result is not None:
        header, consumed = result
        assert 0 < consumed <= len(data)
        # Whatever parsed is something we can write back in the same version.
        assert parse(encode(header)) is not None


@pytest.mark.parametrize(("data", "expected"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_receive_holds_a_partial_header_and_hands_back_what_follows(
    data: bytes, expected: ProxyHeader
) -> None:
    for chunks in splits(data + b"GET /"):
        pending = b""
        header = None
        fed = 0
        while header is None:
            header, pending = receive(pending, chunks[fed])
            fed += 1
        assert header == expected
        assert pending + b"".join(chunks[fed:]) == b"GET /"


def test_receive_raises_on_a_bad_start() -> None:
    header, pending = receive(b"", b"PRO")
    assert (header, pending) == (None, b"PRO")
    with pytest.raises(RemoteProtocolError):
        receive(pending, b"Z")


def test_source_and_destination_only_for_inet_families() -> None:
    tcp4 = parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n")
    assert tcp4 is not None
    assert tcp4[0].source == ("192.0.2.1", 5000)
    assert tcp4[0].destination == ("198.51.100.2", 443)
    unknown = parse(b"PROXY UNKNOWN\r\n")
    assert unknown is not None
    assert unknown[0].source is None
    assert unknown[0].destination is None
    unix = ProxyHeader(2, "PROXY", "UNIX", "STREAM", "/run/a.sock", None, "/run/b.sock", None)
    assert unix.source is None
    assert unix.destination is None
