"""The HTTP side of ComfyBatch, served by app.py inside `streamlit run app.py`: the JSON API under /api/v1
(api.app, api.endpoints, api.events, api.ws, api.openapi), the old tool's API under /compat (api.compat), the
pages' image routes under /files/ (api.files) and the local accounts' /signin and /signout (api.auth).
It parses requests, calls core.service and shapes JSON; no engine logic, no SQL. Never imports the pages.

    routes   every Starlette route, for st.App(routes=...)
    bind     called by the app's lifespan with the settings and the store of the running server
"""

from __future__ import annotations

from typing import Any

from starlette.routing import Mount

from api import compat
from api.app import Api
from api.auth import SignInRoutes
from api.calls import PREFIX
from api.files import FileServer
from core.config import Settings
from core.store import Store

api = Api()
old_api = compat.make()  # the old tool's API, for scripts written against it
files = FileServer()
sign_in = SignInRoutes()
routes: list[Any] = [Mount(PREFIX, app=api, name="api"), Mount(compat.PREFIX, app=old_api, name="compat"),
                     *files.routes, *sign_in.routes]


def bind(settings: Settings, store: Store) -> None:
    api.bind(settings, store)
    old_api.bind(settings, store)
    files.bind(settings, store)
    sign_in.bind(settings, store)


def unbind() -> None:
    api.unbind()
    old_api.unbind()
    files.unbind()
    sign_in.unbind()
