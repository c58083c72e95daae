"""Gallery: a paged grid of thumbnails; open one full size with every parameter; re-run it with changes;
download a selection as a ZIP; export a batch's results CSV."""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

import ui
import ui_format
from core import queries, service
from core.errors import ComfyBatchError

COLUMNS = 6
PAGE_SIZES = (24, 48, 96)
SELECTED = "gallery_selected"
OPEN = "gallery_open"  # the image shown in the dialog, kept until it is dismissed


def selected() -> set[int]:
    return st.session_state.setdefault(SELECTED, set())


def toggle(image_id: int) -> None:
    if st.session_state.get(f"gsel_{image_id}"):
        selected().add(image_id)
    else:
        selected().discard(image_id)


def select_page(ids: list[int]) -> None:
    selected().update(ids)


def clear() -> None:
    selected().clear()


# Download callables run later, on a thread of their own: they take what they need as arguments and open
# that thread's store (never the one of the run that drew the button, nor session state).
def zip_images(ids: frozenset[int]) -> bytes:
    ctx = ui.context()
    return service.zip_bytes(ctx.settings, queries.images_by_ids(ctx.store, ids))


def zip_batch(batch_id: int) -> bytes:
    ctx = ui.context()
    return service.zip_bytes(ctx.settings, ctx.store.images_for_batch(batch_id))


def results_csv(batch_id: int) -> bytes:
    ctx = ui.context()
    return service.results_csv_bytes(ctx.settings, ctx.store, batch_id)


def open_image(image_id: int) -> None:
    st.session_state[OPEN] = image_id


def close_image() -> None:
    st.session_state.pop(OPEN, None)


@st.dialog("Image", width="large", on_dismiss=close_image)
def show_image(image_id: int) -> None:
    ctx = ui.context()
    with ui.guard():
        detail = queries.image_detail(ctx.store, image_id)
        image, task, batch = detail["image"], detail["task"], detail["batch"]
        try:
            workflow = service.load_workflow(ctx.settings, task["workflow"])
        except ComfyBatchError:
            workflow = None  # the template was renamed or removed: show what the task recorded
        values = queries.task_parameters(task, workflow)
        link = service.image_link(ctx.settings, image)
        ui.full_image(ctx, image_id, href=link)
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
    flt = queries.ImageFilter(batch_id, workflow, since, until, text, person)
    size = st.session_state.get("gallery_page_size", PAGE_SIZES[0])
    total = queries.count_images(ctx.store, flt)
    pages = max(1, math.ceil(total / size))
    if st.session_state.get("gallery_page", 1) > pages:
        st.session_state["gallery_page"] = pages
    page = st.session_state.get("gallery_page", 1)
    images = queries.page_images(ctx.store, flt, size, (page - 1) * size)
    ids = [img["id"] for img in images]
    chosen = selected()

    actions = st.container(horizontal=True)
    actions.button("Select all on this page", on_click=select_page, args=(ids,), disabled=not ids)
    actions.button("Clear selection", on_click=clear, disabled=not chosen)
    picked = frozenset(chosen)
    actions.download_button(f"Download {len(chosen)} selected as ZIP", lambda: zip_images(picked),
                            "comfybatch-images.zip", mime="application/zip", disabled=not chosen,
                            icon=":material/folder_zip:", on_click="ignore")
    if batch_id is not None:
        bid: int = batch_id
        actions.download_button(f"Batch {bid} as ZIP", lambda: zip_batch(bid), f"batch-{batch_id}.zip",
                                mime="application/zip", icon=":material/folder_zip:", on_click="ignore")
        actions.download_button(f"Batch {batch_id} results CSV", lambda: results_csv(bid),
                                f"batch-{batch_id}-results.csv", mime="text/csv", icon=":material/download:",
                                on_click="ignore")
    first = (page - 1) * size + 1 if images else 0
    st.text(f"Showing {first}-{first + len(images) - 1 if images else 0} of {total} image(s); "
            f"{len(chosen)} selected")
    if batch_id is not None and (stored := ui_format.storage_text(service.batch_summary(ctx.store, batch_id))):
        st.text(f"Batch {batch_id}{stored}")
    if not images:
        st.info("No images match. Images appear here as tasks finish.")
    for start in range(0, len(images), COLUMNS):
        for col, img in zip(st.columns(COLUMNS), images[start:start + COLUMNS], strict=False):
            with col:
                ui.image_tile(ctx, img["id"], f"#{img['id']} · task {img['task_id']}"
                              + (f" · seed {img['seed']}" if img["seed"] is not None else "")
                              + (" · stored" if img["remote_state"] == "stored" else ""),
                              href=service.image_link(ctx.settings, img))
                st.session_state[f"gsel_{img['id']}"] = img["id"] in chosen
                s1, s2 = st.columns(2)
                s1.checkbox("Select", key=f"gsel_{img['id']}", on_change=toggle, args=(img["id"],))
                s2.button("Open", key=f"gopen_{img['id']}", on_click=open_image, args=(img["id"],))
    if st.session_state.get(OPEN) is not None:
        show_image(st.session_state[OPEN])
    p1, p2 = st.columns([3, 1], vertical_alignment="bottom")
    with p1:
        st.pagination(pages, key="gallery_page")
    with p2:
        st.selectbox("Per page", PAGE_SIZES, key="gallery_page_size")
