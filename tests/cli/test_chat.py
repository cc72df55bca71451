"""``netstack chat serve``: flags, exit codes, and one subprocess run with real clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from netstack.cli import main
from netstack.cli.options import load_config
from netstack.config import ChatServerConfig
from tests.helpers import TIMEOUT


def test_serve_help_has_examples(capsys):
    assert main(["chat", "serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples:" in out
    assert "  netstack chat serve\n" in out
    for flag in ("--tcp-bind", "--db", "--flood-rate", "--max-message-bytes", "--certfile"):
        assert flag in out
    assert "--cafile" not in out


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--flood-rate", "0"], "flood_rate"),
        (["--bind", "nonsense"], "bind"),
        (["--tcp-bind", "x:y"], "tcp_bind"),
        (["--max-file-bytes", "2000000"], "max_file_bytes"),
        (["--db", "mysql://localhost/chat"], "db"),
        (["--allowed-origins", "example.com"], "allowed_origins"),
        (["--redis", "http://127.0.0.1:6379"], "redis"),
        (["--redis", "redis://127.0.0.1:6379", "--redis-prefix", "a b"], "redis_prefix"),
        (["--presence-ttl", "0"], "presence_ttl"),
        (["--presence-interval", "0"], "presence_interval"),
        (["--certfile", "/nonexistent.pem", "--keyfile", "/nonexistent.pem"], "certfile"),
    ],
)
def test_bad_settings_are_usage_errors(argv, field, capsys, tmp_path):
    args = ["chat", "serve", "--tcp-bind", "127.0.0.1:0", "--data-dir", str(tmp_path), *argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert field in err
    assert err.count("\n") == 1


def test_port_in_use_is_startup_failure(capsys, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        argv = ["chat", "serve", "--bind", f"127.0.0.1:{port}", "--db", str(tmp_path / "c.db")]
        assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot bind" in err


def test_unwritable_database_is_startup_failure(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    argv = ["chat", "serve", "--bind", "127.0.0.1:0", "--tcp-bind", "none"]
    assert main([*argv, "--db", str(blocker / "chat.db")]) == 3
    assert "database" in capsys.readouterr().err


def test_unreachable_postgres_is_startup_failure_without_the_password(capsys):
    from tests.helpers import free_port

    url = f"postgresql://netstack:s3cret@127.0.0.1:{free_port()}/chat"
    argv = ["chat", "serve", "--bind", "127.0.0.1:0", "--tcp-bind", "none", "--db", url]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot open database postgresql://netstack:***@127.0.0.1:" in err
    assert "s3cret" not in err


def test_serve_on_postgres_prints_the_url_without_the_password(pg_url, capsys):
    import threading

    # In process: the server runs until a stop request (as SIGTERM would send).
    from netstack.servers.chat import server as chat_server

    started = threading.Event()
    real_start = chat_server.ChatServer.start

    async def start(self):
        await real_start(self)
        started.set()
        self.request_stop()

    chat_server.ChatServer.start = start  # type: ignore[method-assign]
    try:
        argv = ["chat", "serve", "--bind", "127.0.0.1:0", "--tcp-bind", "none", "--db", pg_url]
        assert main(argv) == 0
    finally:
        chat_server.ChatServer.start = real_start  # type: ignore[method-assign]
    assert started.is_set()
    out = capsys.readouterr().out
    assert "database postgresql://netstack:***@127.0.0.1:5432/netstack_test" in out


def test_env_and_toml_reach_chat_settings(tmp_path):
    toml = tmp_path / "chat.toml"
    toml.write_text('tcp_bind = "none"\n[chat_limits]\nflood_burst = 7\n')
    cfg = load_config(
        ChatServerConfig, {}, config_file=str(toml), env={"NETSTACK_FLOOD_RATE": "2.5"}
    )
    assert cfg.tcp_bind is None
    assert cfg.chat_limits.flood_burst == 7
    assert cfg.chat_limits.flood_rate == 2.5


def test_default_database_lives_in_the_data_dir(tmp_path, monkeypatch):
    from netstack.servers.chat import database_location

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert database_location(ChatServerConfig()) == str(tmp_path / "netstack" / "chat.sqlite3")
    cfg = ChatServerConfig(data_dir=str(tmp_path / "d"))
    assert database_location(cfg) == str(tmp_path / "d" / "chat.sqlite3")
    assert database_location(ChatServerConfig(db="x.db")) == "x.db"


def _line(sock_file) -> dict:
    line = sock_file.readline()
    assert line, "server closed the connection"
    return json.loads(line)


def test_serve_subprocess_smoke(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    db = tmp_path / "chat.db"
    argv = ["chat", "serve", "--bind", "127.0.0.1:0", "--tcp-bind", "127.0.0.1:0", "--db", str(db)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "netstack", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"database {db}\n"
        ws_line = proc.stdout.readline()
        tcp_line = proc.stdout.readline()
        page_line = proc.stdout.readline()
        assert ws_line.startswith("listening on ws 127.0.0.1:"), ws_line
        assert tcp_line.startswith("listening on tcp 127.0.0.1:"), tcp_line
        ws_port = int(ws_line.rsplit(":", 1)[1])
        assert page_line == f"browser page http://127.0.0.1:{ws_port}/\n"
        port = int(tcp_line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            f = sock.makefile("rwb")
            assert _line(f)["type"] == "hello"
            f.write(b'{"type":"register","id":1,"nick":"alice","password":"12345678"}\n')
            f.flush()
            reply = _line(f)
            assert (reply["type"], reply["id"], reply["nick"]) == ("ack", 1, "alice")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        _, err = proc.communicate(timeout=TIMEOUT)
        assert "chat server closed" in err
        assert db.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_two_serve_processes_share_postgres_and_redis(pg_url, redis, tmp_path):
    """The deployment shape from the README: two `netstack chat serve` processes."""
    prefix = f"cli:{tmp_path.name}"
    procs, ports = [], []
    try:
        for _ in range(2):
            argv = ["chat", "serve", "--bind", "127.0.0.1:0", "--tcp-bind", "127.0.0.1:0"]
            argv += ["--db", pg_url, "--redis", redis.url, "--redis-prefix", prefix]
            proc = subprocess.Popen(
                [sys.executable, "-m", "netstack", *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            procs.append(proc)
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("database postgresql://netstack:***@")
            assert proc.stdout.readline() == f"scale-out redis {redis.url} (prefix {prefix})\n"
            proc.stdout.readline()  # ws
            tcp_line = proc.stdout.readline()
            assert tcp_line.startswith("listening on tcp 127.0.0.1:"), tcp_line
            ports.append(int(tcp_line.rsplit(":", 1)[1]))
        socks = [socket.create_connection(("127.0.0.1", p), timeout=TIMEOUT) for p in ports]
        files = [s.makefile("rwb") for s in socks]
        for f, nick in zip(files, ("alice", "bob"), strict=True):
            assert _line(f)["type"] == "hello"
            f.write(
                json.dumps(
                    {"type": "register", "id": 1, "nick": nick, "password": "x" * 8}
                ).encode()
                + b"\n"
            )
            f.flush()
            assert _line(f)["type"] == "ack"
        alice, bob = files
        alice.write(b'{"type":"create","id":2,"room":"general"}\n')
        alice.flush()
        assert _line(alice)["re"] == "create"
        bob.write(b'{"type":"join","id":2,"room":"general"}\n')
        bob.flush()
        assert _line(bob)["re"] == "join"
        bob.write(b'{"type":"say","id":3,"room":"general","text":"across processes"}\n')
        bob.flush()
        while (event := _line(alice))["type"] != "message":
            pass
        assert (event["message"]["from"], event["message"]["text"]) == ("bob", "across processes")
        for s in socks:
            s.close()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(TIMEOUT) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]


def test_unreachable_redis_is_startup_failure(pg_url, capsys):
    from tests.helpers import free_port

    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    argv = ["chat", "serve", "--bind", "127.0.0.1:0", "--tcp-bind", "none", "--db", pg_url]
    assert main([*argv, "--redis", url]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "redis redis://:***@127.0.0.1:" in err
    assert "cannot reach Redis" in err
    assert "s3cret" not in err
