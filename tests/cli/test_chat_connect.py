"""``netstack chat connect``: the terminal client in a real pseudo-terminal, against a real server.

The client runs as a subprocess on the slave side of a pty (prompt_toolkit sees a real
terminal); the test reads the master side, strips the terminal escapes, and types lines
as a person would. The other party is a websockets client in the test.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from netstack.cli import main
from netstack.servers.chat import ChatServer
from tests.helpers import TIMEOUT, apoll_until, free_port
from tests.servers.chat.support import PASSWORD, chat_config, ws

pytestmark = pytest.mark.single_loop  # a terminal is under test, not the event loop

# CSI sequences, OSC strings, charset and keypad switches: what prompt_toolkit writes.
ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]"
)


class Terminal:
    """A subprocess on a pseudo-terminal: read what it shows, type into it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.master = master
        self.raw = bytearray()
        os.set_blocking(master, False)
        asyncio.get_running_loop().add_reader(master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
            return
        self.raw += data

    def screen(self) -> str:
        """Everything shown so far, without escapes and carriage returns."""
        text = ESCAPES.sub("", self.raw.decode(errors="replace"))
        return text.replace("\r", "")

    async def shows(self, needle: str) -> None:
        try:
            await apoll_until(lambda: needle in self.screen(), timeout=TIMEOUT * 2)
        except TimeoutError:
            raise AssertionError(f"{needle!r} not on screen:\n{self.screen()[-3000:]}") from None

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    async def exit_code(self) -> int:
        await apoll_until(lambda: self.proc.poll() is not None, timeout=TIMEOUT * 2)
        return self.proc.returncode

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.master)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        os.close(self.master)


def client_env() -> dict[str, str]:
    return {
        **os.environ,
        "TERM": "xterm-256color",
        "PROMPT_TOOLKIT_NO_CPR": "1",  # no terminal emulator here to answer cursor queries
        "NETSTACK_CHAT_PASSWORD": PASSWORD,
        "PYTHONUNBUFFERED": "1",
    }


async def test_terminal_client_chats_and_reconnects_with_backfill(tmp_path: Path) -> None:
    db = tmp_path / "chat.sqlite3"
    port = free_port()
    srv = ChatServer(chat_config(db, bind=f"127.0.0.1:{port}", tcp_bind=None))
    await srv.start()
    bob = await ws(srv)
    await bob.register("bob")
    await bob.ok("create", room="general", topic="all things")
    argv = [sys.executable, "-m", "netstack", "chat", "connect"]
    argv += ["--url", f"ws://127.0.0.1:{port}/ws", "--nick", "alice", "--register"]
    argv += ["--reconnect-initial", "0.1", "--reconnect-max", "0.5"]
    term = Terminal(argv, client_env())
    try:
        await term.shows("* logged in as alice")
        term.type("/join general")
        await term.shows("* joined #general - all things")
        await term.shows("#general>")  # the prompt names the room

        await bob.ok("say", room="general", text="hi alice, from bob")
        await term.shows("#general <bob> hi alice, from bob")
        term.type("hello bob, typed in a terminal")
        own = await bob.expect("message")  # bob's own line first, then alice's
        assert own["message"]["from"] == "bob"
        got = await bob.expect("message")
        assert (got["message"]["from"], got["message"]["text"]) == (
            "alice",
            "hello bob, typed in a terminal",
        )

        term.type("/msg bob a private word")
        dm = await bob.expect("dm")
        assert (dm["message"]["from"], dm["message"]["text"]) == ("alice", "a private word")
        await bob.ok("dm", to="alice", text="private reply")
        await term.shows("[dm] bob -> alice: private reply")

        term.type("/who")
        await term.shows("* #general: alice [online], bob (owner) [online]")
        term.type("/rooms")
        await term.shows("* #general 2 member(s) - all things")
        term.type("/history 5")
        await term.shows("#general <alice> hello bob, typed in a terminal")
        term.type("/nonsense")
        await term.shows("! unknown command or missing argument: /nonsense")

        # The server goes away; while it is down, bob says something through another
        # instance on the same database. Alice comes back and gets it by backfill.
        await bob.close()
        await srv.close()
        await term.shows("* disconnected; reconnecting in")
        async with ChatServer(chat_config(db, tcp_bind=None)) as other:
            bob = await ws(other)
            await bob.login("bob")
            await bob.ok("say", room="general", text="said while you were away")
            await bob.close()
        srv = ChatServer(chat_config(db, bind=f"127.0.0.1:{port}", tcp_bind=None))
        await srv.start()
        await term.shows("* reconnected as alice; 1 new message(s) while away")
        await term.shows("#general <bob> said while you were away")
        assert term.screen().count("said while you were away") == 1  # shown once

        term.type("/quit")
        assert await term.exit_code() == 0
    finally:
        term.close()
        await srv.close()


def test_connect_reads_piped_lines_in_process(tmp_path: Path, capsys, monkeypatch) -> None:
    """Without a terminal, lines come from stdin (scripts); same commands, same output."""
    import io
    import threading

    from netstack.transport import loop as loops

    ready = threading.Event()
    address: list[tuple[str, int]] = []
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def serve() -> None:
        async with ChatServer(chat_config(tmp_path / "db", tcp_bind=None)) as srv:
            address.append(srv.ws_address)
            stop = asyncio.Event()
            running.append((asyncio.get_running_loop(), stop))
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loops.run, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(TIMEOUT)
        host, port = address[0]
        monkeypatch.setenv("NETSTACK_CHAT_PASSWORD", PASSWORD)
        monkeypatch.setattr(sys, "stdin", io.StringIO("/join lobby\nhello, piped\n/quit\n"))
        url = f"ws://{host}:{port}/ws"
        assert main(["chat", "connect", "--url", url, "--nick", "ada", "--register"]) == 0
        out = capsys.readouterr().out
        assert "* logged in as ada" in out
        assert "* created #lobby" in out
        assert "#lobby <ada> hello, piped" in out
        # End of input without /quit ends the session too; a wrong password is exit 1.
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        assert main(["chat", "connect", "--url", url, "--nick", "ada"]) == 0
        monkeypatch.setenv("NETSTACK_CHAT_PASSWORD", "wrong password")
        assert main(["chat", "connect", "--url", url, "--nick", "ada"]) == 1
        assert "login failed: wrong nick or password" in capsys.readouterr().err
        monkeypatch.delenv("NETSTACK_CHAT_PASSWORD")
        assert main(["chat", "connect", "--url", url, "--nick", "ada"]) == 2
        assert "NETSTACK_CHAT_PASSWORD" in capsys.readouterr().err
        assert main(["chat", "connect", "--url", url]) == 2
        assert "nick" in capsys.readouterr().err
    finally:
        for loop, stop in running:
            loop.call_soon_threadsafe(stop.set)
        thread.join(TIMEOUT)


def test_connect_help_has_examples(capsys) -> None:
    assert main(["chat", "connect", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples:" in out
    for flag in ("--url", "--nick", "--register", "--room", "--reconnect-initial", "--cafile"):
        assert flag in out


def test_connect_refused_is_runtime_failure(capsys, monkeypatch) -> None:
    monkeypatch.setenv("NETSTACK_CHAT_PASSWORD", PASSWORD)
    url = f"ws://127.0.0.1:{free_port()}/ws"
    assert main(["chat", "connect", "--url", url, "--nick", "alice"]) == 1
    err = capsys.readouterr().err
    assert f"cannot connect to {url}" in err


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--url", "http://x/ws"], "url"),
        (["--url", "tcp://nohost"], "url"),
        (["--reconnect-initial", "0"], "reconnect_initial"),
        (["--reconnect-initial", "5", "--reconnect-max", "1"], "reconnect_max"),
    ],
)
def test_connect_bad_settings(argv, field, capsys, monkeypatch) -> None:
    monkeypatch.setenv("NETSTACK_CHAT_PASSWORD", PASSWORD)
    assert main(["chat", "connect", "--nick", "alice", *argv]) == 2
    assert field in capsys.readouterr().err
