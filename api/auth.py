"""Who a request is, for the API and the file routes, and the local accounts' sign-in and sign-out routes.

    GET  /signin    the sign-in form (local accounts: COMFYBATCH_USERS_FILE)
    POST /signin    check the password (core.accounts: lockout after repeated failures); on success set the
                    session cookie (HttpOnly, SameSite=Lax, a random id whose hash is in the database) and go to
                    the pages; on failure the form again with the reason (401, or 429 during a lockout)
    GET  /signout   end the session (deleted from the database) and clear the cookie

A request is let through by `request_actor` when it carries a valid bearer token (COMFYBATCH_API_TOKENS or a
per-user token), a signed-in session cookie (reads only: GET and HEAD), or, for an image, a signed link; with
no sign-in and no token configured everything is open (the local admin). Passwords and tokens are never
logged or echoed.
"""

from __future__ import annotations

import html
import logging

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from api.calls import Bound
from core import access, accounts
from core.config import Settings
from core.errors import ConfigError, SignInFailed
from core.store import Store
from core.users import LOCAL, MEMBER, Actor

log = logging.getLogger("core.api")

LINK_READER = Actor("signed link", MEMBER)  # an image opened through a signed link: may read that image only
MAX_FORM = 4096  # bytes of a sign-in form


def session_cookie(scope: Scope) -> str | None:
    return Request(scope).cookies.get(accounts.SESSION_COOKIE)


def request_actor(settings: Settings, store: Store, scope: Scope, image_id: int | None = None) -> Actor | None:
    """The person behind the request (token, then session cookie); LOCAL with open access; LINK_READER for an
    image whose `sig` is valid; else None (refuse)."""
    token = access.bearer_token(Headers(scope=scope).get("authorization"))
    # The session cookie opens reads only: a page on another port of the same host is "same-site", so even a
    # SameSite=Lax cookie would ride along on its POSTs (cross-site request forgery). Changes need a token.
    reading = scope.get("method") in ("GET", "HEAD")
    actor = accounts.actor_for(settings, store, token, session_cookie(scope) if reading else None)
    if actor is not None:
        return actor
    if accounts.open_access(settings):
        return LOCAL
    sig = QueryParams(scope.get("query_string", b"")).get("sig")
    if image_id is not None and access.signature_ok(settings, image_id, sig):
        return LINK_READER
    return None


def denied_message(settings: Settings, scope: Scope) -> str:
    """Why a request without a usable credential is refused (never echoing what it sent)."""
    if access.bearer_token(Headers(scope=scope).get("authorization")) is not None:
        return ("the API token is not valid (compare it with COMFYBATCH_API_TOKENS on the server, or make a "
                "token on the Account page; revoked tokens stop working at once)")
    if settings.sign_in:
        return ("this needs a sign-in: open the app and sign in, or send 'Authorization: Bearer <token>' with a "
                "token from the Account page")
    return ("this API needs a token: send the header 'Authorization: Bearer <token>' (the tokens are set in "
            "COMFYBATCH_API_TOKENS)")


class SignInRoutes(Bound):
    """The sign-in form and its session cookie, bound to the running server's settings and store."""

    @property
    def routes(self) -> list[Route]:
        return [Route("/signin", self.form, methods=["GET"]), Route("/signin", self.sign_in, methods=["POST"]),
                Route("/signout", self.sign_out, methods=["GET", "POST"])]

    def form(self, request: Request) -> Response:
        return _form_page("", 200, request.query_params.get("name", "")[:100])

    async def sign_in(self, request: Request) -> Response:
        if self.settings is None or self.store is None:
            return _form_page("the server is not started", 503)
        if self.settings.users_file is None:
            return _form_page("local accounts are not configured on this server (COMFYBATCH_USERS_FILE)", 404)
        body = await request.body()
        if len(body) > MAX_FORM:
            return _form_page("the sign-in form is too large", 413)
        fields = QueryParams(body.decode("utf-8", "replace"))
        name, password = fields.get("name", "")[:100], fields.get("password", "")
        settings, store = self.settings, self.store
        try:
            # Argon2 is slow on purpose: off the event loop.
            session_id = await run_in_threadpool(accounts.sign_in, settings, store, name, password)
        except SignInFailed as exc:
            log.info("sign-in refused for %r: %s", name, "locked" if exc.retry_after else "wrong name or password")
            headers = {"Retry-After": str(int(exc.retry_after) + 1)} if exc.retry_after else {}
            return _form_page(str(exc), 429 if exc.retry_after else 401, name, headers)
        except ConfigError as exc:
            return _form_page(str(exc), 500, name)
        log.info("%s signed in", name)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(accounts.SESSION_COOKIE, session_id, max_age=int(settings.session_hours * 3600),
                            path="/", httponly=True, samesite="lax", secure=request.url.scheme == "https")
        return response

    def sign_out(self, request: Request) -> Response:
        if self.store is not None:
            accounts.sign_out(self.store, request.cookies.get(accounts.SESSION_COOKIE))
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(accounts.SESSION_COOKIE, path="/")
        return response


def _form_page(error: str, status: int, name: str = "", headers: dict[str, str] | None = None) -> HTMLResponse:
    message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return HTMLResponse(
        "<!doctype html><html><head><meta charset='utf-8'><title>Sign in - ComfyBatch</title>"
        "<meta name='viewport' content='width=device-width'><style>body{font-family:sans-serif;max-width:22em;"
        "margin:4em auto}label,input,button{display:block;width:100%;margin:.3em 0}.error{color:#b00}</style>"
        f"</head><body><h1>ComfyBatch</h1><h2>Sign in</h2>{message}<form method='post' action='/signin'>"
        f"<label for='name'>User name</label><input id='name' name='name' autocomplete='username' required "
        f"value='{html.escape(name, quote=True)}'><label for='password'>Password</label><input id='password' "
        "name='password' type='password' autocomplete='current-password' required>"
        "<button type='submit'>Sign in</button></form></body></html>", status, headers)
