"""Serving result images: one function (`image_response`) behind both the pages' routes and the API's
`/api/v1/images/{id}` endpoints, with one access check (api.auth.request_actor: a session cookie, a token,
or a signed link).

    GET /files/thumb/{image_id}   WebP thumbnail (made once, see core.thumbs)
    GET /files/image/{image_id}   the original file, bytes unchanged
    GET /files/export/{token}/{name}   a download the pages prepared on disk (core.exports; the token is its key)

Paths come from the images table only, never from the request, and must stay inside the output folder. The
browser fetches these URLs itself, so big galleries cost the Streamlit server no memory. An image whose local
copy was deleted after its upload to object storage is answered with a redirect to the store (307).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from api.auth import LINK_READER, denied_message, request_actor
from api.calls import Bound, parse_id
from core import exports, service, visibility
from core.config import Settings
from core.errors import NotFound
from core.store import Store
from core.users import Actor

CACHE = "private, max-age=3600"


def image_response(settings: Settings, store: Store, image_id: int, thumbnail: bool, actor: Actor) -> Response:
    """The image (bytes as ComfyUI made them) or its WebP thumbnail; a redirect to the object store when the
    local file was deleted after its upload; NotFound when the id or file is gone, or when it is someone
    else's and batches are private (a signed link still opens it: whoever holds one was given it)."""
    if actor is not LINK_READER:
        visibility.check_image(settings, store, actor, image_id)
    source = service.image_source(settings, store, image_id, thumbnail)
    if source.redirect is not None:
        return RedirectResponse(source.redirect, status_code=307, headers={"Cache-Control": "no-store"})
    assert source.path is not None
    named: dict[str, Any] = {} if thumbnail else {"filename": source.path.name, "content_disposition_type": "inline"}
    return FileResponse(source.path, media_type=source.media_type, headers={"Cache-Control": CACHE}, **named)


class FileServer(Bound):
    """The pages' file routes, serving the database bound at start-up (`bind`, called by the app's lifespan)."""

    @property
    def routes(self) -> list[Route]:
        return [Route("/files/thumb/{image_id}", self.thumb, methods=["GET", "HEAD"]),
                Route("/files/image/{image_id}", self.image, methods=["GET", "HEAD"]),
                Route("/files/export/{token}/{name}", self.export, methods=["GET", "HEAD"])]

    def export(self, request: Request) -> Response:
        """A results CSV, ZIP or contact sheet a page wrote to disk, sent from the file (never read whole)."""
        if self.settings is None:
            return JSONResponse({"error": "the file server is not started"}, status_code=503)
        name = str(request.path_params["name"])
        try:
            path = exports.find(self.settings, str(request.path_params["token"]), name)
        except NotFound as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return FileResponse(path, filename=name, headers={"Cache-Control": "private, no-store"})

    # Plain (sync) endpoints: Starlette runs them in its thread pool, off the event loop.
    def thumb(self, request: Request) -> Response:
        return self._serve(request, thumbnail=True)

    def image(self, request: Request) -> Response:
        return self._serve(request, thumbnail=False)

    def _serve(self, request: Request, thumbnail: bool) -> Response:
        if self.settings is None or self.store is None:
            return JSONResponse({"error": "the file server is not started"}, status_code=503)
        raw = str(request.path_params["image_id"])
        image_id = parse_id(raw)
        actor = request_actor(self.settings, self.store, request.scope, image_id)
        if actor is None:
            return JSONResponse({"error": denied_message(self.settings, request.scope)}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="ComfyBatch"'})
        if image_id is None:
            return JSONResponse({"error": f"image {raw[:40]!r} does not exist (image ids are whole numbers)"},
                                status_code=404)
        try:
            return image_response(self.settings, self.store, image_id, thumbnail, actor)
        except NotFound as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
