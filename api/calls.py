"""Request plumbing of the HTTP API: the `Call` an endpoint gets (request, bound settings and store, the body
already read, checked path and query values) and the `Endpoint` that runs it. Endpoints are plain functions
`(Call) -> dict | Response`; a sync one runs in Starlette's thread pool, since engine calls block.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from api import intake
from core.config import Settings
from core.errors import NotFound, Problem, clip
from core.models import ALL_STATUSES
from core.store import Store
from core.users import Actor

PREFIX = "/api/v1"
ACTOR = "comfybatch.actor"  # the scope key under which the guard leaves the acting user (core.users.Actor)
MAX_ID = 2**63 - 1  # the largest id SQLite can hold; anything larger is simply not found
MAX_ID_DIGITS = len(str(MAX_ID))  # checked before int(): Python refuses to parse 4,300+ digits


def parse_id(raw: str) -> int | None:
    """A database id from text, or None (never int() of an arbitrarily long string)."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > MAX_ID_DIGITS or int(raw) > MAX_ID:
        return None
    return int(raw)


def query_int(query: QueryParams, name: str, default: int | None, low: int = 0, high: int = MAX_ID) -> int | None:
    """A whole-number query parameter from `low` to `high` (`default` when absent or empty); ApiError 400
    naming it otherwise."""
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    text = raw.strip()
    digits = text.removeprefix("-")
    if (not digits.isascii() or not digits.isdecimal() or len(digits) > MAX_ID_DIGITS
            or not low <= int(text) <= high):
        raise ApiError(400, f"query parameter '{name}': expected a whole number from {low} to {high}, "
                            f"got {clip(raw)!r}")
    return int(text)


class ApiError(Exception):
    """A failure with an HTTP status; `str(exc)` is a sentence for a person."""

    def __init__(self, status: int, message: str, problems: list[Problem] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.problems = list(problems or [])
        self.headers = headers or {}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str, separators=(",", ":"))
    return Response(body, status, headers, media_type="application/json")


class Bound:
    """Routes that serve the settings and store of the running server, bound by the app's lifespan."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.store: Store | None = None

    def bind(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store

    def unbind(self) -> None:
        self.settings, self.store = None, None


@dataclass
class Call:
    request: Request
    settings: Settings
    store: Store
    body: bytes = b""
    form_fields: dict[str, list[str]] = field(default_factory=dict)
    form_files: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)

    @property
    def base(self) -> str:
        """Absolute base of every URL in a reply: settings.public_url, else the request's own."""
        return self.settings.public_url or str(self.request.base_url).rstrip("/")

    @property
    def actor(self) -> Actor:
        """Who is acting: set by the guard (api.app.check_access) before any endpoint runs."""
        return self.request.scope[ACTOR]

    def url(self, path: str) -> str:
        return self.base + PREFIX + path

    def path_id(self, name: str, what: str) -> int:
        raw = str(self.request.path_params[name])
        value = parse_id(raw)
        if value is None:
            raise NotFound(f"{what} {clip(raw)!r} does not exist ({what} ids are whole numbers)")
        return value

    def query_int(self, name: str, default: int | None, low: int = 0, high: int = MAX_ID) -> int | None:
        return query_int(self.request.query_params, name, default, low, high)

    def statuses(self) -> list[str]:
        """The `status` filter as api.openapi documents it: each value one or more statuses, comma-separated
        (spaces around them allowed); the parameter may repeat; an empty value is no filter."""
        values = [s.strip(" ") for raw in self.request.query_params.getlist("status") if raw for s in raw.split(",")]
        bad = [s for s in values if s not in ALL_STATUSES]
        if bad:
            raise ApiError(400, f"query parameter 'status': unknown status {clip(bad[0])!r} (one of: "
                                f"{', '.join(ALL_STATUSES)}; several may be given comma-separated)")
        return values

    def json_object(self) -> dict[str, Any]:
        data = intake.parse_json(self.body) if self.body.strip() else {}
        if not isinstance(data, dict):
            raise ApiError(422, "the request body must be a JSON object")
        return data


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Callable[[Call], Any]
    body: str | None = None  # "json" | "form": read before the handler runs

    @property
    def name(self) -> str:
        return self.handler.__name__

    async def run(self, request: Request, settings: Settings, store: Store) -> Response:
        call = Call(request, settings, store)
        if self.body == "json":
            content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if content_type not in ("application/json", ""):
                raise ApiError(415, f"send the body as JSON (Content-Type: application/json), not {content_type}"
                               + ("; a CSV upload goes to POST /api/v1/batches/csv"
                                  if content_type.startswith("multipart/") else ""))
            call.body = await request.body()
        elif self.body == "form":
            await _read_form(request, call)
        if inspect.iscoroutinefunction(self.handler):
            result = await self.handler(call)
        else:
            result = await run_in_threadpool(self.handler, call)
        return result if isinstance(result, Response) else json_response(result)


async def _read_form(request: Request, call: Call) -> None:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "send the CSV as multipart/form-data (a file field 'csv', optional 'images' files and "
                            "the fields workflow, name, priority, count)")
    async with request.form(max_files=1000, max_fields=100) as form:
        for key, value in form.multi_items():
            if isinstance(value, str):
                call.form_fields.setdefault(key, []).append(value)
            else:
                call.form_files.setdefault(key, []).append((value.filename or "", await value.read()))


@dataclass(frozen=True)
class Socket:
    """A WebSocket route: `handler(websocket, settings, store)` runs once the guard let the handshake in."""

    path: str
    handler: Callable[[WebSocket, Settings, Store], Awaitable[None]]

    @property
    def name(self) -> str:
        return self.handler.__name__
