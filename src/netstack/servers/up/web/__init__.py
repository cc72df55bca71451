"""The example web app of ``netstack up``: a small notes product on Flask.

Every data access goes through the gRPC notes service (``netstack rpc serve``): one
channel per process, each call with a deadline (``rpc_deadline``) and the request's
``X-Request-Id`` passed on as metadata. A gRPC status becomes an HTTP status in one place
(:func:`_status_of`): NOT_FOUND 404, INVALID_ARGUMENT 400, UNAVAILABLE 503,
DEADLINE_EXCEEDED 504, anything else 502, each with a body that names the notes service.
Every response carries ``X-Served-By`` (``served_by``), so balancing is visible.

Routes::

    GET  /                      notes, newest first; ?q= searches, ?page= pages on
    GET  /notes/new             the create form
    POST /notes                 create from the form (303 to the note)
    GET  /notes/<id>            one note
    GET  /api/notes             JSON list: ?q=, ?page_size=, ?page_token=
    POST /api/notes             JSON {"title", "body"} -> 201 and the note
    GET  /api/notes/<id>        JSON note
    GET  /healthz               "ok" (this process only; the balancer's check)
    GET  /chat                  308 to /chat/ (the balancer routes /chat/ to the chat service)

Run it with ``netstack serve netstack.servers.up.web:create_app --factory``; the factory
reads :class:`~netstack.config.NotesWebConfig` from ``NETSTACK_*`` variables
(``NETSTACK_NOTES_RPC``, ``NETSTACK_NOTES_TOKEN``, ``NETSTACK_SERVED_BY``...).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit

from netstack.config import NotesWebConfig, build

if TYPE_CHECKING:
    import grpc
    from flask import Flask, Response

    from netstack.servers.rpc._pb import notes_pb2 as pb
    from netstack.servers.rpc._pb import notes_pb2_grpc as pb_grpc

T = TypeVar("T")

PAGE_SIZE: Final = 20
MAX_PAGE_SIZE: Final = 1000
MAX_JSON_BYTES: Final = 128 * 1024
MAX_NOTE_ID: Final = 2**63 - 1  # int64 in notes.proto
# What may travel on as x-request-id metadata (gRPC refuses control characters).
REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


class NotesError(Exception):
    """A notes-service call failed; carries the HTTP status and a message for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _status_of(exc: grpc.RpcError) -> NotesError:
    """The one place that maps a gRPC status to an HTTP status (STYLE §3)."""
    import grpc

    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    detail = exc.details() if hasattr(exc, "details") else None
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.NOT_FOUND:
        return NotesError(404, name, detail or "no such note")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return NotesError(400, name, detail or "invalid request")
    if code == grpc.StatusCode.UNAVAILABLE:
        return NotesError(503, name, "the notes service is unavailable; try again in a moment")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return NotesError(504, name, "the notes service did not answer in time")
    return NotesError(502, name, f"the notes service failed: {name}: {detail or 'no detail'}")


class Notes:
    """The notes service as this app uses it: one channel, deadlines, metadata."""

    def __init__(self, cfg: NotesWebConfig) -> None:
        import grpc

        from netstack.servers.rpc._pb import notes_pb2 as pb
        from netstack.servers.rpc._pb import notes_pb2_grpc as pb_grpc

        self.pb = pb
        self.cfg = cfg
        # One channel per process: HTTP/2 multiplexes every thread's calls over it, and
        # it reconnects by itself after the service restarts.
        # gRPC's default reconnect backoff grows to 120 s; a service on the same machine
        # that restarts in a second should be found again within a few.
        self.channel = grpc.insecure_channel(
            cfg.notes_rpc,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.min_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self.stub: pb_grpc.NotesStub = pb_grpc.NotesStub(self.channel)
        self._auth = (("authorization", f"Bearer {cfg.notes_token}"),) if cfg.notes_token else ()

    def _message(self, name: str, **fields: Any) -> Any:
        """A request message; a value protobuf refuses (a lone surrogate, an int beyond
        int32) is the client's error, not ours."""
        try:
            return getattr(self.pb, name)(**fields)
        except (ValueError, TypeError) as exc:
            raise NotesError(400, "INVALID_ARGUMENT", f"invalid request: {exc}") from None

    def _call(self, method: Callable[..., T], request: Any, request_id: str | None) -> T:
        import grpc

        passed = request_id is not None and REQUEST_ID_RE.fullmatch(request_id)
        metadata = self._auth + ((("x-request-id", request_id),) if passed else ())
        try:
            return method(request, timeout=self.cfg.rpc_deadline, metadata=metadata)
        except grpc.RpcError as exc:
            raise _status_of(exc) from None

    def create(self, title: str, body: str, rid: str | None) -> pb.Note:
        return self._call(
            self.stub.CreateNote, self._message("CreateNoteRequest", title=title, body=body), rid
        )

    def get(self, note_id: int, rid: str | None) -> pb.Note:
        if not 0 < note_id <= MAX_NOTE_ID:
            raise NotesError(404, "NOT_FOUND", f"note {note_id} does not exist")
        return self._call(self.stub.GetNote, self._message("GetNoteRequest", id=note_id), rid)

    def page(self, query: str, size: int, token: str, rid: str | None) -> tuple[list[pb.Note], str]:
        if query:
            found = self._call(
                self.stub.SearchNotes,
                self._message("SearchNotesRequest", query=query, page_size=size, page_token=token),
                rid,
            )
            return list(found.notes), found.next_page_token
        listed = self._call(
            self.stub.ListNotes,
            self._message("ListNotesRequest", page_size=size, page_token=token),
            rid,
        )
        return list(listed.notes), listed.next_page_token

    def close(self) -> None:
        self.channel.close()


def note_json(note: pb.Note) -> dict[str, Any]:
    return {
        "id": note.id,
        "title": note.title,
        "body": note.body,
        "create_time": note.create_time.ToJsonString(),
        "update_time": note.update_time.ToJsonString(),
        "version": note.version,
    }


def _when(note: pb.Note) -> str:
    stamp = datetime.fromtimestamp(note.create_time.ToMilliseconds() / 1000, tz=UTC)
    return stamp.strftime("%Y-%m-%d %H:%M UTC")


def create_app(env: Mapping[str, str] | None = None) -> Flask:
    """The WSGI app, configured from ``env`` (``os.environ`` by default).

    Raises:
        ConfigError: a bad ``NETSTACK_*`` setting (``netstack serve`` reports it, exit 2).
    """
    cfg = build(NotesWebConfig, env=os.environ if env is None else env)
    return make_app(cfg)


def make_app(cfg: NotesWebConfig) -> Flask:
    """The WSGI app for ``cfg``."""
    from flask import Flask, abort, jsonify, redirect, render_template, request, url_for

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_JSON_BYTES
    app.jinja_env.filters["when"] = _when
    app.jinja_env.globals["served_by"] = cfg.served_by
    notes = Notes(cfg)
    app.extensions["netstack.notes"] = notes
    stats = {"requests": 0}
    lock = threading.Lock()

    def rid() -> str | None:
        return request.headers.get("X-Request-Id")

    def wants_json() -> bool:
        return request.path.startswith("/api/")

    @app.after_request
    def served_by(response: Response) -> Response:
        response.headers["X-Served-By"] = cfg.served_by
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if response.mimetype == "text/html":
            response.headers.setdefault(
                "Content-Security-Policy",
                "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                "base-uri 'none'; frame-ancestors 'none'",
            )
        with lock:
            stats["requests"] += 1
        return response

    @app.errorhandler(NotesError)
    def notes_error(exc: NotesError) -> tuple[Any, int]:
        if wants_json():
            return jsonify(error=exc.message, code=exc.code), exc.status
        return render_template("error.html", status=exc.status, message=exc.message), exc.status

    @app.errorhandler(HTTPStatus.NOT_FOUND)
    @app.errorhandler(HTTPStatus.METHOD_NOT_ALLOWED)
    @app.errorhandler(HTTPStatus.BAD_REQUEST)
    @app.errorhandler(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    @app.errorhandler(HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    def http_error(exc: Any) -> tuple[Any, int]:
        status = int(exc.code)
        message = exc.description if status != 404 else "There is nothing at this address."
        if wants_json():
            return jsonify(error=message, code=HTTPStatus(status).name), status
        return render_template("error.html", status=status, message=message), status

    # ------------------------------------------------------------------ pages

    @app.get("/")
    def index() -> str:
        query = request.args.get("q", "").strip()
        token = request.args.get("page", "")
        items, next_token = notes.page(query, PAGE_SIZE, token, rid())
        return render_template(
            "index.html", notes=items, query=query, next_token=next_token, first=not token
        )

    @app.get("/notes/new")
    def new_note() -> str:
        return render_template("new.html", title="", body="", error=None)

    @app.post("/notes")
    def create_note() -> Any:
        if not _same_origin(request.headers.get("Origin"), request.host):
            abort(HTTPStatus.BAD_REQUEST, "This form must be sent from this site.")
        title = request.form.get("title", "")
        body = request.form.get("body", "")
        try:
            note = notes.create(title, body, rid())
        except NotesError as exc:
            if exc.status != 400:
                raise
            page = render_template("new.html", title=title, body=body, error=exc.message)
            return page, 400
        return redirect(url_for("view_note", note_id=note.id), code=303)

    @app.get("/notes/<int:note_id>")
    def view_note(note_id: int) -> str:
        return render_template("note.html", note=notes.get(note_id, rid()))

    @app.get("/chat")
    def chat() -> Any:
        return redirect("/chat/", code=308)

    @app.get("/healthz")
    def healthz() -> tuple[str, int, dict[str, str]]:
        return "ok\n", 200, {"Content-Type": "text/plain; charset=utf-8"}

    # ------------------------------------------------------------------ JSON API

    @app.get("/api/notes")
    def api_list() -> Any:
        try:
            size = int(request.args.get("page_size", PAGE_SIZE))
        except ValueError:
            abort(HTTPStatus.BAD_REQUEST, "page_size: expected an integer")
        if not 0 <= size <= MAX_PAGE_SIZE:  # the service clamps to its own maximum
            abort(HTTPStatus.BAD_REQUEST, f"page_size: expected 0-{MAX_PAGE_SIZE}, got {size}")
        items, next_token = notes.page(
            request.args.get("q", "").strip(), size, request.args.get("page_token", ""), rid()
        )
        return jsonify(notes=[note_json(n) for n in items], next_page_token=next_token)

    @app.post("/api/notes")
    def api_create() -> Any:
        if not request.is_json:
            abort(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json")
        doc = request.get_json(silent=True)
        if not isinstance(doc, dict):
            abort(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        title, body = doc.get("title", ""), doc.get("body", "")
        if not isinstance(title, str) or not isinstance(body, str):
            abort(HTTPStatus.BAD_REQUEST, "title and body must be strings")
        note = notes.create(title, body, rid())
        response = jsonify(note_json(note))
        response.status_code = 201
        response.headers["Location"] = f"/api/notes/{note.id}"
        return response

    @app.get("/api/notes/<int:note_id>")
    def api_get(note_id: int) -> Any:
        return jsonify(note_json(notes.get(note_id, rid())))

    return app


def _same_origin(origin: str | None, host: str) -> bool:
    """A form POST must come from a page of this site (CSRF); no Origin: not a browser."""
    if origin is None:
        return True
    return urlsplit(origin).netloc == host


__all__ = ["NotesError", "create_app", "make_app", "note_json"]
