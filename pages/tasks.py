"""Tasks: a live, filtered, paged table of tasks with cancel / retry / priority, per-batch progress, and the
queue controls: pause or resume the whole queue or the picked batch, and run the picked batch next."""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

import ui
import ui_format
from core import acting, queries, service, visibility
from core.models import ALL_STATUSES

BUSY_REFRESH = 2.0
IDLE_REFRESH = 15.0
PAGE_SIZES = (25, 50, 100, 200)
SELECTED = "tasks_selected_ids"
SHOWN = "tasks_shown_ids"
POSITIONS = "tasks_selected_positions"


def table_key() -> str:
    return f"tasks_table_{st.session_state.get('tasks_table_generation', 0)}"


def clear_selection() -> None:
    """Forget the selection; a new table key also clears the highlighted rows in the browser."""
    st.session_state[SELECTED] = []
    st.session_state[POSITIONS] = []
    st.session_state["tasks_table_generation"] = st.session_state.get("tasks_table_generation", 0) + 1


def selected_ids() -> list[int]:
    """Map newly selected row positions to task ids at once, against the rows the user was looking at (the
    ones drawn last time), because rows shift as work lands."""
    state = st.session_state.get(table_key())
    positions = list(state["selection"]["rows"]) if state else []
    if positions != st.session_state.get(POSITIONS, []):
        shown = st.session_state.get(SHOWN, [])
        st.session_state[SELECTED] = [shown[r] for r in positions if r < len(shown)]
        st.session_state[POSITIONS] = positions
    return st.session_state.get(SELECTED, [])


def cancel(ctx: ui.Context) -> tuple[str, str]:
    ids = st.session_state.get(SELECTED, [])
    done = service.cancel(ctx.store, ids, actor=ctx.actor)
    skipped = len(ids) - len(done["cancelled"]) - len(done["cancelling"])
    return ("success", f"Cancelled {len(done['cancelled'])} queued task(s); {len(done['cancelling'])} on a server "
            f"are being stopped" + (f"; {skipped} already finished were left alone." if skipped else "."))


def retry(ctx: ui.Context) -> tuple[str, str]:
    ids = st.session_state.get(SELECTED, [])
    again = service.retry(ctx.store, ids, actor=ctx.actor)
    skipped = len(ids) - len(again)
    return ("success", f"Put {len(again)} task(s) back in the queue"
            + (f"; {skipped} not failed or cancelled were left alone." if skipped else "."))


def set_priority(ctx: ui.Context) -> tuple[str, str]:
    ids = st.session_state.get(SELECTED, [])
    value = int(st.session_state.get("tasks_priority", 0))
    n = service.set_priority(ctx.store, ids, value, actor=ctx.actor)
    return ("success", f"Priority of {n} task(s) set to {value}; queued tasks with a higher priority run first.")


def set_queue_paused(ctx: ui.Context, paused: bool) -> tuple[str, str]:
    (service.pause_queue if paused else service.resume_queue)(ctx.store, actor=ctx.actor)
    return ("success", "Queue paused: no new task starts; tasks already on a server finish." if paused
            else "Queue resumed.")


def set_batch_paused(ctx: ui.Context, batch_id: int, paused: bool) -> tuple[str, str]:
    (service.pause_batch if paused else service.resume_batch)(ctx.store, batch_id, actor=ctx.actor)
    return ("success", f"Batch {batch_id} paused: none of its tasks start; those on a server finish." if paused
            else f"Batch {batch_id} resumed.")


def run_next(ctx: ui.Context, batch_id: int) -> tuple[str, str]:
    batch = service.run_batch_next(ctx.store, batch_id, actor=ctx.actor)
    return ("success", f"Batch {batch_id} runs next: ahead of every other batch at priority {batch['priority']}.")


def queue_controls(ctx: ui.Context, batch_id: int | None) -> None:
    """Pause/resume the queue; with a batch picked, pause/resume it and run it next."""
    row = st.container(horizontal=True, vertical_alignment="center")
    if not service.queue_state(ctx.store)["paused"]:
        if ctx.actor.is_admin:  # the whole queue is an admin's to pause
            row.button("Pause queue", on_click=ui.safe_callback("tasks", lambda c: set_queue_paused(c, True)))
    else:
        if ctx.actor.is_admin:
            row.button("Resume queue", on_click=ui.safe_callback("tasks", lambda c: set_queue_paused(c, False)))
        row.caption("The queue is paused: no new task starts.")
    if batch_id is None:
        return
    summary = service.batch_summary(ctx.store, batch_id)
    if not ui.may_act_on(ctx, summary):
        return  # someone else's batch: a member's pause or run-next would be refused
    if summary["paused"]:
        row.button(f"Resume batch {batch_id}",
                   on_click=ui.safe_callback("tasks", lambda c: set_batch_paused(c, batch_id, False)))
    else:
        row.button(f"Pause batch {batch_id}",
                   on_click=ui.safe_callback("tasks", lambda c: set_batch_paused(c, batch_id, True)))
    row.button(f"Run batch {batch_id} next", on_click=ui.safe_callback("tasks", lambda c: run_next(c, batch_id)))


ctx = ui.setup("Tasks")
with ui.guard():
    c1, c2, c3, c4 = st.columns([2, 2, 1, 2])
    with c1:
        batch_id = ui.batch_picker(ctx, "tasks_batch", on_change=clear_selection)
    with c2:
        statuses = st.multiselect("Status", list(ALL_STATUSES), key="tasks_status",
                                  on_change=clear_selection)
    with c3:
        workflow = st.selectbox("Workflow", [None, *queries.task_workflows(ctx.store)], key="tasks_workflow",
                                format_func=lambda w: "All" if w is None else w, on_change=clear_selection)
    with c4:
        text = st.text_input("Prompt contains", key="tasks_text", on_change=clear_selection)
    person = ui.person_picker(ctx, "tasks_person", on_change=clear_selection)
    queue_controls(ctx, batch_id)
    flt = queries.TaskFilter(batch_id, tuple(statuses), workflow, text, person)
    busy_at_draw = queries.has_unfinished_work(ctx.store)

    @st.fragment(run_every=BUSY_REFRESH if busy_at_draw else IDLE_REFRESH)
    def live() -> None:
        ctx = ui.context()
        with ui.guard():
            if queries.has_unfinished_work(ctx.store) != busy_at_draw:
                st.rerun()  # switch between the busy and the idle refresh interval
            for bid in ([batch_id] if batch_id is not None else queries.summary_batch_ids(
                    ctx.store, person=visibility.person_for(ctx.settings, ctx.actor))):
                ui.batch_progress(service.batch_summary(ctx.store, bid))
            ui.show_flash("tasks")
            selected = selected_ids()
            size = st.session_state.get("tasks_page_size", PAGE_SIZES[1])
            if selected:
                # Keep the same rows in the same places while some are selected, so positions stay true.
                rows = queries.tasks_by_ids(ctx.store, st.session_state.get(SHOWN, []))
                total = queries.count_tasks(ctx.store, flt)
                page = None
            else:
                total = queries.count_tasks(ctx.store, flt)
                pages = max(1, math.ceil(total / size))
                page = st.session_state.get("tasks_page", 1)
                if page > pages:  # the filter shrank the result: go to its last page
                    page = st.session_state["tasks_page"] = pages
                rows = queries.page_tasks(ctx.store, flt, size, (page - 1) * size)
            st.session_state[SHOWN] = [r["id"] for r in rows]
            frame = pd.DataFrame([ui_format.task_row(r) for r in rows],
                                 columns=["id", "batch", "row", "status", "progress", "server", "attempts", "priority",
                                          "prompt", "error", "created", "wait_s", "run_s"])
            frame = frame.astype({"row": "Int64", "wait_s": "Float64", "run_s": "Float64"})
            st.dataframe(
                frame, key=table_key(), on_select="rerun", selection_mode="multi-row", hide_index=True,
                column_config={
                    "id": st.column_config.NumberColumn("Task", format="%d", width="small"),
                    "batch": st.column_config.NumberColumn("Batch", format="%d", width="small"),
                    "row": st.column_config.NumberColumn("Row", format="%d", width="small"),
                    "status": st.column_config.TextColumn("Status", width="small"),
                    "server": st.column_config.TextColumn("Server"),
                    "created": st.column_config.TextColumn("Created"),
                    "progress": st.column_config.ProgressColumn("Progress", min_value=0.0, max_value=1.0,
                                                                format="percent"),
                    "attempts": st.column_config.NumberColumn("Attempts", width="small"),
                    "priority": st.column_config.NumberColumn("Priority", width="small"),
                    "prompt": st.column_config.TextColumn("Prompt", width="medium"),
                    "error": st.column_config.TextColumn("Error", width="medium"),
                    "wait_s": st.column_config.NumberColumn("Waited (s)", format="%.1f"),
                    "run_s": st.column_config.NumberColumn("Ran (s)", format="%.1f"),
                })
            first = 0 if not rows else ((page - 1) * size + 1 if page else 1)
            st.text(f"Showing {first}-{first + len(rows) - 1 if rows else 0} of {total} task(s)"
                    + (" (frozen while tasks are selected)" if selected else ""))
            if page is not None:
                st.pagination(max(1, math.ceil(total / size)), key="tasks_page", on_change=clear_selection)
            if selected:
                st.text(f"Selected: {len(selected)} task(s): " + ", ".join(map(str, selected[:20]))
                        + (" ..." if len(selected) > 20 else ""))
            others = acting.others_batches(ctx.store, selected, ctx.actor)
            if others:
                st.caption("The selection holds tasks of batches someone else submitted ("
                           + ", ".join(map(str, others[:10])) + "): a member acts only on their own batches.")
            blocked = not selected or bool(others)
            actions = st.container(horizontal=True, vertical_alignment="bottom")
            actions.button("Cancel selected", on_click=ui.safe_callback("tasks", cancel), disabled=blocked)
            actions.button("Retry selected", on_click=ui.safe_callback("tasks", retry), disabled=blocked)
            actions.number_input("Priority", value=0, step=1, key="tasks_priority", width=160)
            actions.button("Set priority", on_click=ui.safe_callback("tasks", set_priority), disabled=blocked)
            actions.button("Clear selection", on_click=clear_selection, disabled=not selected)

    live()
    st.selectbox("Rows per page", PAGE_SIZES, index=1, key="tasks_page_size", on_change=clear_selection)
