"""Fixtures shared by every test.

* Async tests run on both loops: pytest-asyncio's ``pytest_asyncio_loop_factories`` hook
  parametrises each of them over asyncio and uvloop (as uvicorn runs each test on both
  HTTP parsers).
* ``tls_certs``: a trustme CA with a server certificate for 127.0.0.1, ::1 and localhost.
* ``redis``, ``postgres``: real servers started on first use (``tests/helpers/services.py``);
  ``pg_url``: a fresh PostgreSQL schema per test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
import uvloop

from tests.helpers import services


def pytest_asyncio_loop_factories(
    config, item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.get_closest_marker("single_loop"):
        return {"asyncio": asyncio.new_event_loop}
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


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.RedisServer]:
    """A private redis-server for the whole run (tests flush what they use)."""
    with services.redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """The PostgreSQL test database URL (the cluster is started if it is down)."""
    with services.postgres_server() as url:
        yield url


@pytest.fixture
def pg_url(postgres: str) -> Iterator[str]:
    """A URL into a schema of its own for this test, dropped afterwards."""
    with services.postgres_schema(postgres) as url:
        yield url
