"""``netstack balance``: exit codes and messages in process, one subprocess smoke test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import trustme

from netstack.cli import main
from tests.helpers import TIMEOUT, poll_until
from tests.servers.lb.support import TCPBackend, reply_line, request


def test_help_has_examples(capsys) -> None:
    assert main(["balance", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples:" in out
    assert "  netstack balance --config lb.toml\n" in out


def test_http_flags_are_checked(capsys) -> None:
    argv = ["balance", "--mode", "http", "--backend", "127.0.0.1:1", "--rate-burst", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "rate_burst" in err
    assert err.count("\n") == 1


def test_no_backend_is_usage_error(capsys) -> None:
    assert main(["balance", "--listen", "127.0.0.1:0"]) == 2
    assert "backend: give at least one --backend" in capsys.readouterr().err


def test_bad_file_names_file_key_and_reason(tmp_path, capsys) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(
        '[frontends.web]\nlisten = "127.0.0.1:0"\npool = "app"\n'
        '[pools.app]\nalgorithm = "fastest"\nbackends = ["127.0.0.1:1"]\n'
    )
    assert main(["balance", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: pools.app.algorithm: must be one of round_robin" in err
    assert err.count("\n") == 1


def test_unreadable_file_is_usage_error(tmp_path, capsys) -> None:
    assert main(["balance", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_port_in_use_is_startup_failure(capsys) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        argv = ["balance", "--listen", f"127.0.0.1:{port}", "--backend", "127.0.0.1:1"]
        assert main(argv) == 3
    err = capsys.readouterr().err
    assert f"cannot bind tcp 127.0.0.1:{port}" in err
    assert err.count("\n") == 1


def write_config(path, backend_port: int) -> None:
    path.write_text(
        '[frontends.main]\nlisten = "127.0.0.1:0"\npool = "app"\n'
        f'[pools.app]\nbackends = ["127.0.0.1:{backend_port}"]\n'
    )


def test_subprocess_smoke_with_reload_and_stop(tmp_path) -> None:
    config = tmp_path / "lb.toml"
    with TCPBackend(reply_line, name="one") as one, TCPBackend(reply_line, name="two") as two:
        write_config(config, one.port)
        with balance_process(config) as (proc, port, stderr):
            assert request(port, b"a\n") == b"one a\n"
            write_config(config, two.port)
            proc.send_signal(signal.SIGHUP)
            poll_until(lambda: request(port, b"b\n") == b"two b\n")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(TIMEOUT) == 0
    assert "reloaded: 1 frontend(s), 1 pool(s)" in stderr[0]


@contextlib.contextmanager
def balance_process(config) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """``netstack balance --config FILE`` in a subprocess; yields it, its port and a list
    that holds its stderr once it has ended."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "netstack", "balance", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stderr: list[str] = []
    # Drained as it comes: an http frontend logs a line per request, more than a pipe holds.
    chunks: list[str] = []
    drain = threading.Thread(target=lambda: chunks.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    drain.start()
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith(("listening on tcp 127.0.0.1:", "listening on http 127.0.0.1:")), (
            line
        )
        yield proc, int(line.rsplit(":", 1)[1]), stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        proc.stdout.close()  # type: ignore[union-attr]
        drain.join(TIMEOUT)
        stderr.append("".join(chunks))
        proc.stderr.close()  # type: ignore[union-attr]


def test_raise_nofile_goes_up_to_the_hard_limit(caplog) -> None:
    import logging
    import resource

    caplog.set_level(logging.INFO, logger="netstack.cli")
    from netstack.cli.balance import raise_nofile
    from netstack.config import BalancerLimits
    from tests.servers.lb.support import lb_config

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raise_nofile(lb_config(1, limits=BalancerLimits(max_connections=10)))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft  # enough already
    if hard != resource.RLIM_INFINITY:
        raise_nofile(lb_config(1, limits=BalancerLimits(max_connections=hard)))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        assert "descriptor limit" in caplog.text


async def test_reload_keeps_running_config_on_errors(tmp_path, caplog) -> None:
    from netstack.cli.balance import _reload, load
    from netstack.servers.lb import Balancer

    config = tmp_path / "lb.toml"
    with TCPBackend(reply_line, name="one") as one, TCPBackend(reply_line, name="two") as two:
        write_config(config, one.port)
        async with Balancer(load(str(config), {})) as lb:
            port = lb.address("main")[1]
            config.write_text("[pools.app]\nalgorithm = 'nope'\n")
            await _reload(lb, str(config), {})
            assert "reload refused, keeping the running config" in caplog.text
            with socket.socket() as held:
                held.bind(("127.0.0.1", 0))
                held.listen()
                config.write_text(
                    f'[frontends.main]\nlisten = "127.0.0.1:0"\npool = "app"\n'
                    f'[frontends.taken]\nlisten = "127.0.0.1:{held.getsockname()[1]}"\n'
                    f'pool = "app"\n[pools.app]\nbackends = ["127.0.0.1:{two.port}"]\n'
                )
                await _reload(lb, str(config), {})
            assert "reload failed, keeping the running config" in caplog.text
            assert lb.stats.reloads == 0
            write_config(config, two.port)
            await _reload(lb, str(config), {})
            assert lb.stats.reloads == 1
            assert lb.address("main")[1] == port
            assert await asyncio.to_thread(request, port, b"r\n") == b"two r\n"


def http_config_file(path, backend_port: int) -> None:
    path.write_text(
        '[frontends.web]\nlisten = "127.0.0.1:0"\nmode = "http"\npool = "app"\n'
        f'[pools.app]\nbackends = ["127.0.0.1:{backend_port}"]\n'
    )


def test_subprocess_http_mode_sighup_under_load(tmp_path) -> None:
    """Keep-alive clients keep going through two SIGHUP reloads: no request fails."""
    import http.client
    import threading

    from tests.servers.lb.http_support import http_backend, name_and_path

    config = tmp_path / "lb.toml"
    with http_backend(name_and_path, "one") as one, http_backend(name_and_path, "two") as two:
        http_config_file(config, one.port)
        with balance_process(config) as (proc, port, stderr):
            results: list[tuple[int, bytes]] = []
            errors: list[BaseException] = []
            stop = threading.Event()

            def client() -> None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
                try:
                    for i in range(5000):  # bounded; stopped once both reloads were seen
                        if stop.is_set():
                            break
                        conn.request("GET", f"/{i}")
                        reply = conn.getresponse()
                        results.append((reply.status, reply.read()))
                except BaseException as exc:  # reported below
                    errors.append(exc)
                finally:
                    conn.close()

            threads = [threading.Thread(target=client) for _ in range(3)]
            for t in threads:
                t.start()
            poll_until(lambda: len(results) >= 60)
            http_config_file(config, two.port)
            proc.send_signal(signal.SIGHUP)
            poll_until(lambda: any(body.startswith(b"two ") for _, body in results[-3:]))
            http_config_file(config, one.port)
            proc.send_signal(signal.SIGHUP)
            poll_until(lambda: all(body.startswith(b"one ") for _, body in results[-3:]))
            stop.set()
            for t in threads:
                t.join(TIMEOUT * 2)
            assert not errors
            assert len(results) > 60
            assert {status for status, _ in results} == {200}
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(TIMEOUT) == 0
    assert stderr[0].count("reloaded: 1 frontend(s), 1 pool(s)") == 2
    # One access line per request (on by default), on its own logger.
    assert stderr[0].count(" INFO    netstack.lb.access: 127.0.0.1:") == len(results)


def test_admin_api_from_the_command_line() -> None:
    """--admin-bind with the token from the environment: the API answers on its port."""
    import json
    import urllib.request

    from tests.servers.lb.support import TCPBackend, reply_line

    token = "cli-admin-token-0123456789"
    with TCPBackend(reply_line) as backend:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "netstack",
                "balance",
                "--listen",
                "127.0.0.1:0",
                "--backend",
                f"127.0.0.1:{backend.port}",
                "--admin-bind",
                "127.0.0.1:0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "NETSTACK_ADMIN_TOKEN": token},
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("listening on tcp 127.0.0.1:")
            line = proc.stdout.readline()
            assert line.startswith("admin API on http://127.0.0.1:"), line
            url = line.split(" on ", 1)[1].strip()
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
                listing = json.loads(resp.read())
            assert [b["address"] for b in listing["default"]] == [f"127.0.0.1:{backend.port}"]
        finally:
            proc.terminate()
            proc.communicate(timeout=TIMEOUT)  # reaps it and closes the pipes
    assert proc.returncode == 0


def test_admin_bind_without_a_token_is_a_usage_error() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "netstack",
            "balance",
            "--backend",
            "127.0.0.1:9",
            "--admin-bind",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
        env={k: v for k, v in os.environ.items() if k != "NETSTACK_ADMIN_TOKEN"},
    )
    assert result.returncode == 2
    assert "admin_token" in result.stderr


def test_bad_certificate_is_a_usage_error_naming_the_file(tmp_path, tls_certs, capsys) -> None:
    base = ["balance", "--mode", "http", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"]
    missing = tmp_path / "missing.pem"
    argv = [*base, "--certfile", str(missing), "--keyfile", tls_certs.keyfile]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"certfile: cannot read {missing}: No such file or directory" in err
    assert err.count("\n") == 1
    other = tmp_path / "other.key"
    trustme.CA().issue_cert("x").private_key_pem.write_to_path(str(other))
    assert main([*base, "--certfile", tls_certs.certfile, "--keyfile", str(other)]) == 2
    assert f"keyfile: {other} does not match the certificate in" in capsys.readouterr().err
    assert main([*base, "--certfile", tls_certs.certfile]) == 2
    assert "certfile and keyfile must be given together" in capsys.readouterr().err
    assert main([*base, "--access-log-format", "%(nope)s"]) == 2
    assert "access_log_format: unknown atom %(nope)s" in capsys.readouterr().err
