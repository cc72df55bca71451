"""PROXY protocol v1 (text) and v2 (binary): parse and serialise, sans-I/O.

Reference: HAProxy's ``doc/proxy-protocol.txt`` ("The PROXY protocol, Versions 1 & 2"),
cited below as "spec §N".

Theory of operation
-------------------
A proxy that relays a TCP connection prepends one header naming the original endpoints.
The receiver calls :func:`parse` on the first bytes of the connection until it returns
``(header, consumed)``; everything after ``consumed`` bytes belongs to the relayed
protocol. There is no state to keep between calls: :func:`parse` is given the whole
buffered prefix each time and answers one of three ways:

* ``None``: the bytes so far are a valid *prefix* of a header; read more.
* ``(ProxyHeader, n)``: a complete, valid header of ``n`` bytes.
* raises :class:`~netstack.errors.RemoteProtocolError` (``status_hint`` 400): the bytes
  cannot start a valid header. Spec §2.1 asks to abort "as soon as possible", so a bad
  signature is refused as soon as enough bytes are seen to tell, and a v2 header that
  announces more than ``max_v2_bytes`` is refused before its body arrives.
  :class:`~netstack.errors.LimitExceeded` (a subclass) is raised for the two size limits.

Model
-----
:class:`ProxyHeader` keeps the address family and the transport protocol apart, as v2
does (a v1 ``TCP4`` line is ``family="INET", protocol="STREAM"``; ``UNKNOWN`` is
``"UNSPEC"``/``"UNSPEC"``). Invariants of every header :func:`parse` returns, which
:func:`encode_v1` / :func:`encode_v2` also check before writing (a violation is a
:class:`~netstack.errors.LocalProtocolError`):

* ``family == "UNSPEC"`` exactly when ``protocol == "UNSPEC"``, and then all four
  address fields are ``None`` and ``tlvs`` is empty: the receiver uses the real
  connection endpoints (spec §2.1 ``UNKNOWN``, §2.2 ``AF_UNSPEC``).
* ``command == "LOCAL"`` (v2 only: a health check from the proxy itself) implies
  ``family == "UNSPEC"``: spec §2.2 says the family of a LOCAL header is ignored.
  Like HAProxy, the parser skips the address block and the TLVs of LOCAL and of
  unspecified families (any v2 family/protocol byte with a zero nibble).
* ``INET``/``INET6``: addresses are canonical text (``str(ipaddress.ip_address(...))``),
  ports are ints in ``[0, 65535]``. ``UNIX`` (v2): addresses are paths (``str``, decoded
  UTF-8 with ``surrogateescape`` so any bytes survive; trailing NUL padding removed, a
  leading NUL kept for abstract sockets), ports are ``None``.
* ``tlvs`` are ``(type, value)`` pairs in wire order, v2 only; they are kept, not
  interpreted (the caller looks up ``PP2_TYPE_*``).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from netstack.errors import LimitExceeded, LocalProtocolError, RemoteProtocolError

Family: TypeAlias = Literal["INET", "INET6", "UNIX", "UNSPEC"]
Transport: TypeAlias = Literal["STREAM", "DGRAM", "UNSPEC"]
Command: TypeAlias = Literal["PROXY", "LOCAL"]

V1_SIGNATURE: Final = b"PROXY "
V1_MAX_BYTES: Final = 107
"""Longest v1 line including CRLF: ``PROXY UNKNOWN`` with two full IPv6 addresses (spec §2.1)."""

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_BYTES: Final = 16
DEFAULT_MAX_V2_BYTES: Final = 4096
"""Default cap on a whole v2 header. The wire allows 16 + 65535 bytes; real senders put
addresses (at most 216 bytes for UNIX) and a few TLVs (ALPN, authority, a unique id of at
most 128 bytes, SSL details) well under 1 KiB, so 4 KiB leaves room without letting a
peer make us buffer 64 KiB before anything is checked."""

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_TYPE_NETNS: Final = 0x30

_UNIX_ADDR_BYTES: Final = 108
_V2_HEAD: Final = struct.Struct("!12sBBH")
_TLV_HEAD: Final = struct.Struct("!BH")
_PORTS: Final = struct.Struct("!HH")

# v2 family and protocol nibbles (spec §2.2), both ways.
_FAMILY_CODES: Final[dict[int, Family]] = {1: "INET", 2: "INET6", 3: "UNIX"}
_FAMILY_NIBBLE: Final[dict[Family, int]] = {"UNSPEC": 0, "INET": 1, "INET6": 2, "UNIX": 3}
_PROTOCOL_CODES: Final[dict[int, Transport]] = {1: "STREAM", 2: "DGRAM"}
_PROTOCOL_NIBBLE: Final[dict[Transport, int]] = {"UNSPEC": 0, "STREAM": 1, "DGRAM": 2}
# Size of the address block (addresses then ports) per family.
_ADDRESS_BYTES: Final[dict[Family, int]] = {"INET": 12, "INET6": 36, "UNIX": 216}

_V1_FAMILIES: Final[dict[str, Family]] = {"TCP4": "INET", "TCP6": "INET6"}
_V1_NAMES: Final[dict[Family, str]] = {"INET": "TCP4", "INET6": "TCP6"}
# "Heading zeroes are not permitted ... to avoid any possible confusion with octal" (§2.1).
_V1_PORT: Final = re.compile(r"0|[1-9][0-9]{0,4}")


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One PROXY protocol header. See the module docstring for the invariants.

    Attributes:
        version: 1 (text) or 2 (binary).
        command: ``"PROXY"`` (relayed connection) or ``"LOCAL"`` (v2 only: the proxy's own
            connection, e.g. a health check; use the real endpoints).
        family: ``"INET"``, ``"INET6"``, ``"UNIX"`` (v2 only) or ``"UNSPEC"`` (v1
            ``UNKNOWN``, v2 ``AF_UNSPEC`` or LOCAL: use the real endpoints).
        protocol: ``"STREAM"`` (TCP), ``"DGRAM"`` (UDP, v2 only) or ``"UNSPEC"``.
        src_addr: the original client address, ``None`` when ``family`` is ``"UNSPEC"``.
        src_port: the original client port, ``None`` for UNIX and UNSPEC.
        dst_addr: the address the client connected to.
        dst_port: the port the client connected to.
        tlvs: v2 type-length-value extensions as ``(type, value)`` pairs, in wire order.
    """

    version: Literal[1, 2]
    command: Command
    family: Family
    protocol: Transport
    src_addr: str | None = None
    src_port: int | None = None
    dst_addr: str | None = None
    dst_port: int | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def is_unspecified(self) -> bool:
        """True when the receiver must use the real connection endpoints (LOCAL/UNSPEC)."""
        return self.family == "UNSPEC"

    @property
    def source(self) -> tuple[str, int] | None:
        """The original client ``(address, port)`` of an INET/INET6 header, else ``None``."""
        if self.src_addr is None or self.family not in ("INET", "INET6"):
            return None
        return self.src_addr, self.src_port or 0

    @property
    def destination(self) -> tuple[str, int] | None:
        """The ``(address, port)`` the client connected to, for INET/INET6; else ``None``."""
        if self.dst_addr is None or self.family not in ("INET", "INET6"):
            return None
        return self.dst_addr, self.dst_port or 0

    def tlv(self, type_: int) -> bytes | None:
        """The value of the first TLV of ``type_``, or ``None`` if absent."""
        for t, value in self.tlvs:
            if t == type_:
                return value
        return None


_UNSPEC_V1: Final = ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC")


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"invalid PROXY protocol header: {message}", status_hint=400)


# ------------------------------------------------------------------------------- parse


def parse(
    buf: bytes | bytearray, *, max_v2_bytes: int = DEFAULT_MAX_V2_BYTES
) -> tuple[ProxyHeader, int] | None:
    """Parse a PROXY header (v1 or v2, told apart by the signature) at the start of ``buf``.

    Args:
        buf: the bytes received so far on the connection, from its first byte.
        max_v2_bytes: the largest whole v2 header accepted (16-byte head included).

    Returns:
        ``(header, consumed)`` once a whole header is buffered, ``None`` while ``buf`` is
        a valid prefix of one.

    Raises:
        RemoteProtocolError: the bytes are not a valid header (status_hint 400).
        LimitExceeded: a v1 line has no CRLF within 107 bytes, or a v2 header announces
            more than ``max_v2_bytes``.
    """
    head = bytes(buf[: len(V2_SIGNATURE)])
    if head.startswith(V1_SIGNATURE[: len(head)]) and len(head) < len(V1_SIGNATURE):
        # Could still be v1; the two signatures differ at the first byte, so it cannot
        # also be v2.
        return None
    if head.startswith(V1_SIGNATURE):
        return _parse_v1(buf)
    if V2_SIGNATURE.startswith(head):
        return _parse_v2(buf, max_v2_bytes) if len(head) == len(V2_SIGNATURE) else None
    raise _bad("no v1 ('PROXY ') or v2 signature at the start of the connection")


def receive(pending: bytes, data: bytes) -> tuple[ProxyHeader | None, bytes]:
    """Add ``data`` to the start of a connection held so far, for a receiver fed in chunks.

    Args:
        pending: the bytes received before ``data`` that did not yet make a whole header.
        data: the bytes just received.

    Returns:
        ``(header, the bytes after it)`` once the header is whole; ``(None, everything
        received so far)`` to pass back as ``pending`` while it is not.

    Raises:
        RemoteProtocolError: as :func:`parse` (LimitExceeded included).
    """
    buffer = pending + data
    parsed = parse(buffer)
    if parsed is None:
        return None, buffer
    header, used = parsed
    return header, buffer[used:]


def _parse_v1(buf: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    window = bytes(buf[:V1_MAX_BYTES])
    end = window.find(b"\r\n")
    if end == -1:
        # A lone LF, or a CR followed by something else, can never become a CRLF (§2.1:
        # "must not tolerate a single CR or LF character to end the line").
        if b"\n" in window or b"\r" in window[:-1]:
            raise _bad("v1 line must end with CRLF")
        if len(window) == V1_MAX_BYTES:
            raise LimitExceeded(
                "proxy_v1_line_bytes", V1_MAX_BYTES, actual=len(buf), status_hint=400
            )
        return None
    line = window[:end]
    if b"\r" in line or b"\n" in line:
        raise _bad("v1 line must end with CRLF")
    parts = line.decode("latin-1").split(" ")
    consumed = end + 2
    if parts[1] == "UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF" (§2.1).
        return _UNSPEC_V1, consumed
    family = _V1_FAMILIES.get(parts[1])
    if family is None:
        raise _bad(f"v1 protocol must be TCP4, TCP6 or UNKNOWN, got {parts[1][:8]!r}")
    if len(parts) != 6:
        raise _bad(f"v1 {parts[1]} line needs 4 fields after the protocol, got {len(parts) - 2}")
    src = _v1_address(parts[2], family, "source")
    dst = _v1_address(parts[3], family, "destination")
    src_port = _v1_port(parts[4], "source")
    dst_port = _v1_port(parts[5], "destination")
    return ProxyHeader(1, "PROXY", family, "STREAM", src, src_port, dst, dst_port), consumed


def _v1_address(text: str, family: Family, which: str) -> str:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    try:
        # ipaddress refuses leading zeros in IPv4 (the octal ambiguity §2.1 forbids) but
        # accepts an IPv6 scope ("fe80::1%eth0"), which is not an address on the wire.
        if "%" in text:
            raise ValueError(text)
        ip = ipaddress.IPv4Address(text) if family == "INET" else ipaddress.IPv6Address(text)
    except ValueError:
        raise _bad(f"v1 {which} address {text[:45]!r} is not an {family} address") from None
    return str(ip)


def _v1_port(text: str, which: str) -> int:
    if _V1_PORT.fullmatch(text) is None or int(text) > 65535:
        raise _bad(f"v1 {which} port {text[:8]!r} is not a decimal in 0..65535")
    return int(text)


def _parse_v2(buf: bytes | bytearray, max_v2_bytes: int) -> tuple[ProxyHeader, int] | None:
    # The 13th byte is checked as soon as it arrives: only version 2 exists (§2.2).
    if len(buf) > 12 and buf[12] >> 4 != 2:
        raise _bad(f"v2 version nibble must be 2, got {buf[12] >> 4}")
    if len(buf) < V2_HEADER_BYTES:
        return None
    _, ver_cmd, fam, length = _V2_HEAD.unpack_from(buf)
    command_code = ver_cmd & 0x0F
    if command_code > 1:
        raise _bad(f"v2 command must be 0 (LOCAL) or 1 (PROXY), got {command_code}")
    family_code, protocol_code = fam >> 4, fam & 0x0F
    if family_code > 3 or protocol_code > 2:
        raise _bad(f"v2 family/protocol byte 0x{fam:02x} is not assigned")
    total = V2_HEADER_BYTES + length
    if total > max_v2_bytes:
        raise LimitExceeded("max_v2_bytes", max_v2_bytes, actual=total, status_hint=400)
    if len(buf) < total:
        return None
    if command_code == 0:
        return ProxyHeader(2, "LOCAL", "UNSPEC", "UNSPEC"), total
    family = _FAMILY_CODES.get(family_code)
    protocol = _PROTOCOL_CODES.get(protocol_code)
    if family is None or protocol is None:
        # A zero nibble: unspecified, addresses are to be ignored (§2.2).
        return ProxyHeader(2, "PROXY", "UNSPEC", "UNSPEC"), total
    need = _ADDRESS_BYTES[family]
    if length < need:
        raise _bad(f"v2 address block of {length} bytes is too short for {family} ({need})")
    block = bytes(buf[V2_HEADER_BYTES:total])
    src_port: int | None = None
    dst_port: int | None = None
    if family == "UNIX":
        src, dst = _unix_path(block[:_UNIX_ADDR_BYTES]), _unix_path(block[_UNIX_ADDR_BYTES:need])
    else:
        size = 4 if family == "INET" else 16
        src = str(ipaddress.ip_address(block[:size]))
        dst = str(ipaddress.ip_address(block[size : 2 * size]))
        src_port, dst_port = _PORTS.unpack_from(block, 2 * size)
    tlvs = _parse_tlvs(block, need)
    return ProxyHeader(2, "PROXY", family, protocol, src, src_port, dst, dst_port, tlvs), total


def _unix_path(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("utf-8", "surrogateescape")


def _parse_tlvs(block: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    while offset < len(block):
        if len(block) - offset < _TLV_HEAD.size:
            raise _bad(f"v2 TLV header truncated at offset {offset}")
        type_, size = _TLV_HEAD.unpack_from(block, offset)
        offset += _TLV_HEAD.size
        if offset + size > len(block):
            raise _bad(f"v2 TLV 0x{type_:02x} of {size} bytes overruns the header")
        tlvs.append((type_, block[offset : offset + size]))
        offset += size
    return tuple(tlvs)


# ------------------------------------------------------------------------------ encode


def _check(header: ProxyHeader, version: int) -> None:
    """Raise LocalProtocolError unless ``header`` can be written as ``version``."""
    if header.command not in ("PROXY", "LOCAL"):
        raise LocalProtocolError(f"unknown PROXY command {header.command!r}")
    if header.family not in _FAMILY_NIBBLE or header.protocol not in _PROTOCOL_NIBBLE:
        raise LocalProtocolError(f"unknown family/protocol {header.family}/{header.protocol}")
    if (header.family == "UNSPEC") != (header.protocol == "UNSPEC"):
        raise LocalProtocolError("family and protocol must both be UNSPEC or neither")
    if header.command == "LOCAL" and header.family != "UNSPEC":
        raise LocalProtocolError("a LOCAL header carries no addresses: use family UNSPEC")
    fields = (header.src_addr, header.src_port, header.dst_addr, header.dst_port)
    if header.family == "UNSPEC":
        if any(f is not None for f in fields) or header.tlvs:
            raise LocalProtocolError("an UNSPEC header carries no addresses, ports or TLVs")
    elif header.family == "UNIX":
        if header.src_addr is None or header.dst_addr is None:
            raise LocalProtocolError("a UNIX header needs both paths")
        if header.src_port is not None or header.dst_port is not None:
            raise LocalProtocolError("a UNIX header has no ports")
    else:
        for addr in (header.src_addr, header.dst_addr):
            _ip_of(addr, header.family)
        for port in (header.src_port, header.dst_port):
            if port is None or not 0 <= port <= 65535:
                raise LocalProtocolError(f"port {port!r} is not in 0..65535")
    if version == 1:
        if header.command == "LOCAL" or header.family == "UNIX" or header.protocol == "DGRAM":
            raise LocalProtocolError(
                "PROXY v1 carries only TCP over IPv4/IPv6 or UNKNOWN; use v2 for "
                f"{header.command} {header.family}/{header.protocol}"
            )
        if header.tlvs:
            raise LocalProtocolError("PROXY v1 cannot carry TLVs; drop them or use v2")


def _ip_of(addr: str | None, family: Family) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        if addr is None or "%" in addr:
            raise ValueError(addr)
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise LocalProtocolError(f"{addr!r} is not an IP address") from None
    if (ip.version == 4) != (family == "INET"):
        raise LocalProtocolError(f"{addr} is not an {family} address")
    return ip


def encode_v1(header: ProxyHeader) -> bytes:
    """Serialise ``header`` as a v1 text line (``header.version`` is not consulted).

    Raises:
        LocalProtocolError: ``header`` breaks an invariant, or needs v2 (LOCAL, UNIX,
            DGRAM or TLVs).
    """
    _check(header, 1)
    if header.family == "UNSPEC":
        return b"PROXY UNKNOWN\r\n"
    src = _ip_of(header.src_addr, header.family)
    dst = _ip_of(header.dst_addr, header.family)
    line = f"PROXY {_V1_NAMES[header.family]} {src} {dst} {header.src_port} {header.dst_port}\r\n"
    return line.encode("ascii")


def encode_v2(header: ProxyHeader) -> bytes:
    """Serialise ``header`` in the v2 binary format (``header.version`` is not consulted).

    Raises:
        LocalProtocolError: ``header`` breaks an invariant, a UNIX path is longer than 108
            bytes, a TLV is out of range, or the whole header exceeds 16 + 65535 bytes.
    """
    _check(header, 2)
    command = 0 if header.command == "LOCAL" else 1
    fam = _FAMILY_NIBBLE[header.family] << 4 | _PROTOCOL_NIBBLE[header.protocol]
    parts: list[bytes] = []
    if header.family == "UNIX":
        for path in (header.src_addr, header.dst_addr):
            raw = str(path).encode("utf-8", "surrogateescape")
            if len(raw) > _UNIX_ADDR_BYTES:
                raise LocalProtocolError(f"UNIX path of {len(raw)} bytes exceeds 108")
            parts.append(raw.ljust(_UNIX_ADDR_BYTES, b"\x00"))
    elif header.family != "UNSPEC":
        parts.append(_ip_of(header.src_addr, header.family).packed)
        parts.append(_ip_of(header.dst_addr, header.family).packed)
        parts.append(_PORTS.pack(header.src_port, header.dst_port))
    for type_, value in header.tlvs:
        if not 0 <= type_ <= 0xFF or len(value) > 0xFFFF:
            raise LocalProtocolError(f"TLV type {type_} / length {len(value)} out of range")
        parts.append(_TLV_HEAD.pack(type_, len(value)) + bytes(value))
    body = b"".join(parts)
    if len(body) > 0xFFFF:
        raise LocalProtocolError(f"v2 header body of {len(body)} bytes exceeds 65535")
    return _V2_HEAD.pack(V2_SIGNATURE, 0x20 | command, fam, len(body)) + body


def encode(header: ProxyHeader) -> bytes:
    """Serialise ``header`` in the format its ``version`` names."""
    return encode_v1(header) if header.version == 1 else encode_v2(header)


def for_connection(
    src: tuple[str, int] | None,
    dst: tuple[str, int] | None,
    version: Literal[1, 2] = 1,
    *,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> ProxyHeader:
    """The header a proxy sends upstream for a TCP connection from ``src`` to ``dst``.

    ``src`` is the client's ``getpeername()``, ``dst`` the proxy's ``getsockname()`` of the
    accepted socket (IPv6 tuples of 4 items are fine: only host and port are read). Scope
    ids (``%eth0``) are dropped. When the two families differ, an IPv4-mapped IPv6 address
    is unmapped if that makes them agree, otherwise the IPv4 side is mapped into IPv6
    (what HAProxy does), so v1 can always express the pair. When either side is ``None``
    (a UNIX socket, or unknown), the header is UNKNOWN / UNSPEC.

    Raises:
        LocalProtocolError: a host is not an IP address.
    """
    if src is None or dst is None:
        return ProxyHeader(version, "PROXY", "UNSPEC", "UNSPEC")
    a, b = _host_ip(src[0]), _host_ip(dst[0])
    if a.version != b.version:
        a, b = _unmap(a), _unmap(b)
    if a.version != b.version:
        a, b = _to_v6(a), _to_v6(b)
    family: Family = "INET" if a.version == 4 else "INET6"
    return ProxyHeader(
        version, "PROXY", family, "STREAM", str(a), src[1], str(b), dst[1], tuple(tlvs)
    )


def _host_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise LocalProtocolError(f"{host!r} is not an IP address") from None


def _unmap(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _to_v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{ip}")
    return ip
