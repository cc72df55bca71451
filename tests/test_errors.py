from __future__ import annotations

import pytest

from netstack.errors import (
    ConfigError,
    ConnectionClosed,
    LimitExceeded,
    LocalProtocolError,
    NetstackError,
    NetstackTimeout,
    NoBackendAvailable,
    ProtocolError,
    RemoteProtocolError,
)


def test_tree() -> None:
    assert issubclass(ConfigError, NetstackError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(LimitExceeded, RemoteProtocolError)
    assert issubclass(NetstackTimeout, TimeoutError)
    assert issubclass(NoBackendAvailable, NetstackError)
    assert issubclass(ConnectionClosed, NetstackError)


def test_protocol_error_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        ProtocolError("x")


def test_hints() -> None:
    assert RemoteProtocolError("bad").status_hint == 400
    assert LocalProtocolError("bug").status_hint == 500
    exc = LimitExceeded("max_header_bytes", 16, actual=20, status_hint=431)
    assert (exc.limit, exc.value, exc.actual, exc.status_hint) == ("max_header_bytes", 16, 20, 431)
    assert exc.close_code == 1009
    assert str(exc) == "max_header_bytes exceeded: limit is 16 (got 20)"
    assert str(LimitExceeded("max_x", 1)) == "max_x exceeded: limit is 1"


def test_config_error_names_field() -> None:
    exc = ConfigError("bind: bad", field="bind")
    assert exc.field == "bind"
    assert ConnectionClosed().reason == "connection closed"
