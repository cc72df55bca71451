"""Pins the public API of the top-level package."""

from __future__ import annotations

import subprocess
import sys

import netstack


def test_public_names() -> None:
    assert sorted(netstack.__all__) == [
        "ConfigError",
        "ConnectionClosed",
        "LimitExceeded",
        "LocalProtocolError",
        "NetstackError",
        "NetstackTimeout",
        "NoBackendAvailable",
        "ProtocolError",
        "RemoteProtocolError",
        "__version__",
    ]
    for name in netstack.__all__:
        assert hasattr(netstack, name)


def test_core_import_stays_light() -> None:
    """Importing netstack and its CLI must not pull heavy or optional dependencies."""
    code = (
        "import sys, netstack, netstack.cli, netstack.proto.framing;"
        "heavy = {'rich', 'matplotlib', 'psutil', 'websockets', 'redis', 'grpc', 'uvloop',"
        " 'numpy'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_http11_public_names() -> None:
    import netstack.proto.http11 as http11

    assert sorted(http11.__all__) == [
        "ClientState",
        "ConnectionClosed",
        "Data",
        "END_OF_MESSAGE",
        "EndOfMessage",
        "Event",
        "Framing",
        "HTTPClientConnection",
        "HTTPConnection",
        "Headers",
        "InformationalResponse",
        "Request",
        "Response",
        "State",
    ]
    for name in http11.__all__:
        assert hasattr(http11, name)


def test_rpc_public_names() -> None:
    import netstack.servers.rpc as rpc

    assert sorted(rpc.__all__) == ["NotesService", "RPCServer", "database_location", "open_store"]
    for name in rpc.__all__:
        assert hasattr(rpc, name)
