"""Logger names and the one place logging is configured (called by the CLI only).

Diagnostics go to ``logging.getLogger(__name__)``; per-request lines go to
``netstack.access``. DEBUG lines use websockets' prefixes: ``>`` send, ``<`` receive,
``=`` state, ``x`` close, ``!`` error, and carry ``extra={"conn_id": ...}``.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Literal

ACCESS_LOGGER = "netstack.access"
# The balancer's per-request lines (HAProxy's httplog), apart from the WSGI server's.
LB_ACCESS_LOGGER = "netstack.lb.access"

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


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
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, "%H:%M:%S"))
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
            text = prefix.replace("%", "%%") + TEXT_FORMAT
            handler.setFormatter(logging.Formatter(text, "%H:%M:%S"))
