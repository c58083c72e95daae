"""Overview (the landing page): the active batches as cards, charts of the last hour's output, run times and
failures, and each server at a glance. Live: one fragment redraws every few seconds while work is active
(slower when idle), so the page never reloads as a whole. Every number comes from bounded SQL aggregates
(core.overview), so the page costs the same with 100 or 100,000 tasks."""

from __future__ import annotations

from typing import Any

import streamlit as st

import ui
import ui_format
from core import overview, queries, service, visibility
from core.store import Store

BUSY_REFRESH = 3.0
IDLE_REFRESH = 15.0
CHART_TTL = 10.0  # the charts cover an hour or a day: their data is shared by all sessions for this long
STRIP = 8  # thumbnails per card


def pause(batch_id: int, paused: bool) -> Any:
    def act(ctx: ui.Context) -> tuple[str, str]:
        (service.pause_batch if paused else service.resume_batch)(ctx.store, batch_id, actor=ctx.actor)
        return ("success", f"Batch {batch_id} {'paused: what is on a server finishes' if paused else 'resumed'}.")
    return ui.safe_callback("overview", act)


def cancel(batch_id: int) -> Any:
    def act(ctx: ui.Context) -> tuple[str, str]:
        done = service.cancel_batch(ctx.store, batch_id, actor=ctx.actor)
        return ("success", f"Batch {batch_id}: {len(done['cancelled'])} task(s) cancelled, "
                f"{len(done['cancelling'])} being stopped on their server.")
    return ui.safe_callback("overview", act)


def batch_card(ctx: ui.Context, summary: dict[str, Any]) -> None:
    counts = summary["counts"]
    bid = summary["id"]
    with st.container(border=True, key=f"ov_card_{bid}"):
        head, buttons = st.columns([3, 2], vertical_alignment="center")
        who = " · ".join(x for x in (summary.get("submitted_by"), summary.get("source")) if x) or "unknown"
        head.markdown(f"**#{bid} {ui.md_escape(summary['name'])}**  \n"
                      f":gray[{ui.md_escape(who)} · workflow "
                      f"{ui.md_escape(summary['workflow'])}]")
        with buttons.container(horizontal=True):
            if not ui.may_act_on(ctx, summary):
                pass  # someone else's batch: the engine would refuse a member's pause or cancel
            elif summary["paused"]:
                st.button("Resume", key=f"ov_resume_{bid}", on_click=pause(bid, False), icon=":material/play_arrow:")
            else:
                st.button("Pause", key=f"ov_pause_{bid}", on_click=pause(bid, True), icon=":material/pause:")
            if ui.may_act_on(ctx, summary):
                st.button("Cancel", key=f"ov_cancel_{bid}", on_click=cancel(bid), icon=":material/cancel:")
        running = counts.get("running", 0) + counts.get("submitted", 0)
        st.progress(summary["progress"], text=f"{summary['done']}/{summary['total']} done")
        eta = summary["eta_seconds"]
        st.text(f"Batch {bid}: {counts.get('succeeded', 0)} succeeded · {counts.get('failed', 0)} failed · "
                f"{running} running · {counts.get('queued', 0)} queued · ETA "
                + ("paused" if summary["paused"] else ui_format.format_duration(eta)))
        images = overview.latest_images(ctx.store, bid, STRIP)
        if images:
            cols = st.columns(STRIP)
            for col, img in zip(cols, images, strict=False):
                with col:
                    ui.image_tile(ctx, img["id"], height=72)


# Plain Vega-Lite specs through st.vega_lite_chart: Altair's schema validation cost about 0.4 s per chart
# per redraw here, more than all the page's queries together.
def stacked_bars(data: list[dict[str, Any]], time_field: str, value: str, title: str, stack: str) -> dict[str, Any]:
    """Bars over time (epoch seconds), one colour per `stack` value (a server, a failure cause)."""
    return {"data": {"values": [{**row, time_field: row[time_field] * 1000} for row in data]}, "mark": "bar",
            "encoding": {"x": {"field": time_field, "type": "temporal", "title": None},
                         "y": {"aggregate": "sum", "field": value, "type": "quantitative", "title": title,
                               "stack": "zero"},
                         "color": {"field": stack, "type": "nominal", "legend": {"orient": "bottom"}},
                         "tooltip": [{"field": time_field, "type": "temporal"}, {"field": stack, "type": "nominal"},
                                     {"field": value, "type": "quantitative"}]}}


def run_times(data: list[dict[str, Any]]) -> dict[str, Any]:
    return {"data": {"values": data}, "mark": {"type": "boxplot", "extent": "min-max"},
            "encoding": {"x": {"field": "seconds", "type": "quantitative", "title": "seconds"},
                         "y": {"field": "workflow", "type": "nominal", "title": None},
                         "color": {"field": "workflow", "type": "nominal", "legend": None}}}


@st.cache_data(ttl=CHART_TTL, show_spinner=False, max_entries=4)
def chart_data(db_path: str, _store: Store) -> tuple[list[dict[str, Any]], ...]:
    return overview.images_per_minute(_store), overview.durations(_store), overview.failures(_store)


def charts(ctx: ui.Context) -> None:
    minutes, durations, failures = chart_data(str(ctx.settings.db_path), ctx.store)
    panels = [("Images per minute, last hour", "No images in the last hour.", minutes,
               lambda: stacked_bars(minutes, "minute", "images", "images", "server")),
              ("Run time by workflow (latest tasks)", "No finished tasks in the last day.", durations,
               lambda: run_times(durations)),
              ("Failures by cause, last day", "No failures in the last day.", failures,
               lambda: stacked_bars(failures, "at", "failures", "failed tasks", "cause"))]
    for column, (title, empty, data, spec) in zip(st.columns(len(panels)), panels, strict=True):
        with column:
            st.markdown(f"**{title}**")
            if not data:
                st.caption(empty)
            else:
                st.vega_lite_chart(spec(), width="stretch")

def servers_at_a_glance(ctx: ui.Context) -> None:
    st.markdown("**Servers**")
    work = overview.current_work(ctx.store)
    own = visibility.visible_batch_ids(ctx.store, visibility.person_for(ctx.settings, ctx.actor))
    servers = ui.health(ctx)
    if not servers:
        st.caption("No server configured: add one on the Servers page.")
    cols = st.columns(max(1, min(4, len(servers))))
    for i, s in enumerate(servers):
        with cols[i % len(cols)], st.container(border=True):
            state = ("disabled" if not s["enabled"] else "down" if not s.get("up") else s.get("state", "active"))
            mark = {"active": ":green[:material/check_circle:]", "down": ":red[:material/error:]"}.get(
                state, ":orange[:material/pause_circle:]")
            queue = (s.get("queue_running") or 0) + (s.get("queue_pending") or 0)
            st.markdown(f"{mark} `{s['url']}`")
            st.text(f"{state} · {queue} in its queue")
            for task in [t for t in work.get(s["url"], []) if own is None or t["batch_id"] in own][:2]:
                st.progress(queries.task_progress(task),
                            text=f"task {task['id']} (batch {task['batch_id']}) {task['status']}")


ctx = ui.setup("Overview")


@st.fragment(run_every=BUSY_REFRESH if queries.has_unfinished_work(ctx.store) else IDLE_REFRESH)
def live() -> None:
    ctx = ui.context()
    ui.show_flash("overview")  # inside the fragment: its buttons rerun only the fragment, and say what they did
    with ui.guard():
        busy = queries.has_unfinished_work(ctx.store)
        ids = overview.active_batch_ids(ctx.store, person=visibility.person_for(ctx.settings, ctx.actor))
        st.subheader("Active batches")
        if not ids:
            local = service.local_backends(ctx.settings)
            if local["mode"] == "demo":  # the first run: say what the demo's images are, and where to make one
                st.info(local["note"], icon=":material/science:")
            st.info("Nothing is running. Start a batch on the Generate or Batch page.")
            st.page_link(ui.page_path("generate"), label="Make an image on the Generate page",
                         icon=":material/add_photo_alternate:")
        cols = st.columns(2)
        for i, bid in enumerate(ids):
            with cols[i % 2]:
                batch_card(ctx, service.batch_summary(ctx.store, bid))
        servers_at_a_glance(ctx)
        charts(ctx)
        was_busy = st.session_state.get("overview_busy")
        st.session_state["overview_busy"] = busy
        if was_busy is not None and was_busy != busy:
            st.rerun()  # switch the refresh interval


live()
