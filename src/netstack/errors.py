"""The whole netstack exception tree.

::

    NetstackError
    ├── ConfigError(NetstackError, ValueError)      bad setting; names the field
    ├── ProtocolError                               abstract: never raised directly
    │   ├── LocalProtocolError                      we tried to send something illegal
    │   └── RemoteProtocolError                     the peer broke the protocol
    │       └── LimitExceeded                       a configured limit was hit
    ├── ConnectionClosed                            used after close; .reason
    ├── NetstackTimeout(NetstackError, TimeoutError)
    └── NoBackendAvailable                          lb: maps to 502/503

Exceptions are for the caller; replies go to the peer. Each server turns an error into a
reply (an HTTP status, a close code) in one place. The split between local and remote
protocol errors and the ``status_hint`` come from h11.
"""

from __future__ import annotations


class NetstackError(Exception):
    """Base class of every exception netstack raises on purpose."""


class ConfigError(NetstackError, ValueError):
    """A setting is invalid. The message names the field, e.g. ``max_frame_bytes``.

    Attributes:
        field: the offending setting's name, when known.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ProtocolError(NetstackError):
    """Abstract base of protocol violations. Raise a subclass.

    Attributes:
        status_hint: the HTTP status a server should answer with (h11's idea).
        close_code: the WebSocket close code that fits, when it applies.
    """

    def __init__(
        self, message: str, *, status_hint: int = 400, close_code: int | None = None
    ) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise Local- or RemoteProtocolError")
        super().__init__(message)
        self.status_hint = status_hint
        self.close_code = close_code


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids: a bug in the caller."""

    def __init__(self, message: str, *, status_hint: int = 500) -> None:
        super().__init__(message, status_hint=status_hint)


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol."""


class LimitExceeded(RemoteProtocolError):
    """The peer exceeded a configured limit.

    Attributes:
        limit: the limit's setting name, e.g. ``"max_frame_bytes"``.
        value: the configured maximum.
        actual: what the peer sent or announced, when known.
    """

    def __init__(
        self,
        limit: str,
        value: int,
        *,
        actual: int | None = None,
        status_hint: int = 413,
        close_code: int | None = 1009,
    ) -> None:
        detail = f" (got {actual})" if actual is not None else ""
        super().__init__(
            f"{limit} exceeded: limit is {value}{detail}",
            status_hint=status_hint,
            close_code=close_code,
        )
        self.limit = limit
        self.value = value
        self.actual = actual


class ConnectionClosed(NetstackError):
    """The connection is closed; nothing more can be sent or received.

    Attributes:
        reason: why it closed, for logs.
    """

    def __init__(self, reason: str = "connection closed") -> None:
        super().__init__(reason)
        self.reason = reason


class NetstackTimeout(NetstackError, TimeoutError):
    """An operation did not finish within its configured timeout."""


class NoBackendAvailable(NetstackError):
    """The load balancer has no healthy backend for a request."""
