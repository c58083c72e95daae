"""Bearer tokens and signed image links, for every route that serves images (the pages' `/files/...` and the
API's `/api/v1/images/...`) and for the API itself (api.auth decides who a request is). Pure: no I/O.

With no tokens and no sign-in configured everything is open (one person on a trusted network). Otherwise a
request needs `Authorization: Bearer <token>` (scheme case-insensitive, RFC 7235), a signed-in session cookie
(core.accounts) or, for an image, the `sig` query value the pages put in the URLs they render: an HMAC of the
image id keyed by the tokens (and the OIDC cookie secret), so an `<img>` tag works while a guessed
`/files/image/42` does not. Everything is compared as bytes in constant time, so neither
timing nor a non-ASCII value (a 500 before) tells anything.
"""

from __future__ import annotations

import hashlib
import hmac

from core.config import Settings

THUMB_URL = "/files/thumb/{image_id}"
IMAGE_URL = "/files/image/{image_id}"


def _key(settings: Settings) -> bytes | None:
    """The link-signing key: from the API tokens and, with OIDC sign-in, the `[auth]` cookie secret. None when
    there is neither (no signed links then: a local sign-in's images go by its session cookie)."""
    material = sorted(settings.api_tokens) + ([settings.link_secret] if settings.link_secret else [])
    return hashlib.sha256("\n".join(material).encode("utf-8")).digest() if material else None


def signature(settings: Settings, image_id: int) -> str:
    return hmac.new(_key(settings) or b"", f"image:{int(image_id)}".encode(), hashlib.sha256).hexdigest()[:32]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (any case of "Bearer"), else None."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    return given.strip()


def signature_ok(settings: Settings, image_id: int, sig: str | None) -> bool:
    if not sig or _key(settings) is None:
        return False
    return hmac.compare_digest(sig.encode("utf-8", "surrogateescape"), signature(settings, image_id).encode())


def thumb_url(settings: Settings, image_id: int) -> str:
    """The pages' thumbnail URL of an image, signed when tokens are configured."""
    return _signed(settings, THUMB_URL.format(image_id=int(image_id)), image_id)


def image_url(settings: Settings, image_id: int) -> str:
    return _signed(settings, IMAGE_URL.format(image_id=int(image_id)), image_id)


def _signed(settings: Settings, url: str, image_id: int) -> str:
    return f"{url}?sig={signature(settings, image_id)}" if _key(settings) is not None else url
