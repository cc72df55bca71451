"""``netstack serve``: exit codes in process (they happen before any fork), and the
access log as a user sees it on stderr of a real process tree."""

from __future__ import annotations

import json
import signal
import socket

import pytest

from netstack.cli import main
from tests.helpers import TIMEOUT, poll_until
from tests.servers.wsgi.procs import Serve


def test_help_has_examples(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples:" in out
    assert "  netstack serve myapp:app --workers 2 --metrics-bind 127.0.0.1:9100\n" in out
    for flag in ("--metrics-bind", "--max-requests-jitter", "--graceful-timeout", "--reload"):
        assert flag in out


def test_bad_module_name_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "no_such_module_here:app", "--bind", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no module named 'no_such_module_here'" in err


@pytest.mark.parametrize("spec", ["nocolon", ":app", "mod:"])
def test_malformed_app_spec_exits_2(spec, capsys):
    assert main(["serve", spec]) == 2
    assert "expected MODULE:APP" in capsys.readouterr().err


def test_missing_app_exits_2(capsys):
    assert main(["serve"]) == 2
    assert "give MODULE:APP" in capsys.readouterr().err


def test_port_in_use_exits_3(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inuse_app.py").write_text("def app(e, s):\n    return []\n")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", "inuse_app:app", "--bind", f"127.0.0.1:{port}"]) == 3
    err = capsys.readouterr().err
    assert err == f"netstack: error: cannot bind 127.0.0.1:{port}: Address already in use\n"


def test_bad_access_log_format_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fmt_app.py").write_text("def app(e, s):\n    return []\n")
    argv = ["serve", "fmt_app:app", "--bind", "127.0.0.1:0", "--access-log-format", "%(zz)s"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "access_log_format: unknown atom %(zz)s" in err


def test_serve_and_stop_with_sigint(tmp_path):
    with Serve(tmp_path) as srv:
        status, body = srv.get("/hi")
        assert status == 200
        assert body.endswith(" v1 /hi\n")
        srv.signal(signal.SIGINT)
        assert srv.wait() == 0


def access_lines(srv: Serve, n: int) -> list[str]:
    poll_until(lambda: srv.stderr.count("netstack.access") >= n)
    return [line for line in srv.err if "netstack.access" in line]


def test_json_logs_make_json_access_lines(tmp_path):
    with Serve(tmp_path, global_args=("--log-format", "json")) as srv:
        assert srv.get("/teapot?x=1")[0] == 418
        (line,) = access_lines(srv, 1)
        doc = json.loads(line)
        assert doc["logger"] == "netstack.access"
        assert doc["status"] == 418
        assert doc["method"] == "GET"
        assert doc["path"] == "/teapot"
        assert doc["query"] == "x=1"
        assert '"GET /teapot?x=1 HTTP/1.1" 418' in doc["message"]
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    for other in srv.err:  # every log line, not only access lines, is one JSON object
        assert isinstance(json.loads(other), dict)


def test_access_log_format_flag_and_no_access_log(tmp_path):
    fmt = "%(m)s %(U)s -> %(s)s %({x-pid}o)s"
    with Serve(tmp_path, "--access-log-format", fmt) as srv:
        srv.get("/fmt")
        (line,) = access_lines(srv, 1)
        pid = srv.workers().pop()
        assert line.rstrip().endswith(f"netstack.access: GET /fmt -> 200 {pid}")
    quiet = tmp_path / "quiet"
    quiet.mkdir()
    with Serve(quiet, "--no-access-log") as srv:
        assert srv.get("/")[0] == 200
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        assert "netstack.access" not in srv.stderr
        assert "serving app:app" in srv.stderr  # the other logs are still there


def test_unloadable_certificate_exits_2_before_any_fork(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tls_app.py").write_text("def app(e, s):\n    return []\n")
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    argv = ["serve", "tls_app:app", "--bind", "127.0.0.1:0"]
    assert main([*argv, "--certfile", "bad.pem", "--keyfile", "bad.pem"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("netstack: error: certfile/keyfile: cannot load bad.pem")


def test_serves_https_with_certfile_and_keyfile(tmp_path, tls_certs):
    import http.client
    import ssl

    args = ["--certfile", tls_certs.certfile, "--keyfile", tls_certs.keyfile]
    with Serve(tmp_path, *args, wait_listening=False) as srv:
        srv.port = srv._expect(r"listening on https://127\.0\.0\.1:(\d+)")
        ctx = ssl.create_default_context(cafile=tls_certs.cafile)
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=TIMEOUT)
        conn.request("GET", "/secure")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read().endswith(b" v1 /secure\n")
        conn.close()
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
