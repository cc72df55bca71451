"""Trusted-proxy handling of ``X-Forwarded-*`` and RFC 7239 ``Forwarded`` headers, sans-I/O.

Theory of operation
-------------------
A reverse proxy tells the server who its client was by appending to forwarding headers.
Anyone can send those headers, so they mean something only when the *direct peer* of the
connection is a proxy we trust (:class:`TrustedPeers`, built from IPs and CIDRs like
gunicorn's ``--forwarded-allow-ips``; ``"*"`` trusts everyone, ``"unix"`` trusts UNIX
socket peers).

:func:`resolve` then walks the chain from right to left, as uvicorn's
``ProxyHeadersMiddleware`` and werkzeug's ``ProxyFix`` do: each trusted proxy appended
the address of *its* peer, so hops that are themselves trusted proxies are skipped and
the first untrusted hop is the client. If every hop is trusted, the leftmost is the
client. Hops to the left of the client were written by the client and are never
looked at, so garbage there cannot hide the real address.

Only one header family is read per deployment (``source``): ``"x-forwarded"``
(``X-Forwarded-For`` / ``-Proto`` / ``-Host``; what nginx, HAProxy, uvicorn, gunicorn and
werkzeug use, the default) or ``"forwarded"`` (RFC 7239). Reading whichever is present
would let a client spoof its address through a proxy that manages only the other one
(nginx passes a client's ``Forwarded`` header through untouched).

Proto and host: each proxy appends the scheme and ``Host`` it received, so the entry at
the client's position counted from the right belongs to the client's own connection. A
proxy that *sets* instead of appending leaves fewer entries; then the leftmost entry is
used. Values that are not ``http``/``https``/``ws``/``wss`` or not a plausible host
(``name``, IPv4 or ``[IPv6]``, optional ``:port``) are ignored.

Failure policy
--------------
Nothing here raises on header contents (the peer controls them). A chain that cannot be
parsed where it is walked (a hop that is not an IP address, ``[IPv6]``, ``unknown`` or an
RFC 7239 obfuscated ``_identifier``; a ``Forwarded`` header with a syntax error anywhere,
a repeated parameter or an element without ``for=``) is treated like an untrusted peer:
the result is the peer itself with ``proxied=False``, and the caller strips the
forwarding headers (:func:`strip_forwarding_headers`) before the application sees them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from netstack.errors import ConfigError, LocalProtocolError

Headers: TypeAlias = list[tuple[bytes, bytes]]
Source: TypeAlias = Literal["x-forwarded", "forwarded"]
_IP: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
_Net: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

XFF: Final = b"x-forwarded-for"
XFP: Final = b"x-forwarded-proto"
XFH: Final = b"x-forwarded-host"
FORWARDED: Final = b"forwarded"

FORWARDING_HEADERS: Final = frozenset(
    {
        FORWARDED,
        XFF,
        XFP,
        XFH,
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-real-ip",
    }
)
"""Headers :func:`strip_forwarding_headers` removes: the ones :func:`resolve` reads plus
the ones common frameworks read (werkzeug ``ProxyFix`` port/prefix, nginx ``X-Real-IP``)."""

_SCHEMES: Final = frozenset({"http", "https", "ws", "wss"})
# RFC 7239 §6.3 obfuscated node / port identifiers.
_OBFUSCATED: Final = re.compile(r"_[A-Za-z0-9._-]+")
_PORT: Final = re.compile(r"[0-9]{1,5}")
# A Host value: reg-name (DNS name, IPv4, percent-encoded) or [IPv6], then an optional port.
_HOST: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(?::[0-9]{1,5})?")
# RFC 9110 token and quoted-string; OWS is tolerated around ";" and "," (real senders
# write "for=1.2.3.4; proto=https"), not around "=".
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PAIR: Final = re.compile(
    r"([!#$%&'*+.^_`|~0-9A-Za-z-]+)="
    r"(?:([!#$%&'*+.^_`|~0-9A-Za-z-]+)|\"((?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]"
    r"|\\[\t\x20-\x7e\x80-\xff])*)\")"
)
_QUOTED_PAIR: Final = re.compile(r"\\(.)")


class TrustedPeers:
    """The proxies whose forwarding headers are believed.

    Args:
        entries: IP addresses, CIDR networks (``"10.0.0.0/8"``, ``"fd00::/8"``), ``"*"``
            (trust every peer, like gunicorn's ``--forwarded-allow-ips='*'``) or
            ``"unix"`` (trust UNIX socket peers, passed as ``None``). A single string
            is split on commas. The default trusts the loopback addresses only.

    Raises:
        ConfigError: an entry is none of the above (a host name, a network with host
            bits set such as ``10.0.0.1/8``).
    """

    __slots__ = ("_addresses", "_all", "_networks", "_unix")

    def __init__(self, entries: Iterable[str] | str = ("127.0.0.1", "::1")) -> None:
        if isinstance(entries, str):
            entries = entries.split(",")
        self._all = False
        self._unix = False
        self._addresses: set[str] = set()
        self._networks: list[_Net] = []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            if entry == "*":
                self._all = True
            elif entry.lower() == "unix":
                self._unix = True
            elif "/" in entry:
                try:
                    self._networks.append(ipaddress.ip_network(entry))
                except ValueError as exc:
                    raise ConfigError(f"trusted proxy network {entry!r}: {exc}") from None
            else:
                ip = _ip(entry)
                if ip is None:
                    raise ConfigError(
                        f"trusted proxy {entry!r} is not an IP address, CIDR network, '*' or 'unix'"
                    )
                self._addresses.add(str(_unmapped(ip)))

    def contains(self, peer_ip: str | None) -> bool:
        """Whether ``peer_ip`` is a trusted proxy; ``None`` stands for a UNIX socket peer.

        IPv4-mapped IPv6 peers (``::ffff:10.0.0.1``) match IPv4 entries. A string that
        is not an IP address (``unknown``, an obfuscated identifier) is never trusted
        unless ``"*"`` is.
        """
        if self._all:
            return True
        if peer_ip is None:
            return self._unix
        ip = _ip(peer_ip)
        if ip is None:
            return False
        ip = _unmapped(ip)
        if str(ip) in self._addresses:
            return True
        return any(ip.version == net.version and ip in net for net in self._networks)

    __contains__ = contains

    def __repr__(self) -> str:
        entries = [*(["*"] if self._all else []), *(["unix"] if self._unix else [])]
        entries += sorted(self._addresses) + [str(n) for n in self._networks]
        return f"TrustedPeers({entries!r})"


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who the client is, after forwarding headers were weighed.

    Attributes:
        client_addr: the client's IP address (canonical text), ``"unknown"`` or an RFC 7239
            obfuscated identifier when a trusted proxy says so, or ``None`` for a UNIX
            socket peer that is not behind a trusted proxy.
        client_port: the client's port when known.
        scheme: ``http``/``https``/``ws``/``wss``: the forwarded one, or the connection's.
        host: the forwarded ``Host``, or ``None`` (use the request's own ``Host``).
        proxied: ``True`` when the peer is trusted and its chain parsed, so the forwarding
            headers may be passed on; ``False`` means the caller must strip them.
    """

    client_addr: str | None
    client_port: int | None
    scheme: str
    host: str | None
    proxied: bool


def resolve(
    peer: tuple[str, int] | None,
    headers: Headers,
    trusted: TrustedPeers,
    scheme: str,
    *,
    source: Source = "x-forwarded",
) -> ClientInfo:
    """Find the real client of a request. Never raises on header contents.

    Args:
        peer: the connection's ``(host, port)`` (an IPv6 4-tuple is fine), ``None`` for a
            UNIX socket.
        headers: the request headers, lowercase names.
        trusted: the proxies whose headers are believed.
        scheme: the connection's own scheme (``"http"`` or ``"https"``).
        source: which header family the trusted proxies manage (see the module docstring).

    Returns:
        The client. When the peer is untrusted or its chain does not parse, the peer
        itself with ``proxied=False``: strip the forwarding headers then.
    """
    peer_addr = None if peer is None else peer[0]
    peer_port = None if peer is None else peer[1]
    direct = ClientInfo(peer_addr, peer_port, scheme, None, proxied=False)
    if not trusted.contains(peer_addr):
        return direct
    wanted = (XFF, XFP, XFH) if source == "x-forwarded" else (FORWARDED,)
    values: dict[bytes, list[str]] = {}
    for name, value in headers:
        if name in wanted:
            values.setdefault(name, []).append(value.decode("latin-1"))
    if source == "forwarded":
        return _resolve_forwarded(values.get(FORWARDED), trusted, direct)
    return _resolve_x_forwarded(values, trusted, direct)


def _resolve_x_forwarded(
    values: dict[bytes, list[str]], trusted: TrustedPeers, direct: ClientInfo
) -> ClientInfo:
    hops = _split_list(values.get(XFF))
    addr, port, from_right = direct.client_addr, direct.client_port, 1
    if hops:
        found = _walk([_node(hop) for hop in hops], trusted)
        if found is None:
            return direct
        index, (addr, port) = found
        from_right = len(hops) - index
    proto = _pick(_split_list(values.get(XFP)), from_right)
    host = _pick(_split_list(values.get(XFH)), from_right)
    return ClientInfo(addr, port, _scheme(proto, direct.scheme), _host(host), proxied=True)


def _resolve_forwarded(
    values: list[str] | None, trusted: TrustedPeers, direct: ClientInfo
) -> ClientInfo:
    if values is None:
        return ClientInfo(*_fields(direct), proxied=True)
    elements = _parse_forwarded(",".join(values))
    if elements is None or any("for" not in e for e in elements):
        return direct
    if not elements:
        return ClientInfo(*_fields(direct), proxied=True)
    found = _walk([_node(e["for"]) for e in elements], trusted)
    if found is None:
        return direct
    index, (addr, port) = found
    element = elements[index]
    scheme = _scheme(element.get("proto"), direct.scheme)
    return ClientInfo(addr, port, scheme, _host(element.get("host")), proxied=True)


def _fields(info: ClientInfo) -> tuple[str | None, int | None, str, str | None]:
    return info.client_addr, info.client_port, info.scheme, info.host


def _walk(
    nodes: list[tuple[str, int | None] | None], trusted: TrustedPeers
) -> tuple[int, tuple[str, int | None]] | None:
    """Index and value of the client hop: the rightmost untrusted one, else the leftmost.

    ``None`` if a hop that must be looked at did not parse.
    """
    for index in range(len(nodes) - 1, 0, -1):
        node = nodes[index]
        if node is None:
            return None
        if not trusted.contains(node[0]):
            return index, node
    return None if nodes[0] is None else (0, nodes[0])


def _split_list(values: list[str] | None) -> list[str]:
    """RFC 9110 §5.6.1 list: several field lines join with commas; empty items drop."""
    if not values:
        return []
    return [item.strip() for item in ",".join(values).split(",") if item.strip()]


def _pick(items: list[str], from_right: int) -> str | None:
    if not items:
        return None
    return items[-from_right] if from_right <= len(items) else items[0]


def _scheme(value: str | None, default: str) -> str:
    if value is None:
        return default
    value = value.strip().lower()
    return value if value in _SCHEMES else default


def _host(value: str | None) -> str | None:
    if value is None or _HOST.fullmatch(value) is None:
        return None
    return value


def _ip(text: str) -> _IP | None:
    if "%" in text:  # an IPv6 scope names a local interface, never a forwarded client
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _unmapped(ip: _IP) -> _IP:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _node(text: str) -> tuple[str, int | None] | None:
    """Parse one hop: RFC 7239 §6 node, plus the bare IPv6 that X-Forwarded-For carries.

    Returns ``(address, port)`` with the address canonical, or ``None`` if malformed.
    Obfuscated ports (``_abc``) give ``None`` as the port.
    """
    text = text.strip()
    if text.lower() == "unknown":
        return "unknown", None
    if _OBFUSCATED.fullmatch(text):
        return text, None
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
        ip = _ip(host)
        if ip is None or ip.version != 6:
            return None
    else:
        ip = _ip(text)
        if ip is None and text.count(":") == 1:
            host, _, port_text = text.partition(":")
            ip = _ip(host)  # one colon: never IPv6, which needs at least two
        if ip is None:
            return None
    port: int | None = None
    if port_text is not None:
        if _PORT.fullmatch(port_text) and int(port_text) <= 65535:
            port = int(port_text)
        elif not _OBFUSCATED.fullmatch(port_text):
            return None
    return str(ip), port


def _parse_forwarded(value: str) -> list[dict[str, str]] | None:
    """Split an RFC 7239 §4 ``Forwarded`` value into elements of lowercase-named params.

    Returns ``None`` on a syntax error or a parameter repeated within an element.
    """
    elements: list[dict[str, str]] = []
    element: dict[str, str] = {}
    pos = _skip_ows(value, 0)
    while True:
        pair = _PAIR.match(value, pos)
        if pair is not None:
            name = pair[1].lower()
            if name in element:
                return None
            token, quoted = pair[2], pair[3]
            element[name] = token if token is not None else _QUOTED_PAIR.sub(r"\1", quoted)
            pos = pair.end()
        pos = _skip_ows(value, pos)
        if pos == len(value) or value[pos] == ",":
            if element:
                elements.append(element)
            element = {}
            if pos == len(value):
                return elements
        elif value[pos] != ";":
            return None
        pos = _skip_ows(value, pos + 1)


def _skip_ows(value: str, pos: int) -> int:
    while pos < len(value) and value[pos] in " \t":
        pos += 1
    return pos


# ------------------------------------------------------------------------ the balancer


def strip_forwarding_headers(headers: Headers) -> Headers:
    """A copy of ``headers`` without :data:`FORWARDING_HEADERS`.

    Names spelled with underscores (``x_forwarded_for``) go too: WSGI maps ``-`` and ``_``
    to the same ``HTTP_X_FORWARDED_FOR`` key, so they would smuggle a value past the strip.
    """
    return [
        (name, value)
        for name, value in headers
        if name.replace(b"_", b"-") not in FORWARDING_HEADERS
    ]


def append_forwarded(
    headers: Headers,
    client: str | None,
    proto: str,
    host: str | None,
    by: str | None = None,
) -> Headers:
    """A copy of ``headers`` with this hop added to the forwarding headers.

    ``X-Forwarded-For``, ``X-Forwarded-Proto``, ``X-Forwarded-Host`` and ``Forwarded`` are
    each extended (existing field lines are merged into one, then this hop's value is
    appended and the header moves to the end), so a chain of proxies stays aligned hop by
    hop. Strip first (:func:`strip_forwarding_headers`) when the request came from an
    untrusted peer. The ``Forwarded`` element is ``for=...;proto=...;host=...;by=...``
    with IPv6 nodes bracketed and quoted (RFC 7239 §6: ``for="[2001:db8::1]"``).

    Args:
        headers: the request headers, lowercase names.
        client: the client's IP address (or ``"unknown"``/an ``_obfuscated`` id);
            ``None`` (a UNIX socket peer) is written as ``unknown``.
        proto: the scheme the client used: ``http``, ``https``, ``ws`` or ``wss``.
        host: the request's ``Host``; left out of both headers when it is ``None`` or
            not a plausible host (it comes from the client, so this never raises).
        by: this proxy's own address or ``_identifier``, for ``Forwarded: by=``.

    Raises:
        LocalProtocolError: ``client``/``by`` is not an IP, ``unknown`` or obfuscated
            identifier, or ``proto`` is not one of the four schemes (caller bugs).
    """
    if proto not in _SCHEMES:
        raise LocalProtocolError(f"forwarded proto must be one of {sorted(_SCHEMES)}")
    client_node = _format_node("unknown" if client is None else client)
    pairs = [f"for={client_node}", f"proto={proto}"]
    if host is not None and _HOST.fullmatch(host) is None:
        host = None
    if host is not None:
        pairs.append(f"host={_quote(host)}")
    if by is not None:
        pairs.append(f"by={_format_node(by)}")
    plain_client = "unknown" if client is None else _plain_node(client)
    additions = [
        (XFF, plain_client),
        (XFP, proto),
        *([(XFH, host)] if host is not None else []),
        (FORWARDED, ";".join(pairs)),
    ]
    out = list(headers)
    for name, value in additions:
        existing = [v for n, v in out if n == name]
        out = [(n, v) for n, v in out if n != name]
        out.append((name, b", ".join([*existing, value.encode("latin-1")])))
    return out


def _plain_node(node: str) -> str:
    """A node for X-Forwarded-For: the canonical IP without brackets or quotes."""
    parsed = _node(node)
    if parsed is None or parsed[1] is not None:
        raise LocalProtocolError(f"{node!r} is not an IP address or an RFC 7239 identifier")
    return parsed[0]


def _format_node(node: str) -> str:
    """RFC 7239 §6 node for ``Forwarded``: IPv6 becomes ``"[...]"``, quoted."""
    addr = _plain_node(node)
    return f'"[{addr}]"' if ":" in addr else addr


def _quote(value: str) -> str:
    """A token as is, anything else as an RFC 9110 quoted-string."""
    if _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
