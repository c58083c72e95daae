"""Batch: a CSV becomes an editable table, validated against a workflow on every edit; the whole batch is
enqueued or nothing."""

from __future__ import annotations

import hashlib
from typing import Any

import pandas as pd
import streamlit as st

import ui
from core import csvin, csvtable, service, workflows
from core.errors import InputError
from core.workflows import Workflow

ROW = "#"  # the editor's read-only column of spreadsheet row numbers (not part of the CSV)


def template(wf: Workflow) -> str:
    example = {n: ("random" if p.kind == "seed" else p.default) for n, p in wf.params.items()}
    return csvin.template_csv(list(wf.params), example)


def marked_table(table: pd.DataFrame, labels: list[str], problems: list[csvtable.Problem]) -> Any:
    """The rows with problems: a 'problem' column first, the bad cells (or whole rows) in red."""
    shown = table.reset_index(drop=True)
    shown.insert(0, ROW, labels)
    shown.insert(0, "problem", "")
    bad_cells: set[tuple[int, str]] = set()
    bad_rows: set[int] = set()
    for p in problems:
        if p.position is None or p.position >= len(shown):
            continue
        where = f"{p.column}: " if p.column else ""
        current = shown.iat[p.position, 0]
        shown.iat[p.position, 0] = (current + "; " if current else "") + where + p.reason
        if p.column is not None and p.column in table.columns:
            bad_cells.add((p.position, p.column))
        else:
            bad_rows.add(p.position)
    view = shown.iloc[sorted({pos for pos, _ in bad_cells} | bad_rows)]

    def paint(frame: pd.DataFrame) -> pd.DataFrame:
        styles = pd.DataFrame("", index=frame.index, columns=frame.columns)
        styles["problem"] = "color: #b00020"
        for pos in frame.index:
            for col in table.columns:
                if pos in bad_rows or (pos, col) in bad_cells:
                    styles.at[pos, col] = "background-color: #f8b4b4"
        return styles

    return view.style.apply(paint, axis=None)


ctx = ui.setup("Batch")
with ui.guard():
    found, broken = workflows.list_workflows(ctx.settings.workflows_dir)
    for problem in broken:
        st.warning(f"Workflow file skipped: {problem}")
    if not found:
        st.info(f"No workflows in {ctx.settings.workflows_dir}.")
        st.stop()
    by_name = {w.name: w for w in found}
    c1, c2 = st.columns([2, 1], vertical_alignment="bottom")
    with c1:
        name = st.selectbox("Workflow", list(by_name), key="batch_workflow",
                            format_func=lambda n: f"{by_name[n].title or n} ({n})")
    wf = by_name[name]
    with c2:
        st.download_button("Download a template CSV for this workflow", template(wf), f"{wf.name}_template.csv",
                           mime="text/csv", icon=":material/download:")
    st.caption("Columns name the workflow's parameters (" + ", ".join(wf.params) + ") or any node input as "
               "`<node id>.<input>`; optional `count` (copies of the row) and `batch_name` columns.")
    csv_file = st.file_uploader("CSV file (UTF-8, UTF-8 with BOM or GBK)", type=["csv", "tsv", "txt"],
                                key="batch_csv")
    image_files = st.file_uploader("Input images the CSV names by file name", type=["png", "jpg", "jpeg", "webp"],
                                   accept_multiple_files=True, key="batch_images")
    c1, c2 = st.columns(2)
    with c1:
        batch_name = st.text_input("Batch name (optional; a `batch_name` column overrides it)", key="batch_name")
    with c2:
        priority = st.number_input("Priority (higher runs first)", value=0, step=1, key="batch_priority")
    ui.show_flash("batch")
    if csv_file is None:
        st.info("Upload a CSV file to check it and see what would be submitted.")
        st.stop()

    columns, rows = csvtable.read_table(csv_file.getvalue(), csv_file.name)
    table = pd.DataFrame(rows, columns=columns, dtype="string")
    table.insert(0, ROW, pd.array(range(2, 2 + len(rows)), dtype="Int64"))
    st.subheader("Table")
    st.caption("Column # is the row number in your file (the header is row 1). Edit cells, add or delete rows; "
               "the table is checked again after every edit.")
    edited = st.data_editor(table, key=f"batch_editor_{csv_file.file_id}", num_rows="dynamic", hide_index=True,
                            disabled=[ROW], column_config={ROW: st.column_config.NumberColumn(ROW, width="small")})
    labels = [str(int(v)) if pd.notna(v) else "new" for v in edited[ROW]]
    edited = edited.drop(columns=[ROW])
    cells = edited.astype(object).where(edited.notna(), "").values.tolist()
    data = csvtable.table_to_csv(list(edited.columns), cells)
    images = {f.name: f.getvalue() for f in image_files or []}
    dry: service.Submitted | None
    try:
        dry = service.submit_csv(ctx.settings, ctx.store, data, csv_file.name, wf.name, batch_name=batch_name or None,
                                 priority=int(priority), images=images, dry_run=True)
        problems: list[csvtable.Problem] = []
    except InputError as exc:
        dry, problems, summary = None, csvtable.locate_problems(exc.problems or [exc.summary]), exc.summary

    if problems:
        lines = []
        for p in problems:
            if p.position is not None and p.position < len(labels):
                where = f"row {labels[p.position]}" + (f", column '{p.column}'" if p.column else "")
                lines.append(ui.md_escape(f"- {where}: {p.reason}"))
            else:
                lines.append(ui.md_escape(f"- {p.text}"))  # the whole file, or a server that cannot run it
        bad_rows = {p.position for p in problems if p.position is not None}
        header = (f"{len(problems)} problem(s) in {len(bad_rows)} row(s); nothing will be enqueued until they are "
                  "fixed." if bad_rows else ui.md_escape(summary))
        st.error(header + "\n\n" + "\n".join(lines))
        if bad_rows:
            st.dataframe(marked_table(edited, labels, problems), hide_index=True)
    elif dry is not None:
        batches = sorted({j.batch_name or (batch_name or "(one batch)") for j in dry.jobs})
        st.success(f"Ready: {len(dry.jobs)} task(s) from {len(edited)} row(s) in {len(batches)} batch(es).")
        for report in dry.reports:
            if not report.reachable:
                st.caption(f"{report.url} could not be checked ({ui.short_reason(report.error)}); the work waits "
                           "for it or runs on another server.")
            elif report.problems:
                st.warning(f"{report.url} cannot run this workflow, so these tasks go to the other servers:\n\n"
                           + "\n".join(f"- {ui.md_escape(p)}" for p in report.problems))
        with st.expander("Dry run: what would be submitted", expanded=False):
            st.caption("Random seeds are drawn again when you submit.")
            st.dataframe(pd.DataFrame(csvtable.preview_rows(dry.jobs)), hide_index=True)
            if dry.jobs:
                st.json(dry.jobs[0].graph, expanded=False)
        digest = hashlib.sha256(data + wf.name.encode() + b"".join(sorted(images.values()))).hexdigest()
        previous = st.session_state.get("batch_submitted")
        if previous and previous[0] == digest:
            st.info(f"This table was already submitted as batch {', '.join(map(str, previous[1]))}.")
        if st.button("Submit batch", type="primary", disabled=bool(previous and previous[0] == digest)):
            result = service.submit_csv(ctx.settings, ctx.store, data, csv_file.name, wf.name,
                                        batch_name=batch_name or None, priority=int(priority), images=images)
            st.session_state["batch_submitted"] = (digest, result.batch_ids)
            ids = ", ".join(map(str, result.batch_ids))
            ui.flash("batch", "success", f"Batch {ids}: {len(result.task_ids)} task(s) queued.")
            st.rerun()
        st.page_link(ui.page_path("tasks"), label="Watch progress on the Tasks page", icon=":material/list_alt:")
