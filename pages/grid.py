"""Grid: a sweep batch (made from lists of values) as a comparison grid: two swept parameters as rows and
columns, the others fixed to one value each; exported as one PNG contact sheet with the labels drawn, or as
a ZIP. The grid is one HTML table of thumbnails the browser fetches from /files/ (nothing held in memory)."""

from __future__ import annotations

import html
import json
from typing import Any

import streamlit as st

import ui
from core import access, grids, queries, service, visibility

EXPORTS = "grid_exports"


def label(value: Any) -> str:
    return grids.show(value)


def grid_table(ctx: ui.Context, grid: grids.Grid) -> str:
    """The grid as an HTML table: column labels on top, row labels on the left, a thumbnail per cell."""
    head = "".join(f'<th class="cb-col">{html.escape(grid.label(grid.col_axis, v))}</th>' for v in grid.cols)
    body = []
    for r, row_value in enumerate(grid.rows):
        cells = []
        for c in range(len(grid.cols)):
            image = grid.cells.get((r, c))
            if image is None:
                cells.append('<td class="cb-cell cb-empty">not yet</td>')
                continue
            cells.append(f'<td class="cb-cell"><a href="{access.image_url(ctx.settings, image["id"])}" '
                         f'target="_blank"><img src="{access.thumb_url(ctx.settings, image["id"])}" '
                         f'data-image-id="{image["id"]}" data-row="{r}" data-col="{c}" '
                         'style="width:160px;height:160px;object-fit:contain"></a></td>')
        body.append(f'<tr><th class="cb-row">{html.escape(grid.label(grid.row_axis, row_value))}</th>'
                    + "".join(cells) + "</tr>")
    return (f'<table class="cb-grid" data-rows="{len(grid.rows)}" data-cols="{len(grid.cols)}">'
            f"<tr><th></th>{head}</tr>{''.join(body)}</table>")


def prepare(kind: str, batch_id: int, row_axis: str | None, col_axis: str | None, fixed: dict[str, Any]) -> Any:
    def act(ctx: ui.Context) -> tuple[str, str] | None:
        out = service.export_grid(ctx.settings, ctx.store, batch_id, row_axis, col_axis, fixed, kind)
        st.session_state.setdefault(EXPORTS, {})[kind] = (out.url, out.name)
        return None
    return ui.safe_callback("grid", act)


ctx = ui.setup("Grid")
ui.show_flash("grid")
with ui.guard():
    batches = grids.sweep_batches(ctx.store, person=visibility.person_for(ctx.settings, ctx.actor))
    if not batches:
        st.info("No sweep yet. On the Generate page give a parameter several values (or, in a CSV, a cell such "
                'as `[4, 7, 10]` or `["a cat", "a dog"]`): the batch is every combination, shown here as a grid.')
        st.stop()
    by_id = {b["id"]: b for b in batches}
    batch_id = st.selectbox("Sweep batch", list(by_id), key="grid_batch",
                            format_func=lambda b: f"#{b} {by_id[b]['name']} ("
                            + " x ".join(f"{k} {len(v)}" for k, v in json.loads(by_id[b]["axes"]).items()) + ")")
    axes: dict[str, list[Any]] = json.loads(by_id[batch_id]["axes"])
    names = list(axes)
    c1, c2 = st.columns(2)
    row_axis = c1.selectbox("Rows", [None, *names], index=1, key=f"grid_rows_{batch_id}",
                            format_func=lambda a: "(none)" if a is None else a)
    col_axis = c2.selectbox("Columns", [None, *names], index=2 if len(names) > 1 else 0, key=f"grid_cols_{batch_id}",
                            format_func=lambda a: "(none)" if a is None else a)
    fixed: dict[str, Any] = {}
    others = [a for a in names if a not in (row_axis, col_axis)]
    if others:
        cols = st.columns(len(others))
        for col, axis in zip(cols, others, strict=True):
            fixed[axis] = col.selectbox(f"{axis} (fixed)", axes[axis], key=f"grid_fix_{batch_id}_{axis}",
                                        format_func=label)
    grid = grids.build(ctx.store, batch_id, row_axis, col_axis, fixed)
    summary = service.batch_summary(ctx.store, batch_id)
    st.text(f"Grid of batch {batch_id}: {len(grid.rows)} x {len(grid.cols)} cells, {len(grid.cells)} with an "
            f"image; batch {summary['done']}/{summary['total']} done")
    actions = st.container(horizontal=True)
    actions.button("Prepare contact sheet (PNG)", on_click=prepare("png", batch_id, row_axis, col_axis, fixed),
                   icon=":material/grid_on:")
    actions.button("Prepare grid ZIP", on_click=prepare("zip", batch_id, row_axis, col_axis, fixed),
                   icon=":material/folder_zip:")
    for kind, (url, name) in st.session_state.get(EXPORTS, {}).items():
        ui.download_link(url, f"Download {name}", key=f"grid_{kind}")
    path, cjk = grids.font_file()
    if not cjk:
        st.caption("The contact sheet's labels use " + (path or "Pillow's built-in font") + ": no font with Chinese "
                   "characters is installed here (e.g. apt-get install fonts-noto-cjk), so such labels show as boxes.")
    st.markdown(grid_table(ctx, grid), unsafe_allow_html=True)
    if queries.has_unfinished_work(ctx.store) and summary["done"] < summary["total"]:
        st.caption("Cells fill in as the batch runs: reload or change a choice to update.")
