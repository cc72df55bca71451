"""``netstack rpc serve|call``: flags, exit codes, and a subprocess round trip."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading

import pytest

from netstack.cli import main
from tests.helpers import TIMEOUT, free_port

TOKEN = "cli-s3cret"
NETSTACK = (sys.executable, "-m", "netstack")


def test_help_has_examples(capsys):
    assert main(["rpc", "serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples:" in out
    for flag in ("--bind", "--db", "--token", "--grace-period", "--max-watch-backlog"):
        assert flag in out
    assert main(["rpc", "call", "--help"]) == 0
    out = capsys.readouterr().out
    assert "netstack rpc call notes.v1.Notes/CreateNote" in out
    for flag in ("--data", "--list", "--connect", "--deadline", "--token"):
        assert flag in out


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["serve", "--bind", "nonsense"], "bind"),
        (["serve", "--grace-period", "-1"], "grace_period"),
        (["serve", "--db", "mysql://localhost/notes"], "db"),
        (["serve", "--token", "two words"], "token"),
        (["serve", "--default-page-size", "200"], "default_page_size"),
        (["serve", "--max-message-bytes", "1000"], "max_message_bytes"),
        (["call", "--deadline", "0", "notes.v1.Notes/GetNote"], "deadline"),
        (["call"], "METHOD is required"),
        (["call", "GetNote"], "METHOD: expected package.Service/Method"),
        (["call", "notes.v1.Notes/GetNote", "--data", "@/nonexistent.json"], "--data"),
        (["serve", "--certfile", "/nonexistent.pem"], "keyfile"),
        (
            ["serve", "--certfile", "/nonexistent.pem", "--keyfile", "/nonexistent.pem"],
            "cannot read",
        ),
        (["call", "--cafile", "/nonexistent.pem", "--list"], "cafile: cannot read"),
    ],
)
def test_bad_settings_are_usage_errors(argv, field, capsys, tmp_path):
    if argv[0] == "serve":  # were a case valid after all, it must not serve on 50051 for ever
        argv = [*argv, "--data-dir", str(tmp_path)]
        argv = [*argv, "--bind", "256.0.0.1:0"] if "--bind" not in argv else argv
    assert main(["rpc", *argv]) == 2
    err = capsys.readouterr().err
    assert field in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv", [["serve", "--cafile", "ca.pem"], ["call", "--keyfile", "key.pem", "--list"]]
)
def test_tls_settings_of_the_other_side_are_not_offered(argv, capsys):
    assert main(["rpc", *argv]) == 2
    assert "No such option" in capsys.readouterr().err


def test_port_in_use_is_startup_failure(capsys, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        argv = ["rpc", "serve", "--bind", f"127.0.0.1:{port}", "--db", str(tmp_path / "n.db")]
        assert main(argv) == 3
    err = capsys.readouterr().err
    assert err == f"netstack: error: cannot bind 127.0.0.1:{port}: Address already in use\n"


def test_unwritable_database_is_startup_failure(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    argv = ["rpc", "serve", "--bind", "127.0.0.1:0", "--db", str(blocker / "notes.db")]
    assert main(argv) == 3
    assert "cannot open database" in capsys.readouterr().err


def test_call_to_a_dead_server_is_a_runtime_failure(capsys):
    port = free_port()
    argv = ["rpc", "call", "--list", "--connect", f"127.0.0.1:{port}", "--deadline", "0.3"]
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        f"netstack: error: cannot connect to 127.0.0.1:{port} within 0.3s\n"
    )


@pytest.fixture
def served(tmp_path):
    """``netstack rpc serve`` in a subprocess; yields (proc, "127.0.0.1:PORT")."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NETSTACK_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [*NETSTACK, "rpc", "serve", "--bind", "127.0.0.1:0", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"database {tmp_path / 'notes.sqlite3'}\n"
        line = proc.stdout.readline()
        assert line.startswith("listening on grpc 127.0.0.1:"), line
        yield proc, line.split()[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def run_call(address: str, *argv: str, token: str | None = TOKEN):
    args = [sys.executable, "-m", "netstack", "rpc", "call", "--connect", address, *argv]
    if token:
        args += ["--token", token]
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT * 4)


def call_json(capsys, address: str, *argv: str):
    assert main(["rpc", "call", "--connect", address, "--token", TOKEN, *argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_round_trip_through_the_cli(served, capsys):
    proc, address = served
    created = run_call(
        address, "notes.v1.Notes/CreateNote", "--data", '{"title": "hello", "body": "world"}'
    )
    assert created.returncode == 0, created.stderr
    note = json.loads(created.stdout)
    assert (note["id"], note["title"], note["body"], note["version"]) == (
        "1",
        "hello",
        "world",
        "1",
    )
    assert note["createTime"].endswith("Z")

    listed = run_call(address, "--list")
    assert listed.stdout.split() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "notes.v1.Notes",
    ]
    methods = run_call(address, "--list", "notes.v1.Notes").stdout.splitlines()
    assert (
        "notes.v1.Notes.WatchNotes ( notes.v1.WatchNotesRequest ) returns "
        "( stream notes.v1.NoteEvent )" in methods
    )

    missing = run_call(address, "notes.v1.Notes/GetNote", "--data", '{"id": 99}')
    assert (missing.returncode, missing.stderr) == (
        1,
        "netstack: error: NOT_FOUND: note 99 does not exist\n",
    )
    refused = run_call(address, "notes.v1.Notes/GetNote", "--data", '{"id": 1}', token=None)
    assert refused.returncode == 1
    assert refused.stderr.startswith("netstack: error: UNAUTHENTICATED: missing")
    invalid = run_call(address, "notes.v1.Notes/CreateNote", "--data", '{"title": ""}')
    assert (invalid.returncode, invalid.stderr) == (
        1,
        "netstack: error: INVALID_ARGUMENT: title: must not be empty\n",
    )
    bad_json = run_call(address, "notes.v1.Notes/GetNote", "--data", '{"nope": 1}')
    assert bad_json.returncode == 2
    assert 'no field named "nope"' in bad_json.stderr
    unknown = run_call(address, "notes.v1.Nope/Get")
    assert (unknown.returncode, unknown.stderr) == (
        1,
        f"netstack: error: {address}: find service notes.v1.Nope: not found\n",
    )

    # In process from here on (the same code, without a Python start-up per call).
    health = call_json(capsys, address, "grpc.health.v1.Health/Check")
    assert health == {"status": "SERVING"}
    for i in range(4):
        call_json(capsys, address, "notes.v1.Notes/CreateNote", "-d", f'{{"title": "n{i}"}}')
    page = call_json(capsys, address, "notes.v1.Notes/ListNotes", "-d", '{"pageSize": 3}')
    assert [n["id"] for n in page["notes"]] == ["5", "4", "3"]
    rest = call_json(
        capsys,
        address,
        "notes.v1.Notes/ListNotes",
        "-d",
        json.dumps({"pageSize": 3, "pageToken": page["nextPageToken"]}),
    )
    assert [n["id"] for n in rest["notes"]] == ["2", "1"]
    assert rest["nextPageToken"] == ""
    found = call_json(capsys, address, "notes.v1.Notes/SearchNotes", "-d", '{"query": "HELLO"}')
    assert [n["title"] for n in found["notes"]] == ["hello"]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0
    assert "notes service stopped" in proc.stderr.read()


@pytest.mark.slow
def test_tls_round_trip(tmp_path, tls_certs, capsys):
    argv = ["rpc", "serve", "--bind", "127.0.0.1:0", "--data-dir", str(tmp_path)]
    argv += ["--certfile", tls_certs.certfile, "--keyfile", tls_certs.keyfile]
    proc = subprocess.Popen(
        [*NETSTACK, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # database ...
        line = proc.stdout.readline()
        assert line.startswith("listening on grpcs 127.0.0.1:"), line
        address = line.split()[-1]
        capsys.readouterr()
        argv = ["rpc", "call", "grpc.health.v1.Health/Check", "--connect", address]
        assert main([*argv, "--cafile", tls_certs.cafile]) == 0
        assert json.loads(capsys.readouterr().out) == {"status": "SERVING"}
        # Without the CA the server's certificate is not trusted: no connection.
        assert main([*argv, "--deadline", "0.5"]) == 1
        assert "cannot connect" in capsys.readouterr().err
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


@pytest.mark.slow
def test_watch_prints_one_json_object_per_change(served, capsys):
    _, address = served
    argv = ["rpc", "call", "notes.v1.Notes/WatchNotes", "--connect", address, "--token", TOKEN]
    watcher = subprocess.Popen(
        [*NETSTACK, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in watcher.stdout], daemon=True)
    reader.start()
    try:
        # The watcher subscribes some time after it starts: create notes until it reports one
        # (bounded), then check that the next two changes arrive as one JSON line each.
        first = None
        for i in range(int(TIMEOUT * 10)):
            call_json(capsys, address, "notes.v1.Notes/CreateNote", "-d", f'{{"title": "p{i}"}}')
            try:
                first = json.loads(lines.get(timeout=0.1))
                break
            except queue.Empty:
                continue
        assert first is not None, "the watcher printed nothing"
        assert first["kind"] == "CREATED"
        while not lines.empty():  # notes created before the first line was read
            lines.get_nowait()
        note_id = call_json(capsys, address, "notes.v1.Notes/CreateNote", "-d", '{"title": "w"}')
        call_json(
            capsys,
            address,
            "notes.v1.Notes/DeleteNote",
            "-d",
            json.dumps({"id": note_id["id"]}),
        )
        events = [json.loads(lines.get(timeout=TIMEOUT)) for _ in range(2)]
        assert [(e["kind"], e["note"]["title"]) for e in events] == [
            ("CREATED", "w"),
            ("DELETED", "w"),
        ]
    finally:
        watcher.terminate()
        watcher.wait(TIMEOUT)
        watcher.stdout.close()  # type: ignore[union-attr]
        watcher.stderr.close()  # type: ignore[union-attr]
