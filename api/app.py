"""The HTTP API, versioned under /api/v1: one ASGI app mounted into `st.App(routes=...)` by app.py.

This module owns the edge every request crosses before an endpoint runs (api.endpoints) and the one it
crosses on the way out:

    CORS (settings.cors_origins; preflights answered here, before the token check)
     -> guard: API bound? who is it (api.auth: a bearer token, a session cookie or, for an image, a signed
        link)? body under max_upload_mb?
     -> router: /api/v1/... -> endpoint (engine calls run in the thread pool)
     <- any failure becomes JSON {"error": sentence, "problems": [Problem fields]}, never a traceback:
        InputError 422, NotFound 404, Forbidden (role or ownership) 403, too large 413, no/bad token 401, the
        rest 500 (logged).

Settings and the store are bound once by the server's lifespan (`bind`), as api.files does for its file
routes. Side effects: none here beyond the response; endpoints act through core.service.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from api import auth, endpoints, events, ws
from api.calls import ACTOR, PREFIX, ApiError, Endpoint, Socket, json_response, parse_id
from api.intake import BadRequest
from core import access
from core.config import Settings
from core.errors import ComfyBatchError, Forbidden, InputError, NotFound, Problem, ServerUnavailable, StorageError
from core.store import Store
from core.users import Actor

log = logging.getLogger("core.api")

DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) this much of an oversize body so the client sees the 413
_IMAGE_PATH = re.compile(r"/images/([^/]+)(?:/thumbnail)?$")  # the routes a signed image link may open


# The API: every route, in matching order. The OpenAPI test checks this table against the document.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/", endpoints.index),
    Endpoint("GET", "/openapi.json", endpoints.openapi),
    Endpoint("GET", "/health", endpoints.health),
    Endpoint("GET", "/workflows", endpoints.list_workflows),
    Endpoint("GET", "/workflows/{name}", endpoints.get_workflow),
    Endpoint("GET", "/batches", endpoints.list_batches),
    Endpoint("POST", "/batches", endpoints.submit_batch, body="json"),
    Endpoint("POST", "/batches/csv", endpoints.submit_csv, body="form"),
    Endpoint("GET", "/batches/{batch_id}", endpoints.get_batch),
    Endpoint("GET", "/batches/{batch_id}/images", endpoints.batch_images),
    Endpoint("GET", "/batches/{batch_id}/images.zip", endpoints.batch_zip),
    Endpoint("GET", "/batches/{batch_id}/results.csv", endpoints.batch_csv),
    Endpoint("POST", "/batches/{batch_id}/cancel", endpoints.cancel_batch),
    Endpoint("POST", "/batches/{batch_id}/retry", endpoints.retry_batch),
    Endpoint("POST", "/batches/{batch_id}/priority", endpoints.batch_priority, body="json"),
    Endpoint("POST", "/batches/{batch_id}/pause", endpoints.pause_batch),
    Endpoint("POST", "/batches/{batch_id}/resume", endpoints.resume_batch),
    Endpoint("POST", "/batches/{batch_id}/run-next", endpoints.run_batch_next),
    Endpoint("GET", "/queue", endpoints.get_queue),
    Endpoint("POST", "/queue/pause", endpoints.pause_queue),
    Endpoint("POST", "/queue/resume", endpoints.resume_queue),
    Endpoint("POST", "/servers/drain", endpoints.drain_server, body="json"),
    Endpoint("POST", "/servers/undrain", endpoints.undrain_server, body="json"),
    Endpoint("GET", "/tasks", endpoints.list_tasks),
    Endpoint("GET", "/tasks/{task_id}", endpoints.get_task),
    Endpoint("GET", "/tasks/{task_id}/events", endpoints.task_events),
    Endpoint("POST", "/tasks/{task_id}/cancel", endpoints.cancel_task),
    Endpoint("POST", "/tasks/{task_id}/retry", endpoints.retry_task),
    Endpoint("POST", "/tasks/{task_id}/priority", endpoints.task_priority, body="json"),
    Endpoint("GET", "/images/{image_id}", endpoints.image),
    Endpoint("GET", "/images/{image_id}/thumbnail", endpoints.thumbnail),
    Endpoint("GET", "/events", events.list_events),
    Endpoint("GET", "/events/stream", events.stream_events),
)
SOCKETS: tuple[Socket, ...] = (Socket("/events/ws", ws.events_socket),)


class BodyTooLarge(Exception):
    pass


class Api:
    """The ASGI app behind `PREFIX`. `bind` hands it the settings and store of the running server. Another
    route table (api.compat's) gets the same guard with its own `endpoints`, `sockets` and error shape."""

    def __init__(self, endpoints: tuple[Endpoint, ...] = ENDPOINTS, sockets: tuple[Socket, ...] = SOCKETS,
                 prefix: str = PREFIX) -> None:
        self.settings: Settings | None = None
        self.store: Store | None = None
        self.endpoints = endpoints
        self.prefix = prefix
        self.router = Router(routes=[*(Route(e.path, self._wrap(e), methods=[e.method], name=e.name)
                                       for e in self.endpoints),
                                     *(WebSocketRoute(w.path, self._wrap_socket(w), name=w.name) for w in sockets)],
                             default=self._no_such_endpoint, redirect_slashes=False)
        self._entry: ASGIApp = self._guarded

    def bind(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store
        self._entry = self._guarded
        if settings.cors_origins:
            self._entry = CORSMiddleware(
                self._guarded, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                expose_headers=["Content-Disposition", "Location"], max_age=600)

    def unbind(self) -> None:
        self.settings, self.store = None, None
        self._entry = self._guarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._guarded_socket(scope, receive, send)
        elif scope["type"] == "http":
            await self._entry(scope, receive, send)

    async def _guarded_socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket passes the same token check as a request (its handshake's Authorization header); one
        refused, or to no such path, is closed before it is accepted (the client sees HTTP 403)."""
        try:
            if self.settings is None or self.store is None:
                raise ApiError(503, "the API is not started")
            scope[ACTOR] = check_access(self.settings, self.store, scope)
            await self.router({k: v for k, v in scope.items() if k != "starlette.exception_handlers"}, receive, send)
        except WebSocketDisconnect:
            return  # the client left (during the handshake or a send): nothing to answer
        except Exception as exc:
            if not isinstance(exc, ApiError):
                log.error("websocket %s failed", scope.get("path"), exc_info=exc)
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1008 if isinstance(exc, ApiError) else 1011})

    # -- the guard ----------------------------------------------------------------------------------
    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if self.settings is None or self.store is None:
                raise ApiError(503, "the API is not started: the server could not load its settings "
                                    "(the log file and the app's pages say why)")
            scope[ACTOR] = check_access(self.settings, self.store, scope)
            limit = int(self.settings.max_upload_mb * 1024 * 1024)
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > limit:
                raise BodyTooLarge
            # Without the host app's exception handlers, every failure comes back here and is answered as JSON.
            inner = {k: v for k, v in scope.items() if k != "starlette.exception_handlers"}
            await self.router(inner, _limited(receive, limit), tracking_send)
        except Exception as exc:  # the catch-all: a person gets a sentence, the log gets the traceback
            if started:
                log.error("%s %s failed after its response started", scope["method"], scope["path"], exc_info=exc)
                return
            if isinstance(exc, BodyTooLarge):
                await _drain(receive)
            response = self.error_response(exc, scope)
            await response(scope, receive, send)

    def body(self, message: str, problems: list[Problem]) -> dict[str, Any]:
        """The JSON of a failure (api.compat answers in the old tool's shape instead)."""
        return error_body(message, problems)

    def error_response(self, exc: Exception, scope: Scope) -> Response:
        headers: dict[str, str] = {}
        problems: list[Problem] = []
        if isinstance(exc, ApiError):
            status, message, problems, headers = exc.status, str(exc), exc.problems, exc.headers
        elif isinstance(exc, BodyTooLarge):
            assert self.settings is not None
            status, message = 413, (f"the request body is larger than {self.settings.max_upload_mb:g} MB "
                                    "(COMFYBATCH_MAX_UPLOAD_MB); nothing was enqueued")
        elif isinstance(exc, BadRequest):
            status, message = 400, str(exc)
        elif isinstance(exc, InputError):
            status, message, problems = 422, exc.summary, exc.problems
        elif isinstance(exc, NotFound):
            status, message = 404, str(exc)
        elif isinstance(exc, Forbidden):
            status, message = 403, str(exc)
        elif isinstance(exc, HTTPException):  # raised by Starlette itself: 405, malformed multipart
            status, message, headers = exc.status_code, _http_detail(exc), dict(exc.headers or {})
        elif isinstance(exc, ServerUnavailable | StorageError):  # ComfyUI or the object store: try again later
            status, message = 503, str(exc)
        elif isinstance(exc, ComfyBatchError):
            log.error("%s %s: %s", scope["method"], scope["path"], exc)
            status, message = 500, str(exc)
        else:
            log.error("%s %s: unexpected error", scope["method"], scope["path"], exc_info=exc)
            status, message = 500, (f"internal error while handling {scope['method']} {scope['path']}; "
                                    "the details are in the server's log")
        return json_response(self.body(message, problems), status, headers)

    async def _no_such_endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        listed = f"every endpoint is listed in {PREFIX}/openapi.json" if self.prefix == PREFIX else \
            "the README lists the endpoints"
        raise ApiError(404, f"no such API endpoint: {scope.get('method', 'WEBSOCKET')} {scope['path']} ({listed})")

    def _wrap_socket(self, socket: Socket) -> Callable[[WebSocket], Awaitable[None]]:
        async def handle(websocket: WebSocket) -> None:
            assert self.settings is not None and self.store is not None
            await socket.handler(websocket, self.settings, self.store)

        return handle

    def _wrap(self, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            assert self.settings is not None and self.store is not None
            return await endpoint.run(request, self.settings, self.store)

        return handle


def check_access(settings: Settings, store: Store, scope: Scope) -> Actor:
    """The acting user of an API request (api.auth.request_actor): a bearer token, a signed-in session cookie,
    or (image routes only) a valid `sig`; open access when no sign-in and no token is configured. 401
    otherwise. Tokens are compared in constant time and never logged."""
    image = _IMAGE_PATH.search(scope.get("path", ""))
    actor = auth.request_actor(settings, store, scope, parse_id(image.group(1)) if image else None)
    if actor is not None:
        return actor
    error = ', error="invalid_token"' if access.bearer_token(Headers(scope=scope).get("authorization")) else ""
    raise ApiError(401, auth.denied_message(settings, scope),
                   headers={"WWW-Authenticate": f'Bearer realm="ComfyBatch"{error}'})


def error_body(message: str, problems: list[Problem]) -> dict[str, Any]:
    """{"error": sentence, "problems": [...]}: each problem with its rendered `message` and its fields (row,
    column, parameter, node, ...), so a client can point at the cell without parsing text."""
    return {"error": message, "problems": [p.as_dict() for p in problems]}


def _http_detail(exc: HTTPException) -> str:
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return "this endpoint does not take that method" + (f"; it takes {allowed}" if allowed else "")
    return str(exc.detail)


def _limited(receive: Receive, limit: int) -> Receive:
    """`receive`, raising BodyTooLarge as soon as the body passes `limit` bytes (chunked uploads too)."""
    total = 0

    async def limited_receive() -> Message:
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:
                raise BodyTooLarge
        return message

    return limited_receive


async def _drain(receive: Receive) -> None:
    """Read the rest of a refused body (up to DRAIN_LIMIT), so a client still sending sees our 413 instead
    of a connection reset."""
    seen = 0
    while seen < DRAIN_LIMIT:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
