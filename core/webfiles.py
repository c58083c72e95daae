"""HTTP routes that serve result images and their thumbnails by integer id, for `st.App(routes=...)`:

    GET /files/thumb/{image_id}   WebP thumbnail (made once, see core.thumbs)
    GET /files/image/{image_id}   the original file, bytes unchanged

Paths come from the images table only, never from the request, and must stay inside the output folder.
The browser fetches these URLs itself, so big galleries cost the Streamlit server no memory.

When API tokens are configured, a request needs either `Authorization: Bearer <token>` or the `sig` query
parameter that the pages put in the URLs they render (an HMAC of the image id keyed by the tokens), so an
`<img>` tag works while a guessed `/files/image/42` does not.
"""

from __future__ import annotations

import hashlib
import hmac
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
        global _signing_key
        self.settings, self.store = settings, store
        _signing_key = _key(settings.api_tokens)

    def unbind(self) -> None:
        global _signing_key
        self.settings, self.store = None, None
        _signing_key = None

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
        if not _allowed(request, self.settings, image_id):
            return JSONResponse({"error": "this file needs an API token (Authorization: Bearer ...) or a signed link "
                                          "from the app"}, status_code=401)
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


_signing_key: bytes | None = None  # set while a FileServer is bound with API tokens configured


def _key(tokens: tuple[str, ...]) -> bytes | None:
    return hashlib.sha256("\n".join(sorted(tokens)).encode()).digest() if tokens else None


def signature(image_id: int, key: bytes | None = None) -> str:
    return hmac.new(key or b"", f"image:{int(image_id)}".encode(), hashlib.sha256).hexdigest()[:32]


def _allowed(request: Request, settings: Settings, image_id: int) -> bool:
    key = _key(settings.api_tokens)
    if key is None:
        return True
    sig = request.query_params.get("sig", "")
    if sig and hmac.compare_digest(sig, signature(image_id, key)):
        return True
    given = request.headers.get("authorization", "")
    return any(hmac.compare_digest(given, f"Bearer {token}") for token in settings.api_tokens)


def _signed(url: str, image_id: int) -> str:
    return f"{url}?sig={signature(image_id, _signing_key)}" if _signing_key else url


def thumb_url(image_id: int) -> str:
    return _signed(THUMB_URL.format(image_id=int(image_id)), image_id)


def image_url(image_id: int) -> str:
    return _signed(IMAGE_URL.format(image_id=int(image_id)), image_id)
