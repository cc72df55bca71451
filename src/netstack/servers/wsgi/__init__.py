"""``netstack serve``: an HTTP/1.1 WSGI server (PEP 3333) on the shared HTTP/1.1 core."""

from netstack.servers.wsgi.app import load_app
from netstack.servers.wsgi.server import WSGIServer

__all__ = ["WSGIServer", "load_app"]
