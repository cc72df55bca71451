"""Fixtures shared by every test.

* Async tests run on both loops: pytest-asyncio's ``pytest_asyncio_loop_factories`` hook
  parametrises each of them over asyncio and uvloop (as uvicorn runs each test on both
  HTTP parsers).
* ``tls_certs``: a trustme CA with a server certificate for 127.0.0.1, ::1 and localhost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
import uvloop


def pytest_asyncio_loop_factories(
    config, item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@dataclass(frozen=True)
class TLSFiles:
    ca: trustme.CA
    cafile: str
    certfile: str
    keyfile: str


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "::1", "localhost")
    d: Path = tmp_path_factory.mktemp("tls")
    cafile, certfile, keyfile = d / "ca.pem", d / "cert.pem", d / "key.pem"
    ca.cert_pem.write_to_path(str(cafile))
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    return TLSFiles(ca, str(cafile), str(certfile), str(keyfile))


@pytest.fixture(autouse=True)
def _restore_netstack_logging():
    """In-process CLI tests call log.configure(), which stops propagation to the root
    logger; put the netstack logger back so caplog sees records in later tests."""
    import logging

    logger = logging.getLogger("netstack")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
