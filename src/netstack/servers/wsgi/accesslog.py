"""Access log lines in gunicorn's ``%(atom)s`` format, on the ``netstack.access`` logger.

Atoms (gunicorn's): ``h`` remote address, ``l`` ``-``, ``u`` remote user, ``t`` time in
common log format, ``r`` request line, ``m`` method, ``U`` path, ``q`` query, ``H``
protocol, ``s`` status, ``B``/``b`` response body bytes (``b`` is ``-`` for 0), ``f``
referer, ``a`` user agent, ``T`` seconds, ``M`` milliseconds, ``D`` microseconds, ``L``
decimal seconds, ``p`` pid, ``{name}i`` request header, ``{name}o`` response header,
``{NAME}e`` WSGI environ variable (looked up as written, then upper-cased).

A format is compiled once (:class:`AccessFormat`): only the atoms it uses are computed
per request, and a bad format (unknown atom, ``%s`` without a name, ``%(s)d``) is a
:class:`~netstack.errors.ConfigError` at start-up rather than a broken line per request.
Every record also carries the main fields as ``extra`` attributes, so with
``--log-format json`` an access line is a JSON object with ``status``, ``method``...
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from netstack.errors import ConfigError
from netstack.log import ACCESS_LOGGER, write_info_line
from netstack.servers.logformat import AtomFormat, clf_time

if TYPE_CHECKING:
    from netstack.proto.http11 import Request
    from netstack.servers.wsgi.protocol import Exchange

access_logger = logging.getLogger(ACCESS_LOGGER)


class _Line:
    """What the atom functions read: the exchange and its duration."""

    __slots__ = ("elapsed", "environ", "exchange", "request")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange: Exchange = exchange
        self.request: Request
        self.environ: dict[str, Any]
        self.elapsed: float
        self.request = exchange.request
        self.environ = exchange.environ
        self.elapsed = time.perf_counter() - exchange.start_time if exchange.start_time else 0.0


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str:
    for n, v in headers:
        if n == name:
            return v.decode("latin-1")
    return "-"


def _method(x: _Line) -> str:
    return x.request.method.decode("latin-1")


def _protocol(x: _Line) -> str:
    return str(x.environ.get("SERVER_PROTOCOL", "HTTP/1.1"))


def _request_line(x: _Line) -> str:
    return f"{_method(x)} {x.request.target.decode('latin-1')} {_protocol(x)}"


ATOMS: Final[dict[str, Callable[[_Line], str]]] = {
    "h": lambda x: str(x.environ.get("REMOTE_ADDR", "-")),
    "l": lambda x: "-",
    "u": lambda x: str(x.environ.get("REMOTE_USER") or "-"),
    "t": lambda x: clf_time(),
    "r": _request_line,
    "m": _method,
    "U": lambda x: str(x.environ.get("PATH_INFO", "")),
    "q": lambda x: str(x.environ.get("QUERY_STRING", "")),
    "H": _protocol,
    "s": lambda x: str(x.exchange.status_code),
    "B": lambda x: str(x.exchange.sent_bytes),
    "b": lambda x: str(x.exchange.sent_bytes) if x.exchange.sent_bytes else "-",
    "f": lambda x: _header(x.request.headers, b"referer"),
    "a": lambda x: _header(x.request.headers, b"user-agent"),
    "T": lambda x: str(int(x.elapsed)),
    "M": lambda x: str(int(x.elapsed * 1000)),
    "D": lambda x: str(int(x.elapsed * 1_000_000)),
    "L": lambda x: f"{x.elapsed:.6f}",
    "p": lambda x: f"<{os.getpid()}>",
}


def _special(name: str, kind: str) -> Callable[[_Line], str] | None:
    if kind == "i":
        raw = name.lower().encode("latin-1", "replace")
        return lambda x: _header(x.request.headers, raw)
    if kind == "o":
        raw = name.lower().encode("latin-1", "replace")
        return lambda x: _header(x.exchange.response_headers, raw)
    if kind != "e":
        return None
    upper = name.upper()
    return lambda x: str(x.environ.get(name, x.environ.get(upper, "-")))


class AccessFormat:
    """A compiled gunicorn-style format.

    Raises:
        ConfigError: naming ``access_log_format``, for an unknown atom, a conversion
            without an atom name, or a format ``%`` cannot apply.
    """

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.compiled = AtomFormat(
            fmt, ATOMS, _special, known=f"{' '.join(ATOMS)} {{header}}i {{header}}o {{variable}}e"
        )

    def format(self, exchange: Exchange) -> str:
        return self.compiled.format(_Line(exchange))

    def log(self, exchange: Exchange) -> None:
        """Log one line, with the main fields as ``extra`` (for JSON logs)."""
        try:
            line = self.format(exchange)
        except Exception as exc:  # a header value with a surprise: still log something
            line = f"access log format failed ({exc!r})"
        if write_info_line(access_logger, line):
            return  # plain text to stderr: the extra fields would not be shown anyway
        request = exchange.request
        environ = exchange.environ
        access_logger.info(
            line,
            extra={
                "remote_addr": environ.get("REMOTE_ADDR", "-"),
                "method": request.method.decode("latin-1"),
                "path": environ.get("PATH_INFO", ""),
                "query": environ.get("QUERY_STRING", ""),
                "status": exchange.status_code,
                "bytes": exchange.sent_bytes,
                "duration_ms": (
                    round((time.perf_counter() - exchange.start_time) * 1000, 3)
                    if exchange.start_time
                    else None
                ),
            },
        )


_compiled: dict[str, AccessFormat] = {}


def check_format(fmt: str) -> AccessFormat:
    """Compile ``fmt`` once (cached); raise ConfigError when it is wrong."""
    compiled = _compiled.get(fmt)
    if compiled is None:
        compiled = AccessFormat(fmt)
        if len(_compiled) < 16:
            _compiled[fmt] = compiled
    return compiled


def log_exchange(fmt: str, exchange: Any) -> None:
    """Log one line for a finished exchange (``WSGIServer.request_finished`` calls it)."""
    try:
        compiled = check_format(fmt)
    except ConfigError as exc:  # the CLI checks first; a library user may not have
        method = exchange.request.method.decode("latin-1")
        access_logger.info("%s: %s %s", exc, method, exchange.status_code)
        return
    compiled.log(exchange)
