"""Servers: health of every ComfyUI server; add, drain, disable or remove one at run time; test a connection."""

from __future__ import annotations

import pandas as pd
import streamlit as st

import ui
import ui_format
from core import service
from core.errors import ComfyBatchError, InputError


def add(ctx: ui.Context) -> tuple[str, str]:
    url = service.add_server(ctx.store, st.session_state.get("servers_new_url", ""), actor=ctx.actor)
    ui.refresh_health()
    return ("success", f"Added {url}. The scheduler starts sending it work within a second.")


def set_enabled(ctx: ui.Context, url: str, enabled: bool) -> tuple[str, str]:
    service.set_server_enabled(ctx.store, url, enabled, actor=ctx.actor)
    ui.refresh_health()
    return ("success", f"{'Enabled' if enabled else 'Disabled'} {url}."
            + ("" if enabled else " Tasks already on it finish there; no new ones are sent."))


def set_draining(ctx: ui.Context, url: str, draining: bool) -> tuple[str, str]:
    state = (service.drain_server if draining else service.undrain_server)(ctx.store, url, actor=ctx.actor)
    ui.refresh_health()
    if not draining:
        return ("success", f"{url} takes work again.")
    return ("success", f"Draining {url}: it takes no new work" + (
        f" and finishes the {state['in_flight']} task(s) on it, then shows as drained." if state["in_flight"]
        else "; nothing is on it, so it is drained."))


def remove(ctx: ui.Context, url: str) -> tuple[str, str]:
    service.remove_server(ctx.store, url, actor=ctx.actor)
    ui.refresh_health()
    return ("success", f"Removed {url}.")


def health_table(servers: list[dict]) -> pd.DataFrame:
    rows = []
    for s in servers:
        total, free = s.get("vram_total"), s.get("vram_free")
        rows.append({
            "server": s["url"], "enabled": s["enabled"], "from": s["source"],
            "status": "up" if s["up"] else ("disabled" if not s["enabled"] else "down"),
            "work": s.get("state", ""), "model": ", ".join(s.get("models") or []),
            "running": s.get("queue_running"), "pending": s.get("queue_pending"), "device": s.get("device") or "",
            "VRAM free / total": f"{ui_format.format_bytes(free)} / {ui_format.format_bytes(total)}" if total else "",
            "ComfyUI": s.get("version") or "", "fed by": s.get("fed_by") or "no scheduler",
            "problem": ui.short_reason(s.get("error")) if s.get("error") else "",
        })
    return pd.DataFrame(rows, columns=["server", "enabled", "from", "status", "work", "model", "running", "pending",
                                       "device", "VRAM free / total", "ComfyUI", "fed by", "problem"])


def local_backends_section(ctx: ui.Context) -> None:
    """ComfyUI processes ComfyBatch runs itself (COMFYBATCH_BACKEND_*, or the demo): state, pid, restarts, log."""
    local = service.local_backends(ctx.settings)
    if local["mode"] == "off" and not local["backends"] and not local["note"]:
        return
    st.subheader("Local backends")
    if local["problems"]:
        ui.show_error(InputError(local["note"], local["problems"]))
    elif local["note"]:
        st.caption(local["note"])
    for b in local["backends"]:
        st.text(f"{b['name']} ({b['url']}): {b['state']}" + (f", pid {b['pid']}" if b.get("pid") else "")
                + f", {b['restarts']} restart(s)"
                + (f", last exit code {b['last_exit']}" if b.get("last_exit") is not None else "")
                + (f" - {b['message']}" if b.get("message") else ""))
        with st.expander(f"Log of {b['name']} (last lines; logs/backends/{b['name']}.log)"):
            st.code(b["log"] or "(empty)", language=None)


def storage_lines(status: dict) -> list[str]:
    """Object storage as plain lines: where, whether it answers, uploads by state, the latest error."""
    if not status["enabled"]:
        return ["Object storage is off: images stay on this machine only. Set COMFYBATCH_S3_BUCKET (with the "
                "endpoint, region and credentials) to upload them to S3, Alibaba OSS, Tencent COS, MinIO or R2."]
    state = ("reachable, bucket exists" if status["bucket_exists"] else
             "unreachable" if status["reachable"] is False else "reachable, bucket missing"
             if status["bucket_exists"] is False else "not usable")
    lines = [f"Object storage: bucket '{status['bucket']}' at {status['endpoint']} - {state}",
             f"Uploads: {status['stored']} stored, {status['pending']} pending, {status['failed']} failed"
             + (f"; {status['local_only']} image(s) made while storage was off (python -m core storage sync)"
                if status["local_only"] else "")]
    if status["error"]:
        lines.append(f"Problem: {status['error']}")
    elif status["last_error"]:
        lines.append(f"Last upload error: {status['last_error']}")
    return lines


ctx = ui.setup("Servers")
with ui.guard():
    ui.show_flash("servers")
    if st.button("Refresh", icon=":material/refresh:"):
        ui.refresh_health()
    servers = ui.health(ctx)
    if not servers:
        st.info("No ComfyUI server is configured yet. " + ui.URL_HELP)
    else:
        st.table(health_table(servers).set_index("server"))  # a few rows: a plain table reads best
        for s in servers:
            drain = f" ({s['state']})" if s.get("state") in ("draining", "drained") else ""
            if s.get("quarantined_until"):
                drain += (f" - quarantined until {ui_format.format_time(s['quarantined_until'])}: "
                          f"{s['quarantine_reason']}")
            st.text(f"{s['url']}: " + ("up" if s["up"] else "down") + ("" if s["enabled"] else " (disabled)") + drain
                    + (f", ComfyUI {s['version']}" if s.get("version") else ""))
        st.subheader("Change a server")
        by_url = {s["url"]: s for s in servers}
        url = st.selectbox("Server", list(by_url), key="servers_pick")
        server = by_url[url]
        row = st.container(horizontal=True, vertical_alignment="center")
        if server["enabled"]:
            row.button("Disable", on_click=ui.safe_callback("servers", lambda c: set_enabled(c, url, False)))
        else:
            row.button("Enable", on_click=ui.safe_callback("servers", lambda c: set_enabled(c, url, True)))
        if server.get("draining"):
            row.button("Undrain", on_click=ui.safe_callback("servers", lambda c: set_draining(c, url, False)))
        elif server["enabled"]:
            row.button("Drain", help="No new work; what is on the server finishes, then it shows as drained.",
                       on_click=ui.safe_callback("servers", lambda c: set_draining(c, url, True)))
        if server["source"] == "config":
            row.caption("This server comes from COMFYUI_URL and is added back at every start: disable it instead, "
                       "or change COMFYUI_URL.")
        elif server["source"] == "local":
            row.caption("A local backend ComfyBatch runs itself (see below): disable it, or change the "
                        "COMFYBATCH_BACKEND_* settings.")
        else:
            row.button("Remove", on_click=ui.safe_callback("servers", lambda c: remove(c, url)))

    local_backends_section(ctx)

    st.subheader("Object storage")
    storage = ui.storage_status(ctx)
    for line in storage_lines(storage):
        st.text(line)

    st.subheader("Add a server")
    st.text_input("URL", placeholder="http://192.168.1.20:8188", key="servers_new_url")
    buttons = st.container(horizontal=True)
    test = buttons.button("Test connection")
    buttons.button("Add server", type="primary", on_click=ui.safe_callback("servers", add))
    if test:
        target = service.server_url(st.session_state.get("servers_new_url", ""))  # ui.guard shows a bad URL
        try:
            stats = service.check_server(target, timeout=5.0)
        except ComfyBatchError as exc:
            st.error(f"Cannot reach {target}: {ui.short_reason(str(exc))}. Is ComfyUI running there, and reachable "
                     "from this machine (ComfyUI listens on 127.0.0.1 unless started with --listen)?")
        else:
            device = (stats.get("devices") or [{}])[0]
            free = ui_format.format_bytes(device.get("vram_free"))
            st.success(f"{target} answers: ComfyUI {stats.get('system', {}).get('comfyui_version', '?')}, "
                       f"device {device.get('name', '?')}, {free} VRAM free.")
