"""Helpers shared by the transport and messaging tests: log capture, echo servers, clients."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest

from netstack.config import EchoServerConfig, Limits, Timeouts
from netstack.servers.messaging import create_server
from netstack.transport.listener import DatagramServer, Server
from tests.helpers import TIMEOUT


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def logs():
    """Capture netstack's own logger directly: the CLI may have set propagate=False on it."""
    handler = ListHandler()
    logger = logging.getLogger("netstack")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def server_config(bind: str = "127.0.0.1:0", **kw: object) -> EchoServerConfig:
    limits = kw.pop("limits", Limits())
    timeouts = kw.pop("timeouts", Timeouts(graceful_timeout=TIMEOUT))
    return EchoServerConfig(bind=bind, limits=limits, timeouts=timeouts, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def echo_server(cfg: EchoServerConfig | None = None) -> AsyncIterator[Server]:
    srv = create_server(cfg or server_config())
    assert isinstance(srv, Server)
    async with srv:
        yield srv


@asynccontextmanager
async def udp_server(cfg: EchoServerConfig) -> AsyncIterator[DatagramServer]:
    srv = create_server(cfg)
    assert isinstance(srv, DatagramServer)
    async with srv:
        yield srv


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(TIMEOUT):
        (size,) = struct.unpack("!I", await reader.readexactly(4))
        return await reader.readexactly(size)


async def read_eof(reader: asyncio.StreamReader) -> bytes:
    """Read until the server closes; a reset counts as closed too."""
    async with asyncio.timeout(TIMEOUT):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


@asynccontextmanager
async def client(
    addr: tuple[str, int], **kw: object
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(addr[0], addr[1], **kw)  # type: ignore[arg-type]
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
