"""`streamlit run app.py` brings up everything in one process: the pages (ui_main.py), the image file routes,
and the scheduler, which the lifespan starts once per server process and stops on shutdown. If another
scheduler already holds the database's lease, this one waits in standby and takes over if that one dies.

HTTP routes: `routes` below. Each module named in ROUTE_MODULES that exists is loaded: its `routes` are served
and its `bind(settings, store)` is called by the lifespan (as core.webfiles' FileServer is). A module that fails
to load is logged and left out, so the pages and the scheduler still come up.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import streamlit as st

from core.config import Settings
from core.errors import ConfigError
from core.logs import setup_logging
from core.scheduler import Scheduler
from core.store import Store
from core.webfiles import FileServer

log = logging.getLogger("core.app")

ROUTE_MODULES = ("core.api",)

files = FileServer()
routes: list[Any] = [*files.routes]
bound: list[Any] = [files]  # things whose bind(settings, store) the lifespan calls
for _name in ROUTE_MODULES:
    if importlib.util.find_spec(_name) is None:
        continue
    try:
        _module = importlib.import_module(_name)
    except Exception:
        log.exception("%s could not be loaded; serving without its routes", _name)
        continue
    routes.extend(_module.routes)
    bound.append(_module)


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
    setup_logging(settings.log_dir)
    store = Store(settings.db_path)
    scheduler = Scheduler(settings, store)
    scheduler.start()
    for part in bound:
        if hasattr(part, "bind"):
            part.bind(settings, store)
    log.info("scheduler %s started (database %s, servers: %s)", scheduler.owner, settings.db_path,
             ", ".join(settings.comfyui_urls) or "none configured")
    try:
        yield {"settings": settings, "scheduler": scheduler}
    finally:
        for part in bound:
            if hasattr(part, "unbind"):
                part.unbind()
        await asyncio.to_thread(scheduler.stop)
        store.close()
        log.info("scheduler %s stopped", scheduler.owner)


def _log_script_error(exc: Exception) -> bool:
    log.error("uncaught page error", exc_info=exc)
    return False


app = st.App("ui_main.py", routes=routes, lifespan=lifespan, on_script_error=_log_script_error)
