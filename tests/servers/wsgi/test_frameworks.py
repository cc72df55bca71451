"""Real frameworks, TLS and unix sockets through the WSGI server."""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import TIMEOUT
from tests.servers.wsgi.support import exchange, get, hello, responses, serve


def flask_app() -> Any:
    import flask

    app = flask.Flask("netstack_test")

    @app.get("/hello/<name>")
    def hello_view(name: str) -> Any:
        return {"hello": name, "agent": flask.request.headers.get("User-Agent")}

    @app.post("/upload")
    def upload() -> Any:
        data = flask.request.get_data()
        return {"size": len(data), "form": flask.request.form.to_dict()}

    @app.get("/stream")
    def stream() -> Any:
        return flask.Response((f"line {i}\n" for i in range(3)), mimetype="text/plain")

    return app


@pytest.mark.parametrize("threads", [0, 4], ids=["inline", "threaded"])
async def test_flask_app_runs_unchanged(threads: int) -> None:
    # Not under wsgiref.validate: werkzeug calls wsgi.input.read() without a size, which
    # the validator forbids but PEP 3333 servers (and this one) support.
    async with serve(flask_app(), validate=False, threads=threads) as server:
        form = b"a=1&b=two"
        raw = (
            get("/hello/ada", extra="User-Agent: test\r\n")
            + b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
            + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(form), form)
            + get("/stream")
            + get("/missing", extra="Connection: close\r\n")
        )
        data = await exchange(server, raw)
    hello_reply, upload, stream, missing = responses(data)
    assert hello_reply.status == 200
    assert b'"hello":"ada"' in hello_reply.body.replace(b" ", b"")
    assert upload.status == 200
    assert b'"size":9' in upload.body.replace(b" ", b"")
    assert stream.body == b"line 0\nline 1\nline 2\n"
    assert missing.status == 404


def django_app(tmp_path: Path) -> Any:
    """A minimal Django project: settings in a module, one view, one URL."""
    package = tmp_path / "djproject"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "settings.py").write_text(
        "SECRET_KEY = 'test'\nDEBUG = False\nALLOWED_HOSTS = ['*']\n"
        "ROOT_URLCONF = 'djproject.urls'\nMIDDLEWARE = []\nINSTALLED_APPS = []\n"
        "DATABASES = {}\nUSE_TZ = True\n"
    )
    (package / "urls.py").write_text(
        "from django.http import JsonResponse, HttpResponse\n"
        "from django.urls import path\n"
        "def item(request, pk):\n"
        "    return JsonResponse({'pk': pk, 'q': request.GET.get('q'), 'path': request.path})\n"
        "def echo(request):\n"
        "    return HttpResponse(request.body, content_type='text/plain')\n"
        "urlpatterns = [path('items/<int:pk>', item), path('echo', echo)]\n"
    )
    sys.path.insert(0, str(tmp_path))
    import os

    os.environ["DJANGO_SETTINGS_MODULE"] = "djproject.settings"
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


async def test_django_project_runs_unchanged(tmp_path: Path) -> None:
    app = django_app(tmp_path)
    try:
        async with serve(app, validate=False, threads=4, root_path="/site") as server:
            raw = get("/site/items/7?q=x") + (
                b"POST /site/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                b"Connection: close\r\n\r\nhello"
            )
            data = await exchange(server, raw)
    finally:
        sys.path.remove(str(tmp_path))
    item, echo_reply = responses(data)
    assert item.status == 200
    assert item.body.replace(b" ", b"") == b'{"pk":7,"q":"x","path":"/site/items/7"}'
    assert echo_reply.body == b"hello"


async def test_tls(tls_certs: Any) -> None:
    async with serve(hello, certfile=tls_certs.certfile, keyfile=tls_certs.keyfile) as server:
        context = ssl.create_default_context(cafile=tls_certs.cafile)
        port = int(server.addresses[0][1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        writer.write(get(extra="Connection: close\r\n"))
        async with asyncio.timeout(TIMEOUT):
            data = await reader.read()
        writer.close()
    assert responses(data)[0].body == b"Hello, world!"


async def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    seen: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        seen.append(environ["REMOTE_ADDR"])
        return hello(environ, start_response)

    async with serve(app, bind=(f"unix:{path}",)) as server:
        assert server.addresses == [str(path)]
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(get(extra="Connection: close\r\n"))
        async with asyncio.timeout(TIMEOUT):
            data = await reader.read()
        writer.close()
    assert responses(data)[0].status == 200
    assert seen == ["unix"]
    assert not path.exists()  # removed on close
