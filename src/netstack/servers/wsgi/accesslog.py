"""Access log lines in gunicorn's ``%(atom)s`` format, on the ``netstack.access`` logger.

Atoms (gunicorn's): ``h`` remote address, ``l`` ``-``, ``u`` remote user, ``t`` time in
common log format, ``r`` request line, ``m`` method, ``U`` path, ``q`` query, ``H``
protocol, ``s`` status, ``B``/``b`` response body bytes (``b`` is ``-`` for 0), ``f``
referer, ``a`` user agent, ``T`` seconds, ``M`` milliseconds, ``D`` microseconds, ``L``
decimal seconds, ``p`` pid, ``{name}i`` request header, ``{name}o`` response header,
``{NAME}e`` environ variable.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from netstack.log import ACCESS_LOGGER

access_logger = logging.getLogger(ACCESS_LOGGER)


class Atoms(dict[str, str]):
    """The mapping a format string is applied to; header atoms are looked up lazily."""

    def __init__(self, values: dict[str, str], exchange: Any) -> None:
        super().__init__(values)
        self._exchange = exchange

    def __missing__(self, key: str) -> str:
        if len(key) > 3 and key[0] == "{" and key[-2] == "}":
            name, kind = key[1:-2].lower(), key[-1]
            if kind == "i":
                raw = name.encode("latin-1", "replace")
                for n, v in self._exchange.request.headers:
                    if n == raw:
                        return str(v.decode("latin-1"))
            elif kind == "o":
                raw = name.encode("latin-1", "replace")
                for n, v in self._exchange.response_headers:
                    if n == raw:
                        return str(v.decode("latin-1"))
            elif kind == "e":
                return str(self._exchange.environ.get(key[1:-2], "-"))
        return "-"


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    for n, v in headers:
        if n == name:
            return v.decode("latin-1")
    return "-"


def log_exchange(fmt: str, exchange: Any) -> None:
    """Log one line for a finished exchange."""
    request = exchange.request
    environ = exchange.environ
    elapsed = time.perf_counter() - exchange.start_time
    method = request.method.decode("latin-1")
    target = request.target.decode("latin-1")
    protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
    size = exchange.sent_bytes
    values = {
        "h": environ.get("REMOTE_ADDR", "-"),
        "l": "-",
        "u": environ.get("REMOTE_USER", "-") or "-",
        "t": time.strftime("[%d/%b/%Y:%H:%M:%S %z]"),
        "r": f"{method} {target} {protocol}",
        "m": method,
        "U": environ.get("PATH_INFO", ""),
        "q": environ.get("QUERY_STRING", ""),
        "H": protocol,
        "s": str(exchange.status_code),
        "B": str(size),
        "b": str(size) if size else "-",
        "f": _header(request.headers, b"referer"),
        "a": _header(request.headers, b"user-agent"),
        "T": str(int(elapsed)),
        "M": str(int(elapsed * 1000)),
        "D": str(int(elapsed * 1_000_000)),
        "L": f"{elapsed:.6f}",
        "p": f"<{os.getpid()}>",
    }
    try:
        line = fmt % Atoms(values, exchange)
    except (TypeError, ValueError, KeyError) as exc:
        line = f"bad access_log_format ({exc}): {values['r']} {values['s']}"
    access_logger.info(line)
