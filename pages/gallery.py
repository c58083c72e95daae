"""Gallery, made for choosing: a paged grid of thumbnails captioned with the prompt (full on hover), seed and
size; a larger view with previous/next (buttons or the arrow keys) and every parameter; a star to pick an image,
a filter by picked, and downloads of only the picked ones (ZIP and results CSV); filters by batch, workflow,
date, prompt text and parameter values. Downloads are written to disk and linked (core.exports), never built
in the session's memory."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import streamlit as st

import ui
import ui_format
from core import queries, service, visibility
from core.errors import ComfyBatchError

COLUMNS = 6
PAGE_SIZES = (24, 48, 96)
OPEN = "gallery_open"  # the image shown in the dialog, kept until it is dismissed
FILTER = "gallery_filter"  # the filter of the run that drew the grid, for the dialog's previous/next
EXPORTS = "gallery_exports"
CAPTION = 48  # characters of the prompt under a thumbnail


def caption(img: dict[str, Any]) -> str:
    parts = [ui_format.clip(img.get("prompt") or f"image {img['id']}", CAPTION)]
    if img.get("seed") is not None:
        parts.append(f"seed {img['seed']}")
    if img.get("width"):
        parts.append(f"{img['width']}×{img['height']}")
    return " · ".join(parts)


def pick(image_ids: list[int], picked: bool) -> Any:
    def act(ctx: ui.Context) -> None:
        service.set_picked(ctx.store, image_ids, picked)
    return ui.safe_callback("gallery", act)


def prepare(kind: str, batch_id: int | None, picked: bool) -> Any:
    def act(ctx: ui.Context) -> None:
        out = service.export_file(ctx.settings, ctx.store, kind, batch_id=batch_id, picked=picked,
                                  person=visibility.person_for(ctx.settings, ctx.actor))
        what = ("picked " if picked else "") + ("results CSV" if kind == "csv" else "images ZIP")
        st.session_state[EXPORTS] = {**st.session_state.get(EXPORTS, {}), what: out.url}
    return ui.safe_callback("gallery", act)


def open_image(image_id: int) -> None:
    st.session_state[OPEN] = image_id


def close_image() -> None:
    st.session_state.pop(OPEN, None)


def step(image_id: int, direction: int) -> None:
    ctx = ui.context()
    found = queries.neighbour_image(ctx.store, st.session_state.get(FILTER, queries.ImageFilter()), image_id,
                                    direction)
    if found is not None:
        st.session_state[OPEN] = found


@st.dialog("Image", width="large", on_dismiss=close_image)
def show_image(image_id: int) -> None:
    # A dialog is a fragment: a click inside it reruns only this function, with the arguments it was first
    # called with, so the image shown is read from session state (Previous/Next change it).
    image_id = st.session_state.get(OPEN, image_id)
    ctx = ui.context()
    with ui.guard():
        visibility.check_image(ctx.settings, ctx.store, ctx.actor, image_id)
        detail = queries.image_detail(ctx.store, image_id)
        image, task, batch = detail["image"], detail["task"], detail["batch"]
        try:
            workflow = service.load_workflow(ctx.settings, task["workflow"])
        except ComfyBatchError:
            workflow = None  # the template was renamed or removed: show what the task recorded
        values = queries.task_parameters(task, workflow)
        link = service.image_link(ctx.settings, image)
        flt = st.session_state.get(FILTER, queries.ImageFilter())
        before = queries.neighbour_image(ctx.store, flt, image_id, -1)
        after = queries.neighbour_image(ctx.store, flt, image_id, 1)
        picked = image_id in queries.picked_ids(ctx.store, [image_id])
        nav = st.container(horizontal=True)
        nav.button("Previous", icon=":material/arrow_back:", on_click=step, args=(image_id, -1),
                   disabled=before is None, shortcut="Left", key="gdlg_prev")
        nav.button("Next", icon=":material/arrow_forward:", on_click=step, args=(image_id, 1),
                   disabled=after is None, shortcut="Right", key="gdlg_next")
        nav.button("Picked" if picked else "Pick", icon=":material/star:" if picked else ":material/star_border:",
                   on_click=pick([image_id], not picked), key="gdlg_pick", type="primary" if picked else "secondary")
        ui.full_image(ctx, image_id, href=link)
        st.markdown(f"**Prompt:** {ui.md_escape(task.get('prompt') or '-')}")
        size = ui_format.format_bytes(image["size_bytes"])
        st.text(f"Image {image_id} · {image['width']}×{image['height']} · {size} · {image['path']}")
        if image.get("remote_state"):
            st.text(f"Object storage: {image['remote_state']}"
                    + (f" as {image['remote_key']}" if image.get("remote_key") else "")
                    + (" (local copy deleted)" if image.get("local_deleted_at") else "")
                    + (f" - {image['remote_error']}" if image.get("remote_error") else ""))
        if link:
            st.link_button("Download from object storage", link, icon=":material/cloud_download:")
        seed = "-" if task["seed"] is None else task["seed"]
        st.text(f"Task {task['id']} ({task['status']}) · batch #{batch['id']} {batch['name']} · workflow "
                f"{task['workflow']} · seed {seed} · server {task['server'] or '-'}")
        # A plain table (not the canvas grid): a handful of rows, readable in screenshots and by copy-paste.
        st.table(pd.DataFrame({"parameter": list(values), "value": [str(v) for v in values.values()]})
                 .set_index("parameter"))
        if st.button("Re-run with changes", type="primary", icon=":material/edit:"):
            st.session_state["generate_prefill"] = {"workflow": task["workflow"], "values": values,
                                                    "task_id": task["id"]}
            close_image()
            st.switch_page(ui.page_path("generate"))
        with st.expander("Graph sent to ComfyUI"):
            st.json(task["graph"], expanded=False)


ctx = ui.setup("Gallery")
ui.show_flash("gallery")
with ui.guard():
    c1, c2, c3, c4, c5 = st.columns([2, 1, 1, 1, 2])
    with c1:
        batch_id = ui.batch_picker(ctx, "gallery_batch")
    with c2:
        workflow = st.selectbox("Workflow", [None, *queries.task_workflows(ctx.store)], key="gallery_workflow",
                                format_func=lambda w: "All" if w is None else w)
    with c3:
        since = st.date_input("From", value=None, key="gallery_since")
    with c4:
        until = st.date_input("To", value=None, key="gallery_until")
    with c5:
        text = st.text_input("Prompt contains", key="gallery_text")
    person = ui.person_picker(ctx, "gallery_person")
    f1, f2 = st.columns([4, 1], vertical_alignment="bottom")
    with f1:
        param_text = st.text_input("Parameter values", key="gallery_params", placeholder="e.g. cfg=7; seed=5",
                                   help=f"name=value conditions separated by ';' (at most "
                                        f"{queries.MAX_PARAM_FILTERS}); they match the values rows gave "
                                        "and the seed each image ran with")
    with f2:
        picked_only = st.toggle("Picked only", key="gallery_picked")
    flt = queries.ImageFilter(batch_id, workflow, since, until, text, person=person, picked=picked_only,
                              params=queries.parse_param_filters(param_text))
    st.session_state[FILTER] = flt
    size = st.session_state.get("gallery_page_size", PAGE_SIZES[0])
    total = queries.count_images(ctx.store, flt)
    pages = max(1, math.ceil(total / size))
    if st.session_state.get("gallery_page", 1) > pages:
        st.session_state["gallery_page"] = pages
    page = st.session_state.get("gallery_page", 1)
    images = queries.page_images(ctx.store, flt, size, (page - 1) * size)
    ids = [img["id"] for img in images]
    n_picked = queries.count_picked(ctx.store, batch_id, visibility.person_for(ctx.settings, ctx.actor))

    actions = st.container(horizontal=True)
    actions.button("Pick all on this page", on_click=pick(ids, True), disabled=not ids, icon=":material/star:")
    actions.button("Unpick all on this page", on_click=pick(ids, False), disabled=not ids)
    scope = f"batch {batch_id}" if batch_id is not None else "all batches"
    actions.button(f"Prepare ZIP of {n_picked} picked", on_click=prepare("zip", batch_id, True),
                   disabled=not n_picked, icon=":material/folder_zip:")
    actions.button("Prepare CSV of picked", on_click=prepare("csv", batch_id, True), disabled=not n_picked,
                   icon=":material/download:")
    if batch_id is not None:
        actions.button(f"Prepare batch {batch_id} ZIP", on_click=prepare("zip", batch_id, False),
                       icon=":material/folder_zip:")
        actions.button(f"Prepare batch {batch_id} results CSV", on_click=prepare("csv", batch_id, False),
                       icon=":material/download:")
    ready = st.session_state.get(EXPORTS, {})
    if ready:
        with st.container(horizontal=True):
            for what, url in ready.items():
                ui.download_link(url, f"Download {what}", key=what)
    first = (page - 1) * size + 1 if images else 0
    st.text(f"Showing {first}-{first + len(images) - 1 if images else 0} of {total} image(s); "
            f"{n_picked} picked in {scope}")
    if batch_id is not None and (stored := ui_format.storage_text(service.batch_summary(ctx.store, batch_id))):
        st.text(f"Batch {batch_id}{stored}")
    if not images:
        st.info("No images match. Images appear here as tasks finish.")
    for start in range(0, len(images), COLUMNS):
        for col, img in zip(st.columns(COLUMNS), images[start:start + COLUMNS], strict=False):
            with col:
                ui.image_tile(ctx, img["id"], caption(img), href=service.image_link(ctx.settings, img),
                              title=img.get("prompt") or "")
                s1, s2 = st.columns(2)
                s1.button("★" if img["picked"] else "☆", key=f"gpick_{img['id']}",
                          on_click=pick([img["id"]], not img["picked"]),
                          help="Picked: click to unpick" if img["picked"] else "Pick this image")
                s2.button("Open", key=f"gopen_{img['id']}", on_click=open_image, args=(img["id"],))
    if st.session_state.get(OPEN) is not None:
        show_image(st.session_state[OPEN])
    p1, p2 = st.columns([3, 1], vertical_alignment="bottom")
    with p1:
        st.pagination(pages, key="gallery_page")
    with p2:
        st.selectbox("Per page", PAGE_SIZES, key="gallery_page_size")
