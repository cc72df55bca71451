from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netstack.errors import ConfigError, LocalProtocolError
from netstack.proto.forwarded import (
    ClientInfo,
    Headers,
    TrustedPeers,
    append_forwarded,
    resolve,
    strip_forwarding_headers,
)

LB = ("10.0.0.2", 40000)  # the direct peer: a trusted proxy in most cases
TRUST = TrustedPeers(["10.0.0.0/24", "192.168.1.1", "fd00::/8"])


def h(*pairs: tuple[str, str]) -> Headers:
    return [(n.encode(), v.encode("latin-1")) for n, v in pairs]


def info(addr: str | None, port: int | None, scheme: str = "http", host: str | None = None):
    return ClientInfo(addr, port, scheme, host, proxied=True)


# ------------------------------------------------------------------------ TrustedPeers


def test_trusted_peers_entries() -> None:
    assert TRUST.contains("10.0.0.99")
    assert TRUST.contains("192.168.1.1")
    assert not TRUST.contains("192.168.1.2")
    assert TRUST.contains("fd00::1")
    assert TRUST.contains("FD00:0::1")  # any spelling of the address
    assert not TRUST.contains("2001:db8::1")
    assert TRUST.contains("::ffff:10.0.0.5")  # IPv4-mapped matches the IPv4 network
    assert TRUST.contains("::ffff:192.168.1.1")  # and the IPv4 literal
    assert not TRUST.contains("fe80::1%eth0")
    assert not TRUST.contains("unknown")
    assert not TRUST.contains("_hidden")
    assert not TRUST.contains(None)  # UNIX socket peers need "unix" (or "*")
    assert "10.0.0.1" in TRUST


def test_trusted_peers_defaults_star_unix_and_string() -> None:
    default = TrustedPeers()
    assert default.contains("127.0.0.1")
    assert default.contains("::1")
    assert not default.contains("127.0.0.2")
    star = TrustedPeers("*")
    assert star.contains("203.0.113.9")
    assert star.contains(None)
    assert star.contains("not-an-ip")
    mixed = TrustedPeers(" 127.0.0.1 , unix ,, ")
    assert mixed.contains(None)
    assert mixed.contains("127.0.0.1")
    assert not mixed.contains("10.0.0.1")
    assert repr(mixed) == "TrustedPeers(['unix', '127.0.0.1'])"
    assert (
        repr(TrustedPeers(["*", "10.0.0.0/8", "::1"])) == "TrustedPeers(['*', '::1', '10.0.0.0/8'])"
    )


@pytest.mark.parametrize("entry", ["localhost", "10.0.0.1/8", "10.0.0.0/33", "1.2.3", "fe80::1%lo"])
def test_trusted_peers_reject_bad_entries(entry: str) -> None:
    with pytest.raises(ConfigError, match="trusted proxy"):
        TrustedPeers([entry])


# ------------------------------------------------------------------ resolve: X-Forwarded


XF_CASES: list[tuple[str, Headers, ClientInfo]] = [
    ("no-headers", [], info("10.0.0.2", 40000)),
    ("one-hop", h(("x-forwarded-for", "203.0.113.7")), info("203.0.113.7", None)),
    (
        "proto-host",
        h(
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "HTTPS"),
            ("x-forwarded-host", "example.com:8443"),
        ),
        info("203.0.113.7", None, "https", "example.com:8443"),
    ),
    (
        "skip-trusted-hops",
        h(("x-forwarded-for", "198.51.100.1, 203.0.113.7, 10.0.0.3, 192.168.1.1")),
        info("203.0.113.7", None),
    ),
    (
        "several-field-lines",
        h(("x-forwarded-for", "198.51.100.1, 203.0.113.7"), ("x-forwarded-for", "10.0.0.3")),
        info("203.0.113.7", None),
    ),
    (
        "all-trusted-takes-leftmost",
        h(("x-forwarded-for", "10.0.0.5, 10.0.0.6")),
        info("10.0.0.5", None),
    ),
    (
        "client-garbage-left-of-client-ignored",
        h(("x-forwarded-for", "<script>, not an ip, 203.0.113.7")),
        info("203.0.113.7", None),
    ),
    (
        "empty-items-dropped",
        h(("x-forwarded-for", " , 203.0.113.7 ,, ")),
        info("203.0.113.7", None),
    ),
    ("ipv4-with-port", h(("x-forwarded-for", "203.0.113.7:5555")), info("203.0.113.7", 5555)),
    ("bare-ipv6", h(("x-forwarded-for", "2001:DB8::1")), info("2001:db8::1", None)),
    ("bracketed-ipv6", h(("x-forwarded-for", "[2001:db8::1]")), info("2001:db8::1", None)),
    ("bracketed-ipv6-port", h(("x-forwarded-for", "[2001:db8::1]:443")), info("2001:db8::1", 443)),
    ("obfuscated-port", h(("x-forwarded-for", "203.0.113.7:_p1")), info("203.0.113.7", None)),
    ("unknown", h(("x-forwarded-for", "unknown")), info("unknown", None)),
    ("obfuscated", h(("x-forwarded-for", "_gazonk")), info("_gazonk", None)),
    (
        # Each proxy appended its proto: the client's is at the client's position.
        "proto-aligned-with-hops",
        h(
            ("x-forwarded-for", "203.0.113.7, 10.0.0.3"),
            ("x-forwarded-proto", "https, http"),
            ("x-forwarded-host", "public.example, internal.example"),
        ),
        info("203.0.113.7", None, "https", "public.example"),
    ),
    (
        # A proxy that sets instead of appending leaves one entry: it is used.
        "proto-fewer-entries-than-hops",
        h(("x-forwarded-for", "203.0.113.7, 10.0.0.3"), ("x-forwarded-proto", "https")),
        info("203.0.113.7", None, "https"),
    ),
    (
        "proto-without-for",
        h(("x-forwarded-proto", "https"), ("x-forwarded-host", "[::1]:8080")),
        info("10.0.0.2", 40000, "https", "[::1]:8080"),
    ),
    (
        "bad-proto-and-host-ignored",
        h(
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "javascript"),
            ("x-forwarded-host", "evil.example/path"),
        ),
        info("203.0.113.7", None),
    ),
    (
        "other-family-ignored",
        h(("forwarded", "for=198.51.100.9"), ("x-real-ip", "198.51.100.9")),
        info("10.0.0.2", 40000),
    ),
]


@pytest.mark.parametrize(
    ("headers", "expected"), [c[1:] for c in XF_CASES], ids=[c[0] for c in XF_CASES]
)
def test_resolve_x_forwarded(headers: Headers, expected: ClientInfo) -> None:
    assert resolve(LB, headers, TRUST, "http") == expected


# Chains that cannot be parsed where they are walked: the peer, not proxied.
XF_UNPARSABLE = [
    "203.0.113.7, garbage",
    "203.0.113.7, 10.0.0.3, 1.2.3",
    "example.com",
    "[2001:db8::1",
    "[2001:db8::1]x",
    "[203.0.113.7]",
    "[2001:db8::1]:",
    "203.0.113.7:",
    "203.0.113.7:99999",
    "203.0.113.7:http",
    "fe80::1%eth0",
    "_",
]


@pytest.mark.parametrize("value", XF_UNPARSABLE)
def test_resolve_x_forwarded_unparsable(value: str) -> None:
    headers = h(("x-forwarded-for", value), ("x-forwarded-proto", "https"))
    assert resolve(LB, headers, TRUST, "http") == ClientInfo(
        "10.0.0.2", 40000, "http", None, proxied=False
    )


def test_untrusted_peer_is_the_client() -> None:
    headers = h(("x-forwarded-for", "1.1.1.1"), ("x-forwarded-proto", "https"))
    peer = ("203.0.113.50", 1234)
    assert resolve(peer, headers, TRUST, "http") == ClientInfo(
        "203.0.113.50", 1234, "http", None, proxied=False
    )
    assert resolve(peer, headers, TRUST, "https", source="forwarded").scheme == "https"


def test_unix_socket_peer() -> None:
    headers = h(("x-forwarded-for", "203.0.113.7"))
    assert resolve(None, headers, TRUST, "http") == ClientInfo(None, None, "http", None, False)
    assert resolve(None, headers, TrustedPeers(["unix"]), "http") == info("203.0.113.7", None)


def test_ipv6_peer_four_tuple() -> None:
    peer = ("fd00::5", 40000, 0, 0)
    got = resolve(peer, h(("x-forwarded-for", "203.0.113.7")), TRUST, "http")  # type: ignore[arg-type]
    assert got == info("203.0.113.7", None)


# -------------------------------------------------------------------- resolve: RFC 7239


FWD_CASES: list[tuple[str, list[str], ClientInfo]] = [
    ("no-header", [], info("10.0.0.2", 40000)),
    ("empty-list", [" , ,"], info("10.0.0.2", 40000)),
    ("rfc-example-for", ['for="_gazonk"'], info("_gazonk", None)),
    (
        "rfc-example-ipv6",
        ['For="[2001:db8:cafe::17]:4711"'],
        info("2001:db8:cafe::17", 4711),
    ),
    (
        "rfc-example-proto-by",
        ["for=192.0.2.60;proto=http;by=203.0.113.43"],
        info("192.0.2.60", None, "http"),
    ),
    (
        "rfc-example-list",
        ["for=192.0.2.43, for=198.51.100.17"],
        info("198.51.100.17", None),
    ),
    (
        "rfc-example-two-lines",
        ["for=192.0.2.43", "for=198.51.100.17;by=10.0.0.3"],
        info("198.51.100.17", None),
    ),
    (
        "skip-trusted-and-take-element-params",
        [
            'for=198.51.100.1, for=203.0.113.7;proto=https;host="www.example:8443"',
            "for=10.0.0.3;proto=http;host=internal",
        ],
        info("203.0.113.7", None, "https", "www.example:8443"),
    ),
    ("all-trusted", ["for=10.0.0.4, for=10.0.0.5"], info("10.0.0.4", None)),
    ("unknown", ["for=unknown"], info("unknown", None)),
    ("obfuscated-port", ['for="192.0.2.1:_abc"'], info("192.0.2.1", None)),
    ("ows-tolerated", ["  for=203.0.113.7 ; proto=https ,  "], info("203.0.113.7", None, "https")),
    ("empty-pairs", ["for=203.0.113.7;;proto=https;"], info("203.0.113.7", None, "https")),
    ("quoted-pair", ['for="_a\\b";host="ex\\ample"'], info("_ab", None, "http", "example")),
    ("case-insensitive-names", ["FOR=203.0.113.7;PROTO=HTTPS"], info("203.0.113.7", None, "https")),
    ("bad-host-ignored", ['for=203.0.113.7;host="a b"'], info("203.0.113.7", None)),
    ("bad-proto-ignored", ["for=203.0.113.7;proto=gopher"], info("203.0.113.7", None)),
    (
        "garbage-for-left-of-client-ignored",
        ['for="not an ip", for=203.0.113.7'],
        info("203.0.113.7", None),
    ),
    (
        "x-forwarded-ignored-in-this-mode",
        ["for=203.0.113.7"],
        info("203.0.113.7", None),
    ),
]


@pytest.mark.parametrize(
    ("values", "expected"), [c[1:] for c in FWD_CASES], ids=[c[0] for c in FWD_CASES]
)
def test_resolve_forwarded(values: list[str], expected: ClientInfo) -> None:
    headers = h(*[("forwarded", v) for v in values], ("x-forwarded-for", "198.51.100.66"))
    assert resolve(LB, headers, TRUST, "http", source="forwarded") == expected


FWD_UNPARSABLE = [
    "for=203.0.113.7 for=203.0.113.8",  # missing separator
    "for=",  # empty value
    "for=203.0.113.7;for=203.0.113.8",  # repeated parameter
    'for="203.0.113.7',  # unterminated quote
    "for=[2001:db8::1]",  # IPv6 must be quoted
    "=203.0.113.7",
    "for=203.0.113.7, proto=https",  # an element without for=
    "proto=https",
    'for="10.0.0.3\x01"',  # control character in a quoted-string
    "for=203.0.113.7, for=garbage",  # walked and unparsable
    'for=""',
]


@pytest.mark.parametrize("value", FWD_UNPARSABLE)
def test_resolve_forwarded_unparsable(value: str) -> None:
    headers = h(("forwarded", value))
    assert resolve(LB, headers, TRUST, "https", source="forwarded") == ClientInfo(
        "10.0.0.2", 40000, "https", None, proxied=False
    )


@given(st.text(alphabet=st.sampled_from('for=;,"\\[]:_. \t0123456789abcdef'), max_size=60))
def test_forwarded_never_raises(value: str) -> None:
    got = resolve(LB, [(b"forwarded", value.encode())], TRUST, "http", source="forwarded")
    assert got.scheme in {"http", "https", "ws", "wss"}


@given(st.text(max_size=60))
def test_x_forwarded_never_raises(value: str) -> None:
    headers = [(b"x-forwarded-for", value.encode("utf-8")), (b"x-forwarded-host", b"\xff")]
    got = resolve(LB, headers, TRUST, "http")
    assert got.host is None
    assert got.proxied or got == ClientInfo("10.0.0.2", 40000, "http", None, proxied=False)


# --------------------------------------------------------------------- balancer helpers


def test_strip_forwarding_headers() -> None:
    headers = h(
        ("host", "example.com"),
        ("forwarded", "for=1.2.3.4"),
        ("x-forwarded-for", "1.2.3.4"),
        ("x_forwarded_for", "1.2.3.4"),  # WSGI would read this as HTTP_X_FORWARDED_FOR
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil"),
        ("x-forwarded-port", "443"),
        ("x-forwarded-prefix", "/admin"),
        ("x-real-ip", "1.2.3.4"),
        ("x-forwarded-by", "kept"),
        ("accept", "*/*"),
    )
    assert strip_forwarding_headers(headers) == h(
        ("host", "example.com"), ("x-forwarded-by", "kept"), ("accept", "*/*")
    )


def test_append_forwarded_fresh() -> None:
    out = append_forwarded(
        h(("host", "example.com")), "203.0.113.7", "https", "example.com", "10.0.0.2"
    )
    assert out == h(
        ("host", "example.com"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "example.com"),
        ("forwarded", "for=203.0.113.7;proto=https;host=example.com;by=10.0.0.2"),
    )


def test_append_forwarded_extends_chains_and_quotes_ipv6() -> None:
    headers = h(
        ("x-forwarded-for", "198.51.100.1"),
        ("x-forwarded-for", "198.51.100.2"),
        ("forwarded", "for=198.51.100.1"),
        ("accept", "*/*"),
    )
    out = append_forwarded(headers, "2001:DB8::1", "http", "[::1]:8080", "fd00::2")
    assert out == h(
        ("accept", "*/*"),
        ("x-forwarded-for", "198.51.100.1, 198.51.100.2, 2001:db8::1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "[::1]:8080"),
        (
            "forwarded",
            'for=198.51.100.1, for="[2001:db8::1]";proto=http;host="[::1]:8080";by="[fd00::2]"',
        ),
    )


def test_append_forwarded_unknown_client_and_bad_host() -> None:
    out = append_forwarded([], None, "http", "bad host\r\n")
    assert out == h(
        ("x-forwarded-for", "unknown"),
        ("x-forwarded-proto", "http"),
        ("forwarded", "for=unknown;proto=http"),
    )
    out = append_forwarded([], "_hidden", "wss", None, by="_lb1")
    assert dict(out)[b"forwarded"] == b"for=_hidden;proto=wss;by=_lb1"


@pytest.mark.parametrize(
    ("client", "proto", "by", "fragment"),
    [
        ("example.com", "http", None, "not an IP"),
        ("1.2.3.4:80", "http", None, "not an IP"),
        ("1.2.3.4", "ftp", None, "proto"),
        ("1.2.3.4", "http", "lb.example", "not an IP"),
    ],
)
def test_append_forwarded_caller_errors(
    client: str, proto: str, by: str | None, fragment: str
) -> None:
    with pytest.raises(LocalProtocolError, match=fragment):
        append_forwarded([], client, proto, None, by)


@pytest.mark.parametrize("client", ["203.0.113.7", "2001:db8::7", "unknown", "_obf"])
@pytest.mark.parametrize("source", ["x-forwarded", "forwarded"])
def test_append_then_resolve_round_trip(client: str, source: str) -> None:
    """What our balancer writes, our server reads back, through two proxy hops."""
    outer = append_forwarded(h(("host", "example.com")), client, "https", "example.com")
    inner = append_forwarded(outer, "10.0.0.3", "http", "internal")  # second, trusted hop
    got = resolve(LB, inner, TRUST, "http", source=source)  # type: ignore[arg-type]
    assert got == info(client, None, "https", "example.com")


@pytest.mark.parametrize(
    ("host", "written"),
    [("a%20b", b"host=a%20b"), ("example.com:8080", b'host="example.com:8080"')],
)
def test_append_forwarded_quotes_hosts_only_when_needed(host: str, written: bytes) -> None:
    out = append_forwarded([], "1.2.3.4", "http", host)
    assert dict(out)[b"forwarded"] == b"for=1.2.3.4;proto=http;" + written
    assert resolve(LB, out, TRUST, "http", source="forwarded").host == host


@given(
    st.ip_addresses().map(str),
    st.lists(st.sampled_from(["10.0.0.3", "10.0.0.4", "192.168.1.1", "fd00::9"]), max_size=4),
    st.sampled_from(["http", "https"]),
)
def test_client_survives_any_chain_of_trusted_proxies(client, hops, proto) -> None:
    """Property: through any number of trusted hops, both header families name the client."""
    headers = append_forwarded([], client, proto, "example.com")
    for hop in hops:
        headers = append_forwarded(headers, hop, "http", "internal")
    # Even a client inside a trusted network is found: it is the leftmost hop.
    for source in ("x-forwarded", "forwarded"):
        got = resolve(LB, headers, TRUST, "http", source=source)  # type: ignore[arg-type]
        assert got == info(client, None, proto, "example.com")
