"""The L7 access log: one line per request on the ``netstack.lb.access`` logger.

Like HAProxy's ``option httplog`` and nginx's ``access_log``, on by default for http
frontends (``access_log = false`` or ``--no-access-log`` turns it off). The line format
uses gunicorn-style ``%(atom)s`` atoms (the WSGI server's, :mod:`netstack.servers.logformat`)
plus the proxy's own:

=============  ==============================================================
``client``     client ``ip:port`` (the PROXY header's address when trusted)
``h``          client ip
``frontend``   frontend name; ``pool``, ``backend``: where it went (``-``: none)
``r``          request line; ``m`` method, ``U`` path, ``q`` query, ``H`` protocol
``s``          status sent to the client (``-``: none)
``B``          bytes sent to the client (head and body); ``b``: ``-`` for 0
``Tq``         ms to receive the request head, from its first byte
``Tw``         ms from the head to the last backend attempt (earlier tries, retries)
``Tc``         ms to connect to that backend (0: a pooled keep-alive connection)
``Tr``         ms from the request sent to the response head received
``Tt``         ms in all, first byte to last (a tunnel: until it closed)
``rid``        request id sent to the backend; ``retries``: attempts after the first
``term``       how it ended: ``ok``, ``upgraded`` (a tunnel), ``client_aborted``,
               ``backend_timeout`` (504, or cut mid-response), ``bad_response`` (502),
               ``backend_closed`` (502 before any response byte), ``backend_aborted``
               (closed mid-response: the client got a truncated message), ``no_backend``
               (503), ``rate_limited`` (429), ``forbidden`` (403), ``bad_request``
               (400/413/431), ``header_timeout``/``body_timeout`` (408),
               ``max_connections`` (503 at accept), ``not_allowed`` (405)
``t``          time, common log format; ``a`` user agent, ``f`` referer,
               ``{name}i`` a request header
=============  ==============================================================

A timing of a phase the request never reached is ``-``. Every record carries the same
fields as ``extra`` attributes, so with ``--log-format json`` a line is a JSON object.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from netstack.config import DEFAULT_LB_ACCESS_LOG_FORMAT
from netstack.log import LB_ACCESS_LOGGER, write_info_line
from netstack.servers.logformat import AtomFormat, clf_time

if TYPE_CHECKING:
    from netstack.servers.lb.http import ProxyConnection

access_logger = logging.getLogger(LB_ACCESS_LOGGER)

DEFAULT_FORMAT: Final = DEFAULT_LB_ACCESS_LOG_FORMAT

# Who answered, by status, when the proxy answers itself (reply()).
REPLY_TERMS: Final = {
    400: "bad_request",
    403: "forbidden",
    405: "not_allowed",
    408: "body_timeout",
    429: "rate_limited",
    502: "bad_response",
    503: "no_backend",
    504: "backend_timeout",
}


def _ms(start: float, end: float) -> str:
    return f"{(end - start) * 1000:.3f}" if start and end else "-"


def _client(c: ProxyConnection) -> str:
    text = c.log_client
    if text is None:
        peer = c.peer
        port = peer[1] if isinstance(peer, tuple) else "-"
        ip = c.client_ip or "-"
        text = c.log_client = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    return text


def _method(c: ProxyConnection) -> str:
    r = c.request
    return r.method.decode("latin-1") if r is not None else "-"


def _target(c: ProxyConnection) -> str:
    r = c.request
    return r.target.decode("latin-1") if r is not None else "-"


def _protocol(c: ProxyConnection) -> str:
    r = c.request
    return "HTTP/" + r.http_version.decode() if r is not None else "-"


def _request_line(c: ProxyConnection) -> str:
    r = c.request
    if r is None:
        return "-"
    return (
        f"{r.method.decode('latin-1')} {r.target.decode('latin-1')} HTTP/{r.http_version.decode()}"
    )


def _header(c: ProxyConnection, name: bytes) -> str:
    r = c.request
    if r is not None:
        for n, v in r.headers:
            if n == name:
                return v.decode("latin-1")
    return "-"


def _rid(c: ProxyConnection) -> str:
    rid = c.rid
    if rid is None:
        return "-"
    if isinstance(rid, int):
        return f"{c.listener.id_text}{rid:x}"
    return rid.decode("latin-1")


def _pool(c: ProxyConnection) -> str:
    route = c.route
    return route.pool.name if route is not None else "-"


def _backend(c: ProxyConnection) -> str:
    b = c.log_backend
    return b.name if b is not None else "-"


def _status(c: ProxyConnection) -> str:
    return str(c.status) if c.status else "-"


ATOMS: Final[dict[str, Callable[[ProxyConnection], str]]] = {
    "client": _client,
    "h": lambda c: c.client_ip or "-",
    "frontend": lambda c: c.state.cfg.name,
    "pool": _pool,
    "backend": _backend,
    "r": _request_line,
    "m": _method,
    "U": lambda c: _target(c).partition("?")[0],
    "q": lambda c: _target(c).partition("?")[2],
    "H": _protocol,
    "s": _status,
    "B": lambda c: str(c.sent),
    "b": lambda c: str(c.sent) if c.sent else "-",
    "Tq": lambda c: _ms(c.t0, c.t_start),
    "Tw": lambda c: _ms(c.t_start, c.t_try),
    "Tc": lambda c: _ms(c.t_try, c.t_up),
    "Tr": lambda c: _ms(c.t_up, c.t_head),
    "Tt": lambda c: _ms(c.t0, c.t_end),
    "rid": _rid,
    "retries": lambda c: str(max(0, c.attempts - 1)),
    "term": lambda c: c.term or "ok",
    "t": lambda c: clf_time(),
    "a": lambda c: _header(c, b"user-agent"),
    "f": lambda c: _header(c, b"referer"),
}


def _special(name: str, kind: str) -> Callable[[ProxyConnection], str] | None:
    if kind != "i":
        return None
    raw = name.lower().encode("latin-1", "replace")
    return lambda c: _header(c, raw)


class AccessLog:
    """An http frontend's compiled access log format.

    Cost: the values are computed once per line (the ``extra`` fields and the text share
    them), the default format is one f-string, and the record goes straight to the
    logger's handlers (no caller lookup: every line comes from here anyway).

    Raises:
        ConfigError: naming ``access_log_format``: an unknown atom or a bad format.
    """

    def __init__(self, fmt: str = DEFAULT_FORMAT) -> None:
        self.fmt = fmt
        self.compiled = AtomFormat(fmt, ATOMS, _special, known=f"{' '.join(ATOMS)} {{header}}i")
        self.default = fmt == DEFAULT_FORMAT

    def log(self, c: ProxyConnection) -> None:
        """Log the exchange ``c`` holds (the caller resets it afterwards)."""
        c.t_end = end = time.perf_counter()
        if not c.t0:
            c.t0 = c.t_start or end
        extra = fields(c)
        try:
            line = _default_line(c, extra) if self.default else self.compiled.format(c)
        except Exception as exc:  # a surprise in a header value: still log something
            line = f"access log format failed ({exc!r})"
        logger = access_logger
        if write_info_line(logger, line):
            return  # plain text to stderr: the extra fields would not be shown anyway
        record = logging.LogRecord(logger.name, logging.INFO, __file__, 0, line, None, None)
        record.__dict__.update(extra)
        logger.handle(record)


def _default_line(c: ProxyConnection, x: dict[str, Any]) -> str:
    """DEFAULT_FORMAT, written out (the generic path costs a call per atom)."""
    request = c.request
    if request is None:
        line = "-"
    else:
        line = f"{x['method']} {x['target']} HTTP/{request.http_version.decode()}"
    return (
        f'{x["client"]} {x["frontend"]} {x["pool"]}/{x["backend"]} "{line}" '
        f"{x['status'] or '-'} {x['bytes']} "
        f"{_fixed(x['tq_ms'])}/{_fixed(x['tw_ms'])}/{_fixed(x['tc_ms'])}/"
        f"{_fixed(x['tr_ms'])}/{_fixed(x['tt_ms'])} "
        f"{x['request_id']} {x['retries']} {x['term']}"
    )


def _fixed(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f}"


def fields(c: ProxyConnection) -> dict[str, Any]:
    """The line's main fields by name (``extra`` of the record: JSON logs show them)."""
    route = c.route
    backend = c.log_backend
    request = c.request
    t0, t_start, t_try, t_up, t_head, t_end = c.t0, c.t_start, c.t_try, c.t_up, c.t_head, c.t_end
    return {
        "client": _client(c),
        "frontend": c.state.cfg.name,
        "pool": route.pool.name if route is not None else "-",
        "backend": backend.name if backend is not None else "-",
        "method": request.method.decode("latin-1") if request is not None else "-",
        "target": request.target.decode("latin-1") if request is not None else "-",
        "status": c.status or None,
        "bytes": c.sent,
        "tq_ms": round((t_start - t0) * 1000, 3) if t_start else None,
        "tw_ms": round((t_try - t_start) * 1000, 3) if t_try and t_start else None,
        "tc_ms": round((t_up - t_try) * 1000, 3) if t_up and t_try else None,
        "tr_ms": round((t_head - t_up) * 1000, 3) if t_head and t_up else None,
        "tt_ms": round((t_end - t0) * 1000, 3),
        "request_id": _rid(c),
        "retries": c.attempts - 1 if c.attempts > 1 else 0,
        "term": c.term or "ok",
    }


__all__ = ["DEFAULT_FORMAT", "REPLY_TERMS", "AccessLog", "access_logger", "fields"]
