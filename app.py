"""`streamlit run app.py` brings up everything in one process: the pages (ui_main.py and pages/), the HTTP API
and image routes (the `api` package), and the scheduler, which the lifespan starts once per server process and
stops on shutdown. With other schedulers on the same database (`python -m core worker`), the servers are split
between them, one scheduler per server (leases per server, see core.scheduler.Scheduler).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

import api
from core import service
from core.config import Settings
from core.errors import ConfigError, InputError
from core.logs import setup_logging
from core.scheduler import Scheduler
from core.store import Store

log = logging.getLogger("core.app")

# The pages live in pages/ and are listed by st.navigation in ui_main.py. Streamlit also keeps its old
# "pages/ folder" mode, in which the first run on a fresh server runs a deep-linked page without ui_main.py (a
# different sidebar, no page config). Say once, before any session starts, that this app navigates itself.
PagesManager.uses_pages_directory = False


@asynccontextmanager
async def lifespan(app: st.App) -> AsyncIterator[dict[str, Any]]:
    """Start one scheduler for this server process; stop it (and release its lease) on shutdown."""
    try:
        settings = Settings.load()
    except ConfigError as exc:
        # The pages show the same message; start without a scheduler rather than not at all.
        logging.getLogger("core").error("not starting the scheduler: %s", exc)
        yield {}
        return
    setup_logging(settings.log_dir, level=logging.getLevelName(settings.log_level))
    store = Store(settings.db_path)
    try:  # local ComfyUI backends first, so the scheduler finds their servers registered
        backends = service.start_local_backends(settings, store)
    except InputError as exc:  # the Servers page shows the same problems
        log.error("not starting local backends: %s", exc)
        backends = None
    scheduler = Scheduler(settings, store)
    scheduler.start()
    api.bind(settings, store)
    log.info("scheduler %s started (database %s, servers: %s)", scheduler.owner, settings.db_path,
             ", ".join(settings.comfyui_urls) or "none configured")
    try:
        yield {"settings": settings, "scheduler": scheduler}
    finally:
        api.unbind()
        await asyncio.to_thread(scheduler.stop)
        if backends is not None:
            await asyncio.to_thread(backends.stop)
        store.close()
        log.info("scheduler %s stopped", scheduler.owner)


def _log_script_error(exc: Exception) -> bool:
    log.error("uncaught page error", exc_info=exc)
    return False


app = st.App("ui_main.py", routes=api.routes, lifespan=lifespan, on_script_error=_log_script_error)
