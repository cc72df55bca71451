"""Flask hello world: the same response as hello_wsgi.py through a real framework."""

from __future__ import annotations

from flask import Flask, Response

app = Flask(__name__)


@app.route("/")
def hello() -> Response:
    return Response("Hello, world!", mimetype="text/plain")
