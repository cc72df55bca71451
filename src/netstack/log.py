"""Logger names and the one place logging is configured (called by the CLI only).

Diagnostics go to ``logging.getLogger(__name__)``; per-request lines go to
``netstack.access``. DEBUG lines use websockets' prefixes: ``>`` send, ``<`` receive,
``=`` state, ``x`` close, ``!`` error, and carry ``extra={"conn_id": ...}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal

ACCESS_LOGGER = "netstack.access"
# The balancer's per-request lines (HAProxy's httplog), apart from the WSGI server's.
LB_ACCESS_LOGGER = "netstack.lb.access"

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT` after an optional prefix, the HH:MM:SS stamp made once a second.

    :meth:`line` produces what :meth:`format` would for a plain record (no exception, no
    stack), for :func:`write_info_line`.
    """

    def __init__(self, prefix: str = "") -> None:
        super().__init__(prefix.replace("%", "%%") + TEXT_FORMAT, "%H:%M:%S")
        self.prefix = prefix
        self._second = -1
        self._stamp = ""

    def stamp(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%H:%M:%S", time.localtime(when))
        return self._stamp

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created)

    def line(self, name: str, levelname: str, message: str, when: float) -> str:
        return f"{self.prefix}{self.stamp(when)} {levelname:<7} {name}: {message}"


_NETSTACK = logging.getLogger("netstack")


def write_info_line(logger: logging.Logger, message: str) -> bool:
    """Print an INFO ``message`` of ``logger`` as :func:`configure`'s text handler would,
    without building a LogRecord, when nothing else could see that record.

    That is: ``logger`` is enabled for INFO, it and its ancestors up to ``netstack`` have no
    handlers and ``logger`` no filters, ``netstack`` does not propagate and has exactly one
    handler, the plain stream handler :func:`configure` installed, with a
    :class:`TextFormatter` and no filters. Anything else (JSON logs, a test's capture, an
    application's own handlers) returns False and the caller logs the usual way. A
    per-request logger calls this first: a LogRecord and Formatter.format cost ~9 µs.

    Returns:
        Whether the line was written.
    """
    if logger.filters or not logger.propagate or not logger.isEnabledFor(logging.INFO):
        return False
    node: logging.Logger | None = logger
    while node is not None and node is not _NETSTACK:
        if node.handlers:
            return False
        node = node.parent
    if node is None or _NETSTACK.propagate or len(_NETSTACK.handlers) != 1:
        return False
    handler = _NETSTACK.handlers[0]
    formatter = handler.formatter
    if (
        type(handler) is not logging.StreamHandler
        or handler.filters
        or handler.level > logging.INFO
        or type(formatter) is not TextFormatter
    ):
        return False
    text = formatter.line(logger.name, "INFO", message, time.time()) + handler.terminator
    handler.acquire()
    try:
        handler.stream.write(text)
        handler.flush()
    except Exception:  # a closed or broken stream: the logging path reports it
        return False
    finally:
        handler.release()
    return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(
    level: Literal["debug", "info", "warning", "error"] = "info",
    fmt: Literal["text", "json"] = "text",
) -> None:
    """Send netstack's logs to stderr at ``level`` in ``fmt``. Idempotent."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger("netstack")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def prefix_text_lines(prefix: str) -> None:
    """Start every text log line with ``prefix`` (JSON lines are left as they are).

    ``netstack up`` prefixes its own lines as it prefixes its children's.
    """
    for handler in logging.getLogger("netstack").handlers:
        if not isinstance(handler.formatter, JSONFormatter):
            handler.setFormatter(TextFormatter(prefix))
