"""WebSockets of the HTTP API: `/api/v1/events/ws`, the events of the SSE stream (api.events) for platforms
that speak WebSocket rather than server-sent events. Same source (`events.follow`), same parameters and the
same resume semantics: `?after=<id>` (or a Last-Event-ID header on the handshake), `?batch_id=`, `?task_id=`,
`?timeout=` seconds (default 30, at most 300), after which the server closes with code 1000 and the last id
sent in the close reason; reconnecting with `?after=<that id>` misses nothing and sees nothing twice.

Each message is one event as JSON text, exactly as the SSE stream's `data:` line. A bad parameter is answered
with one message `{"error": sentence}` and close code 1008. Pings are the WebSocket server's (uvicorn's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from api.calls import ACTOR, ApiError
from api.events import follow, follow_params
from api.shapes import event_json
from core import visibility
from core.config import Settings
from core.store import Store

POLICY_VIOLATION = 1008


async def events_socket(websocket: WebSocket, settings: Settings, store: Store) -> None:
    await websocket.accept()
    try:
        where = follow_params(websocket.headers, websocket.query_params,
                              visibility.person_for(settings, websocket.scope[ACTOR]))
    except ApiError as exc:
        await refuse(websocket, str(exc))
        return
    last = where.after

    async def send_events() -> None:
        nonlocal last
        async for event in follow(store, where):
            if event is not None:
                await websocket.send_text(json.dumps(event_json(event), separators=(",", ":")))
                last = event["id"]

    if await until_disconnected(websocket, send_events):
        await websocket.close(1000, f"timeout; resume with ?after={last}")


async def refuse(websocket: WebSocket, message: str) -> None:
    await websocket.send_text(json.dumps({"error": message}))
    await websocket.close(POLICY_VIOLATION)


async def until_disconnected(websocket: WebSocket, work: Callable[[], Awaitable[None]]) -> bool:
    """Run `work` until it ends (True) or the client goes away (False; `work` is cancelled). Whatever the
    client sends is read and dropped, so a closed connection is noticed at once rather than at the next send."""
    sender = asyncio.ensure_future(work())
    reader = asyncio.ensure_future(_drain(websocket))
    try:
        done, _ = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, reader):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError, OSError):
                await task
    if sender in done and sender.exception() is None:
        return True
    if sender in done and not isinstance(sender.exception(), (WebSocketDisconnect, OSError, RuntimeError)):
        raise sender.exception()  # type: ignore[misc]
    return False


async def _drain(websocket: WebSocket) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return

