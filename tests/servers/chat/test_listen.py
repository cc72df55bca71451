"""The chat server's listeners: their listen(2) queue."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from netstack.config import ChatLimits
from tests.servers.chat.support import chat_server


def listen_queue(port: int) -> int:
    """The listen(2) backlog of the socket listening on ``port`` (``ss``'s Send-Q)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[2])  # State Recv-Q Send-Q Local Peer


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) not installed")
async def test_both_listeners_use_the_configured_backlog(tmp_path):
    """asyncio's default of 100 made 200 clients connecting at once to a busy server lose
    handshakes (seen by bench/chat.py at 10,000 clients with the server pinned)."""
    limits = ChatLimits(flood_rate=10_000, flood_burst=10_000, backlog=777)
    async with chat_server(tmp_path / "chat.db", chat_limits=limits) as srv:
        assert listen_queue(srv.ws_address[1]) == 777
        assert listen_queue(srv.tcp_address[1]) == 777
    async with chat_server(tmp_path / "chat.db") as srv:
        assert listen_queue(srv.ws_address[1]) == 2048  # the default
