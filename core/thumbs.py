"""Thumbnails: made once per image and kept on disk under `<output_dir>/_thumbs/`, mirroring the image's
path, as WebP (alpha kept). A thumbnail is remade only when its image is newer than it, so a gallery page
reads small files instead of re-encoding big PNGs on every view. Side effect: files under `_thumbs/`."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps

from core import files
from core.errors import NotFound

THUMB_DIR = "_thumbs"
THUMB_SIZE = 320  # longest side, in pixels
THUMB_FORMAT = ("WEBP", ".webp", "image/webp")


def source_path(output_dir: Path, relative: str) -> Path:
    """The image file for a stored relative path, refusing anything that would leave the output folder."""
    root = output_dir.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root) or path == root:
        raise NotFound(f"image path {relative!r} is outside the output folder")
    return path


def thumb_path(output_dir: Path, relative: str) -> Path:
    return output_dir.resolve() / THUMB_DIR / Path(relative).with_suffix(THUMB_FORMAT[1])


def ensure_thumb(output_dir: Path, relative: str, size: int = THUMB_SIZE) -> Path:
    """The thumbnail of one stored image, written on first use (atomically, so concurrent requests are safe)."""
    src = source_path(output_dir, relative)
    dst = thumb_path(output_dir, relative)
    try:
        src_mtime = src.stat().st_mtime
    except FileNotFoundError:
        if dst.is_file():  # the original went to object storage (COMFYBATCH_S3_DELETE_LOCAL): keep its thumbnail
            return dst
        raise NotFound(f"image file {relative} is missing from {output_dir}") from None
    try:
        if dst.stat().st_mtime >= src_mtime:
            return dst
    except FileNotFoundError:
        pass
    files.write_atomic(dst, make_thumb(src.read_bytes(), size))
    return dst


def make_thumb(data: bytes, size: int = THUMB_SIZE) -> bytes:
    """Encode a thumbnail no larger than `size` on its longest side, keeping transparency."""
    try:
        with Image.open(io.BytesIO(data)) as original:
            has_alpha = original.mode in ("RGBA", "LA", "PA") or (
                original.mode == "P" and "transparency" in original.info)
            small = ImageOps.exif_transpose(original).convert("RGBA" if has_alpha else "RGB")
            small.thumbnail((size, size), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            small.save(out, THUMB_FORMAT[0], quality=82, method=4)
            return out.getvalue()
    except (OSError, ValueError) as exc:
        raise NotFound(f"cannot read the image to make a thumbnail: {exc}") from None
