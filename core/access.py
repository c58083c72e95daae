"""Who may read what: bearer tokens and signed image links, checked in one place for every route that serves
images (the pages' `/files/...` and the API's `/api/v1/images/...`) and for the API itself. Pure: no I/O.

With no tokens configured everything is open (one person on a trusted network). With tokens, a request needs
`Authorization: Bearer <token>` (scheme case-insensitive, RFC 7235) or, for an image, the `sig` query value
the pages put in the URLs they render: an HMAC of the image id keyed by the tokens, so an `<img>` tag works
while a guessed `/files/image/42` does not. Everything is compared as bytes in constant time, so neither
timing nor a non-ASCII value (a 500 before) tells anything.
"""

from __future__ import annotations

import hashlib
import hmac

from core.config import Settings

THUMB_URL = "/files/thumb/{image_id}"
IMAGE_URL = "/files/image/{image_id}"


def _key(tokens: tuple[str, ...]) -> bytes | None:
    return hashlib.sha256("\n".join(sorted(tokens)).encode("utf-8")).digest() if tokens else None


def signature(settings: Settings, image_id: int) -> str:
    return hmac.new(_key(settings.api_tokens) or b"", f"image:{int(image_id)}".encode(), hashlib.sha256
                    ).hexdigest()[:32]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (any case of "Bearer"), else None."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    return given.strip()


def token_ok(settings: Settings, authorization: str | None) -> bool:
    """True when the header carries one of the configured tokens (every token compared, in constant time)."""
    given = bearer_token(authorization)
    if given is None:
        return False
    candidate = given.encode("utf-8", "surrogateescape")
    matched = False
    for token in settings.api_tokens:
        matched |= hmac.compare_digest(candidate, token.encode("utf-8"))
    return matched


def signature_ok(settings: Settings, image_id: int, sig: str | None) -> bool:
    if not sig:
        return False
    return hmac.compare_digest(sig.encode("utf-8", "surrogateescape"), signature(settings, image_id).encode())


def may_read_image(settings: Settings, image_id: int, authorization: str | None, sig: str | None) -> bool:
    """Open access, a valid token, or a valid signed link for this image."""
    return not settings.api_tokens or token_ok(settings, authorization) or signature_ok(settings, image_id, sig)


def thumb_url(settings: Settings, image_id: int) -> str:
    """The pages' thumbnail URL of an image, signed when tokens are configured."""
    return _signed(settings, THUMB_URL.format(image_id=int(image_id)), image_id)


def image_url(settings: Settings, image_id: int) -> str:
    return _signed(settings, IMAGE_URL.format(image_id=int(image_id)), image_id)


def _signed(settings: Settings, url: str, image_id: int) -> str:
    return f"{url}?sig={signature(settings, image_id)}" if settings.api_tokens else url
