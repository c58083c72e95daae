"""HTTP routes that serve result images and their thumbnails by integer id, for `st.App(routes=...)`:

    GET /files/thumb/{image_id}   WebP thumbnail (made once, see core.thumbs)
    GET /files/image/{image_id}   the original file, bytes unchanged

Paths come from the images table only, never from the request, and must stay inside the output folder.
The browser fetches these URLs itself, so big galleries cost the Streamlit server no memory. Like static
files, these routes are outside any in-app login gate: put an auth middleware in front if that matters.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from core import thumbs, views
from core.config import Settings
from core.errors import NotFound
from core.store import Store

THUMB_URL = "/files/thumb/{image_id}"
IMAGE_URL = "/files/image/{image_id}"
CACHE = "private, max-age=3600"


class FileServer:
    """Serves files of the database bound at start-up (`bind`, called by the app's lifespan)."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.store: Store | None = None

    def bind(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store

    def unbind(self) -> None:
        self.settings, self.store = None, None

    @property
    def routes(self) -> list[Route]:
        return [Route("/files/thumb/{image_id:int}", self.thumb, methods=["GET", "HEAD"]),
                Route("/files/image/{image_id:int}", self.image, methods=["GET", "HEAD"])]

    # Plain (sync) endpoints: Starlette runs them in its thread pool, off the event loop.
    def thumb(self, request: Request) -> Response:
        return self._serve(request, thumbnail=True)

    def image(self, request: Request) -> Response:
        return self._serve(request, thumbnail=False)

    def _serve(self, request: Request, thumbnail: bool) -> Response:
        if self.settings is None or self.store is None:
            return JSONResponse({"error": "the file server is not started"}, status_code=503)
        image_id = int(request.path_params["image_id"])
        try:
            row = views.get_image(self.store, image_id)
            if thumbnail:
                path = thumbs.ensure_thumb(self.settings.output_dir, row["path"])
                media_type = thumbs.THUMB_FORMAT[2]
            else:
                path = thumbs.source_path(self.settings.output_dir, row["path"])
                if not path.is_file():
                    raise NotFound(f"image file {row['path']} is missing from {self.settings.output_dir}")
                media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        except NotFound as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": CACHE},
                            filename=None if thumbnail else Path(row["path"]).name,
                            content_disposition_type="inline")


def thumb_url(image_id: int) -> str:
    return THUMB_URL.format(image_id=int(image_id))


def image_url(image_id: int) -> str:
    return IMAGE_URL.format(image_id=int(image_id))
