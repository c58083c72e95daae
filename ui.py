"""Streamlit plumbing shared by every page: with the page scripts (pages/), the only code that imports streamlit.
Pages call core.service for every action and core.queries for reads; they never import the api package.

Owns: the page list, the settings (read each run, so a bad setting is reported on the page), one Store per
script-run thread (Streamlit runs every rerun in a fresh thread, so the connections of finished runs are
closed here instead of piling up), the sidebar, the "ComfyUI unreachable" banner, the error guard and the
image grid. It never starts a scheduler: app.py's lifespan does, once per server process, which is also the
seam that keeps AppTest runs scheduler-free.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import streamlit as st

import ui_format
from core import access, accounts, queries, service, visibility
from core.config import Settings
from core.errors import ComfyBatchError, ConfigError, Forbidden, InputError
from core.scheduler import LEASE
from core.store import Store
from core.users import LOCAL, Actor
from core.users import may_act_on as owns

log = logging.getLogger("core.ui")

PAGES = {
    "overview": ("pages/overview.py", "Overview", ":material/dashboard:"),
    "generate": ("pages/generate.py", "Generate", ":material/brush:"),
    "batch": ("pages/batch.py", "Batch", ":material/table_view:"),
    "tasks": ("pages/tasks.py", "Tasks", ":material/list_alt:"),
    "gallery": ("pages/gallery.py", "Gallery", ":material/photo_library:"),
    "grid": ("pages/grid.py", "Grid", ":material/grid_on:"),
    "servers": ("pages/servers.py", "Servers", ":material/dns:"),
    "account": ("pages/account.py", "Account", ":material/key:"),
}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
HEALTH_TTL = 10.0  # seconds a server health probe is reused across sessions
SIDEBAR_REFRESH = 10.0
URL_HELP = ("Set COMFYUI_URL before starting, e.g. `COMFYUI_URL=http://127.0.0.1:8188 streamlit run app.py` "
            "(comma-separated for several servers), or add a server on the Servers page.")


@dataclass(frozen=True)
class Context:
    settings: Settings
    store: Store
    actor: Actor = LOCAL  # who is looking: LOCAL without sign-in, else the signed-in person


def page_config() -> None:
    """The page settings every page gets (ui_main.py and, for a deep link, setup())."""
    st.set_page_config(page_title="ComfyBatch", page_icon=":material/burst_mode:", layout="wide")


def navigation_pages() -> list[Any]:
    return [st.Page(path, title=title, icon=icon, url_path=key, default=key == "overview")
            for key, (path, title, icon) in PAGES.items()]


def page_path(key: str) -> str:
    return PAGES[key][0]


# -- settings and the database ------------------------------------------------------------------------
def context() -> Context:
    """Settings, this thread's Store and who is acting. Stops the page with a plain message if a setting is
    malformed; raises Forbidden when sign-in is configured and nobody is signed in (setup() shows the sign-in
    first, so this is met only by a callback after a sign-out elsewhere)."""
    settings = _settings()
    store = store_for(settings)
    actor = current_actor(settings, store)
    if actor is None:
        raise Forbidden("you are not signed in (or your session ended): sign in again")
    return Context(settings, store, actor)


def _settings() -> Settings:
    try:
        return Settings.load()
    except ConfigError as exc:
        st.error(f"ComfyBatch cannot start: {exc}")
        st.stop()
        raise  # not reached: st.stop() ends the run


def current_actor(settings: Settings, store: Store) -> Actor | None:
    """LOCAL without sign-in; else the OIDC user (st.user) or the local session (its cookie), else None."""
    if not settings.sign_in:
        return LOCAL
    oidc_user = st.user.to_dict() if settings.oidc else None
    return accounts.page_actor(settings, store, st.context.cookies.get(accounts.SESSION_COOKIE), oidc_user)


_stores: dict[tuple[int, str], tuple[threading.Thread, Store]] = {}
_stores_lock = threading.Lock()


def store_for(settings: Settings) -> Store:
    me = threading.current_thread()
    key = (id(me), str(settings.db_path))
    with _stores_lock:
        for k, (thread, store) in list(_stores.items()):
            if not thread.is_alive():
                store.close()
                del _stores[k]
        entry = _stores.get(key)
        if entry is None or entry[0] is not me:
            entry = (me, Store(settings.db_path))
            _stores[key] = entry
        return entry[1]


def close_stores() -> None:
    """Close every Store this module opened (tests call it between AppTests)."""
    with _stores_lock:
        for _, store in _stores.values():
            store.close()
        _stores.clear()


# -- page frame ---------------------------------------------------------------------------------------
def setup(title: str) -> Context:
    """Call first on every page: a deep link can run a page without the main script, so shared setup
    (the sign-in gate, sidebar, server banner) lives here rather than in ui_main.py."""
    page_config()
    settings = _settings()
    if current_actor(settings, store_for(settings)) is None:
        sign_in_screen(settings)
        st.stop()
    ctx = context()
    st.title(title)
    with st.sidebar:
        who_is_here(ctx)
        sidebar_status()
    server_banner(ctx)
    return ctx


# -- sign-in ------------------------------------------------------------------------------------------
def sign_in_screen(settings: Settings) -> None:
    """What a visitor who is not signed in sees instead of any page: the ways to sign in, nothing else."""
    st.title("ComfyBatch")
    st.subheader("Sign in")
    if settings.oidc:
        st.button("Sign in with your identity provider", on_click=st.login, type="primary")
    if settings.users_file is not None:
        st.markdown('<a href="/signin" target="_self">Sign in with a ComfyBatch account</a>', unsafe_allow_html=True)


def who_is_here(ctx: Context) -> None:
    """The sidebar's first lines: who is signed in (and a way out), or that nobody needs to be."""
    if not ctx.settings.sign_in:
        address = str(st.get_option("server.address") or "")
        if address not in LOOPBACK:
            st.caption(f":orange[:material/warning:] No sign-in is configured and the app listens on "
                       f"{address or 'every network interface'}: anyone who can reach this port can use it. Set "
                       "COMFYBATCH_USERS_FILE or `[auth]` in .streamlit/secrets.toml.")
        return
    st.markdown(f"Signed in as **{md_escape(ctx.actor.name)}** ({ctx.actor.role})")
    if ctx.settings.oidc and st.user.is_logged_in:
        st.button("Sign out", on_click=st.logout, key="sign_out")
    else:
        st.markdown('<a href="/signout" target="_self">Sign out</a>', unsafe_allow_html=True)


def person_picker(ctx: Context, key: str, **kw: Any) -> str | None:
    """Whose work to show: everyone (None) or one person; a member starts on their own work ("mine"), and with
    COMFYBATCH_PRIVATE_BATCHES is offered only that (core.visibility limits the query either way)."""
    own = visibility.own_only(ctx.settings, ctx.actor)
    people = [] if own is not None else queries.people(ctx.store)
    if own is None and not ctx.settings.sign_in and len(people) < 2:
        return None
    choices: list[str | None] = [own] if own is not None else [None, *dict.fromkeys([ctx.actor.name, *people])]
    if key not in st.session_state or st.session_state[key] not in choices:
        st.session_state[key] = None if ctx.actor.is_admin else ctx.actor.name
    chosen = st.selectbox("Person", choices, key=key, **kw, format_func=lambda p: (
        "Everyone" if p is None else f"{p} (mine)" if p == ctx.actor.name else p))
    return visibility.person_for(ctx.settings, ctx.actor, chosen)


def may_act_on(ctx: Context, batch: dict[str, Any]) -> bool:
    """Whether to offer the actor buttons acting on this batch (the engine refuses a member's on another's)."""
    return owns(ctx.actor, batch)


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Turn errors into plain messages: a ComfyBatchError is shown as is (with its problems listed), anything
    else is logged with its traceback and shown as one sentence. Never a traceback on the page."""
    try:
        yield
    except ComfyBatchError as exc:
        show_error(exc)
    except Exception as exc:  # the page must stay usable; the log keeps the traceback
        log.exception("page error")
        st.error(f"Something went wrong: {type(exc).__name__}: {exc}. The details are in the log file.")


def show_error(exc: ComfyBatchError) -> None:
    if isinstance(exc, InputError) and exc.problems:
        st.error(md_escape(exc.summary) + "\n\n" + "\n".join(f"- {md_escape(str(p))}" for p in exc.problems))
    else:
        st.error(md_escape(str(exc)))


def flash(key: str, kind: str, message: str) -> None:
    """Keep a message for the next run (callbacks run before the page draws)."""
    st.session_state[f"flash_{key}"] = (kind, message)


def show_flash(key: str) -> None:
    kind, message = st.session_state.pop(f"flash_{key}", (None, None))
    if kind:
        getattr(st, kind)(message)


def safe_callback(key: str, action: Callable[[Context], tuple[str, str] | None]) -> Callable[[], None]:
    """Wrap a widget callback: run `action` with a fresh context, keep its (kind, message) or error as a flash."""
    def run() -> None:
        try:
            outcome = action(context())
        except ComfyBatchError as exc:
            outcome = ("error", str(exc))
        except Exception as exc:
            log.exception("callback error")
            outcome = ("error", f"Something went wrong: {type(exc).__name__}: {exc}. The details are in the log.")
        if outcome:
            flash(key, *outcome)
    return run


# -- servers: sidebar and banner ------------------------------------------------------------------
@st.cache_data(ttl=HEALTH_TTL, show_spinner=False)
def _health(db_path: str, urls: tuple[str, ...], _settings: Settings) -> list[dict[str, Any]]:
    store = Store(_settings.db_path)
    try:
        return service.server_health(_settings, store, timeout=2.0)
    finally:
        store.close()


def health(ctx: Context) -> list[dict[str, Any]]:
    """Health of every known server, probed at most once per HEALTH_TTL for all sessions."""
    return _health(str(ctx.settings.db_path), ctx.settings.comfyui_urls, ctx.settings)


def refresh_health() -> None:
    _health.clear()
    _storage.clear()


@st.cache_data(ttl=HEALTH_TTL, show_spinner=False)
def _storage(db_path: str, bucket: str, _settings: Settings) -> dict[str, Any]:
    store = Store(_settings.db_path)
    try:
        return service.storage_status(_settings, store)
    finally:
        store.close()


def storage_status(ctx: Context) -> dict[str, Any]:
    """Object storage health and upload counts, asked of the store at most once per HEALTH_TTL."""
    return _storage(str(ctx.settings.db_path), ctx.settings.s3_bucket, ctx.settings)


def short_reason(error: str | None) -> str:
    text = error or ""
    if "refused" in text.lower():
        return "connection refused"
    if "timeout" in text.lower() or "timed out" in text.lower():
        return "no answer before the timeout"
    if "Name or service not known" in text or "getaddrinfo" in text or "NameResolution" in text:
        return "unknown host name"
    m = re.search(r"HTTP \d{3}", text)
    return m.group(0) if m else text[:160]


@st.fragment(run_every=SIDEBAR_REFRESH)
def sidebar_status() -> None:
    ctx = context()
    try:
        servers = health(ctx)
        counts = ctx.store.counts()
        lease = ctx.store.lease_holder(LEASE)
    except ComfyBatchError as exc:
        show_error(exc)
        return
    if service.local_backends(ctx.settings)["mode"] == "demo":
        st.caption(":orange[:material/science:] **Demo ComfyUI** on CPU: a random-weight checkpoint, so images "
                   "are noise. Set COMFYUI_URL for real models.")
    enabled = [s for s in servers if s["enabled"]]
    up = sum(1 for s in enabled if s["up"])
    st.markdown(f"**Servers:** {up} up, {len(enabled) - up} down"
                + (f", {len(servers) - len(enabled)} disabled" if len(servers) > len(enabled) else ""))
    for s in servers:
        mark = (":gray[:material/pause_circle:]" if not s["enabled"] else
                ":green[:material/check_circle:]" if s["up"] else ":red[:material/error:]")
        detail = ("disabled" if not s["enabled"] else
                  f"{s.get('queue_running', 0) + s.get('queue_pending', 0)} in its queue" if s["up"]
                  else short_reason(s.get("error")))
        st.caption(f"{mark} {s['url']} - {detail}")
    running = counts.get("submitted", 0) + counts.get("running", 0)
    st.markdown(f"**Tasks:** {counts.get('queued', 0)} queued · {running} running · "
                f"{counts.get('failed', 0)} failed · {counts.get('succeeded', 0)} done")
    if lease is None:
        st.caption("Scheduler: none running, work waits in the queue. Start the app with `streamlit run app.py` "
                   "or run `python -m core worker`.")
    elif lease["pid"] == os.getpid():
        st.caption("Scheduler: running in this app.")
    else:
        st.caption(f"Scheduler: running in another process (pid {lease['pid']} on {lease['host']}).")


def server_banner(ctx: Context) -> None:
    """Say plainly when no ComfyUI can be reached, and that work is still accepted."""
    try:
        servers = health(ctx)
    except ComfyBatchError as exc:
        show_error(exc)
        return
    enabled = [s for s in servers if s["enabled"]]
    if not enabled:
        st.warning("No ComfyUI server is configured. Work you submit is kept in the queue until one is. " + URL_HELP)
    elif not any(s["up"] for s in enabled):
        where = "; ".join(f"{s['url']} ({short_reason(s.get('error'))})" for s in enabled)
        st.warning(f"ComfyUI is unreachable: {where}. Work you submit is kept in the queue and starts when a "
                   "server is back. Check that ComfyUI is running at that address. " + URL_HELP)


# -- shared widgets -----------------------------------------------------------------------------------
def batch_label(batch: dict[str, Any]) -> str:
    return f"#{batch['id']} {batch['name']}"


def batch_picker(ctx: Context, key: str, label: str = "Batch", **kw: Any) -> int | None:
    batches = {b["id"]: b for b in visibility.list_batches(
        ctx.store, 500, visibility.person_for(ctx.settings, ctx.actor))}
    if st.session_state.get(key) not in (None, *batches):
        st.session_state[key] = None  # a batch of another database (or deleted)
    return st.selectbox(label, [None, *batches], key=key,
                        format_func=lambda b: "All batches" if b is None else batch_label(batches[b]), **kw)


def image_tile(ctx: Context, image_id: int, caption: str = "", height: int = 160, href: str | None = None,
               title: str = "") -> None:
    """A thumbnail the browser fetches from the /files/ routes: nothing held in the server's memory. The link
    opens `href` (the object store's URL of an image stored there) or the local full-size route; `title` is
    shown on hover (the full prompt)."""
    st.markdown(
        f'<a href="{html.escape(href or access.image_url(ctx.settings, image_id))}" target="_blank"'
        f' title="{html.escape(title)}">'
        f'<img src="{access.thumb_url(ctx.settings, image_id)}" alt="image {image_id}" data-image-id="{image_id}" '
        f'loading="lazy" style="width:100%;height:{height}px;object-fit:contain;border-radius:4px;'
        f'background:repeating-conic-gradient(#eee 0% 25%, #fff 0% 50%) 50% / 16px 16px"></a>'
        + (f'<div style="font-size:0.8em;color:gray">{html.escape(caption)}</div>' if caption else ""),
        unsafe_allow_html=True)


def download_link(url: str, label: str, key: str) -> None:
    """A link that downloads a file the app wrote to disk (core.exports), served by the /files/export route:
    the bytes never pass through the Streamlit session."""
    st.markdown(f'<a class="cb-download" data-key="{html.escape(key)}" href="{html.escape(url)}" download '
                f'style="display:inline-block;padding:0.4em 0.9em;border:1px solid #ccc;border-radius:0.5em;'
                f'text-decoration:none">{html.escape(label)}</a>', unsafe_allow_html=True)


def full_image(ctx: Context, image_id: int, href: str | None = None) -> None:
    url = access.image_url(ctx.settings, image_id)
    st.markdown(f'<a href="{html.escape(href or url)}" target="_blank"><img src="{url}" '
                f'alt="image {image_id}" style="max-width:100%;max-height:70vh"></a>', unsafe_allow_html=True)


def batch_progress(summary: dict[str, Any]) -> None:
    """A progress bar and the plain status line browser tests read (the dataframe is a canvas)."""
    line = ui_format.batch_status_line(summary)
    st.progress(summary["progress"], text=f"#{summary['id']} {summary['name']}")
    st.text(line)


def md_escape(text: str) -> str:
    """Keep engine and user text from being read as Markdown emphasis or HTML."""
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("_", "\\_").replace("<", "&lt;")
