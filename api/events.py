"""Live updates of the HTTP API, read from the events table (every status change, in order, with an id):
a server-sent event stream that resumes from Last-Event-ID or ?after=, and the same events as JSON pages.

The stream ends itself after `timeout` seconds (default 30); EventSource and comfybatch_client reconnect and
resume without a gap. That bound also keeps a server restart from waiting long on open streams, since the
ASGI server lets open responses finish before it stops.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.responses import Response, StreamingResponse

from api.calls import ApiError, Call, parse_id, query_int
from api.shapes import event_json
from core import visibility
from core.store import Store

STREAM_POLL = 0.25  # seconds between reads of the events table while a stream is open
STREAM_KEEPALIVE = 10.0  # a comment line this often, so proxies keep the stream and dead clients are noticed
STREAM_SECONDS = 30  # default life of one stream
STREAM_MAX_SECONDS = 300
EVENTS_PAGE = 500  # /events: the default page
MAX_EVENTS_PAGE = 5000


def list_events(call: Call) -> dict[str, Any]:
    after = call.query_int("after", 0) or 0
    limit = call.query_int("limit", EVENTS_PAGE, 1, MAX_EVENTS_PAGE) or EVENTS_PAGE
    batch_id, task_id = call.query_int("batch_id", None, 1), call.query_int("task_id", None, 1)
    person = visibility.person_for(call.settings, call.actor)
    events, last = _events_after(call.store, after, batch_id, task_id, limit, person)
    query = "&".join(f"{k}={v}" for k, v in (("batch_id", batch_id), ("task_id", task_id)) if v is not None)
    latest = call.store.db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
    return {"events": [event_json(e) for e in events], "last_id": last, "latest_id": latest,
            "next": call.url(f"/events?after={last}" + (f"&{query}" if query else ""))}


@dataclass(frozen=True)
class Follow:
    """Where a live stream starts and what it shows: the same for the SSE stream and the WebSocket."""

    after: int
    batch_id: int | None
    task_id: int | None
    seconds: int
    person: str | None = None  # only events of this person's batches (core.visibility.person_for)


def follow_params(headers: Headers, query: QueryParams, person: str | None) -> Follow:
    """A live stream's parameters: resume after the Last-Event-ID header (as EventSource sends it) or ?after=,
    filter by ?batch_id= / ?task_id=, end after ?timeout= seconds. ApiError 400 naming a bad value."""
    header = headers.get("last-event-id", "").strip()
    resumed = parse_id(header) if header else None
    if header and resumed is None:
        raise ApiError(400, f"header Last-Event-ID: expected an event id (a whole number), got {header[:40]!r}")
    after = resumed if resumed is not None else (query_int(query, "after", 0) or 0)
    return Follow(after, query_int(query, "batch_id", None, 1), query_int(query, "task_id", None, 1),
                  query_int(query, "timeout", STREAM_SECONDS, 1, STREAM_MAX_SECONDS) or STREAM_SECONDS, person)


async def follow(store: Store, where: Follow) -> AsyncIterator[dict[str, Any] | None]:
    """The one live source of events: every event after `where.after` matching its filters, oldest first, as
    they are written; None after each look that found nothing new (a consumer's chance to do its own
    housekeeping); ends after `where.seconds`."""
    after = where.after
    loop = asyncio.get_running_loop()
    deadline = loop.time() + where.seconds
    while True:
        events, scanned = await run_in_threadpool(_events_after, store, after, where.batch_id, where.task_id, 500,
                                                   where.person)
        progressed, after = scanned != after, scanned
        for event in events:
            yield event
        if loop.time() >= deadline:
            return
        if progressed:
            continue  # there may be more right away
        yield None
        await asyncio.sleep(STREAM_POLL)


async def stream_events(call: Call) -> Response:
    """Server-sent events from the events table, oldest first, each with its id: a client that reconnects
    with Last-Event-ID (as EventSource does) or ?after= misses nothing and sees nothing twice."""
    where = follow_params(call.request.headers, call.request.query_params,
                          visibility.person_for(call.settings, call.actor))
    store = call.store

    async def lines() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        last_write = loop.time()
        yield "retry: 2000\n\n"
        async for event in follow(store, where):
            now = loop.time()
            if event is not None:
                yield f"id: {event['id']}\ndata: {json.dumps(event_json(event), separators=(',', ':'))}\n\n"
                last_write = now
            elif now - last_write >= STREAM_KEEPALIVE:
                yield ": keep-alive\n\n"
                last_write = now

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _events_after(store: Store, after: int, batch_id: int | None, task_id: int | None, limit: int,
                  person: str | None = None, scan_limit: int = 20_000) -> tuple[list[dict[str, Any]], int]:
    """Up to `limit` events after `after` matching the filters (with `person`, only events of that person's
    batches), and the last id looked at (so the next read starts there even when a whole page belonged to
    other batches)."""
    own = visibility.visible_batch_ids(store, person)
    found: list[dict[str, Any]] = []
    scanned = after
    while len(found) < limit and scanned - after < scan_limit:
        page = store.events(task_id=task_id, after_id=scanned, limit=1000)
        if not page:
            break
        for event in page:
            if (batch_id is None or event["batch_id"] == batch_id) and (own is None or event["batch_id"] in own):
                found.append(event)
                if len(found) == limit:
                    return found, event["id"]
            scanned = event["id"]
    return found, scanned
