"""Sign-in and API tokens: the front door for who someone is, as core.service is for what they do. The pages,
the API's sign-in routes and the CLI call these; the SQL is core.sessions, the accounts and roles core.users.

Who a request is (`actor_for`), in this order: a bearer token (one of COMFYBATCH_API_TOKENS: an admin named
"api"; or a per-user token: its owner in the role it was made with), then the session cookie of a local sign-in.
Nothing matches: None (the caller refuses, unless no sign-in and no token is configured at all: `open_access`).

Lockout: after COMFYBATCH_LOCKOUT_AFTER failed sign-ins in a row for one user name, that name is refused for
COMFYBATCH_LOCKOUT_SECONDS, doubling with each further failure; a success clears the count. A refusal says
the same for an unknown name and a wrong password, and never repeats the password.
"""

from __future__ import annotations

import hmac
import math
import time
from typing import Any

from core import sessions, users
from core.config import Settings
from core.errors import Forbidden, InputError, NotFound, Problem, SignInFailed
from core.store import Store
from core.users import ADMIN, API_ADMIN, LOCAL, Actor

SESSION_COOKIE = "comfybatch_session"
MAX_LABEL = 100


def open_access(settings: Settings) -> bool:
    """No sign-in and no token configured: everyone who reaches the port is the local admin (today's default)."""
    return not settings.sign_in and not settings.api_tokens


def sign_in(settings: Settings, store: Store, name: str, password: str) -> str:
    """Check a local account's password; returns a new session id for the cookie. SignInFailed otherwise."""
    if settings.users_file is None:
        raise SignInFailed("local accounts are not configured on this server (COMFYBATCH_USERS_FILE)")
    name = (name or "").strip()[:100]
    until = sessions.locked_until(store, name)
    if until is not None:
        raise SignInFailed(_locked(name, until), until - time.time())
    account = users.load_accounts(settings.users_file).get(name)
    if not users.verify_password(account.password_hash if account else None, password or ""):
        until = sessions.record_failure(store, name, settings.lockout_after, settings.lockout_seconds)
        if until is not None:
            raise SignInFailed("wrong user name or password; " + _locked(name, until), until - time.time())
        raise SignInFailed("wrong user name or password")
    assert account is not None
    sessions.clear_failures(store, name)
    return sessions.create_session(store, Actor(account.name, account.role), settings.session_hours * 3600)


def _locked(name: str, until: float) -> str:
    return (f"too many failed sign-ins for {name!r}: try again in {math.ceil(until - time.time())} s "
            "(COMFYBATCH_LOCKOUT_SECONDS)")


def sign_out(store: Store, session_id: str | None) -> None:
    sessions.end_session(store, session_id)


def session_actor(settings: Settings, store: Store, session_id: str | None) -> Actor | None:
    """The person of a live local session, in the role the users file gives them now: removing someone from
    the file (or changing their role) takes effect on their open sessions at once."""
    actor = sessions.session_actor(store, session_id)
    if actor is None or settings.users_file is None:
        return None
    account = users.load_accounts(settings.users_file).get(actor.name)
    return Actor(account.name, account.role) if account else None


def actor_for(settings: Settings, store: Store, token: str | None, session_id: str | None) -> Actor | None:
    """The person behind a request's bearer token or session cookie, or None."""
    if token:
        candidate = token.encode("utf-8", "surrogateescape")
        matched = False
        for configured in settings.api_tokens:  # every one compared, in constant time
            matched |= hmac.compare_digest(candidate, configured.encode("utf-8"))
        if matched:
            return API_ADMIN
        actor = sessions.token_actor(store, token)
        if actor is not None:
            return actor
    return session_actor(settings, store, session_id)


def page_actor(settings: Settings, store: Store, session_id: str | None,
               oidc_user: dict[str, Any] | None) -> Actor | None:
    """Who is looking at a page: LOCAL without sign-in, else the OIDC user or the local session, else None."""
    if not settings.sign_in:
        return LOCAL
    if settings.oidc and oidc_user and oidc_user.get("is_logged_in"):
        return oidc_actor(settings, oidc_user)
    return session_actor(settings, store, session_id)


def oidc_actor(settings: Settings, user: dict[str, Any]) -> Actor:
    """An identity provider's user: named by e-mail (else subject); admin when listed in COMFYBATCH_ADMINS."""
    name = str(user.get("email") or user.get("sub") or "unknown")[:100]
    return Actor(name, ADMIN if name in settings.admins else users.MEMBER)


# -- API tokens per user ------------------------------------------------------------------------------
def create_token(store: Store, actor: Actor, label: str = "") -> tuple[int, str]:
    """A new API token for `actor`, in their role; the token is returned once and stored only as a hash."""
    label = (label or "").strip()
    if len(label) > MAX_LABEL:
        raise InputError("the token's label is too long", [Problem(f"at most {MAX_LABEL} characters",
                                                                   field="label", code="too_large")])
    if actor.name in (API_ADMIN.name,):
        raise Forbidden("a token made from COMFYBATCH_API_TOKENS cannot make tokens: sign in as a person")
    return sessions.create_token(store, actor, label)


def tokens(store: Store, actor: Actor) -> list[dict[str, Any]]:
    """The tokens `actor` may see: an admin every token, a member their own."""
    return sessions.list_tokens(store, None if actor.is_admin else actor.name)


def revoke_token(store: Store, actor: Actor, token_id: int) -> None:
    """Revoke a token at once (its owner or an admin). NotFound for an unknown id."""
    token = sessions.get_token(store, token_id)
    if token is None:
        raise NotFound(f"API token {token_id} does not exist")
    if token["user"] != actor.name and not actor.is_admin:
        raise Forbidden(f"{actor.name} may not revoke token {token_id}: it belongs to {token['user']}")
    sessions.revoke_token(store, token_id, actor.name)
