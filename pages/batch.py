"""Batch: a CSV becomes an editable table, checked against a workflow on every edit; the whole batch is enqueued
or nothing. The file is read by the engine's one CSV reader (core.csvin); the table's rows go to
`service.submit` as they are (no CSV round trip), and each problem marks the cell its fields name."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

import pandas as pd
import streamlit as st

import ui
from core import csvin, service, workflows
from core.errors import InputError, Problem
from core.workflows import Workflow

ROW = "#"  # the editor's read-only column of spreadsheet row numbers (not part of the CSV)


def template(wf: Workflow) -> str:
    example = {n: ("random" if p.kind == "seed" else p.default) for n, p in wf.params.items()}
    return csvin.template_csv(list(wf.params), example)


def table_rows(table: csvin.CsvTable, edited: pd.DataFrame, max_count: int) -> tuple[list[service.Row], list[str]]:
    """The edited grid as submission rows, and a label per row (its file row number, or "new"). A row whose
    shape was wrong in the file keeps that problem until it is edited."""
    numbers: list[int] = []
    labels: list[str] = []
    next_number = max(table.numbers, default=1) + 1
    for value in edited[ROW]:
        if pd.notna(value):
            numbers.append(int(value))
            labels.append(str(int(value)))
        else:
            numbers.append(next_number)
            labels.append("new")
            next_number += 1
    grid = edited.drop(columns=[ROW])
    cells = [["" if _blank(v) else str(v) for v in row] for row in grid.astype(object).values.tolist()]
    rows = csvin.table_rows(list(grid.columns), cells, numbers, table.filename, max_count)
    original = dict(zip(table.numbers, table.rows, strict=True))
    for row, row_cells in zip(rows, cells, strict=True):
        if original.get(row.number) == row_cells:
            row.problems.extend(p for p in table.problems if p.row == row.number)
    return rows, labels


def located(problem: Problem, numbers: list[int], columns: list[str]) -> tuple[int | None, str | None]:
    """(table position, column) a problem points at, from its fields."""
    position = numbers.index(problem.row) if problem.row in numbers else None
    column = problem.column if problem.column in columns else problem.parameter
    return position, column if column in columns else None


def marked_table(table: pd.DataFrame, labels: list[str], numbers: list[int], problems: list[Problem]) -> Any:
    """The rows with problems: a 'problem' column first, the bad cells (or whole rows) in red."""
    shown = table.reset_index(drop=True)
    shown.insert(0, ROW, labels)
    shown.insert(0, "problem", "")
    bad_cells: set[tuple[int, str]] = set()
    bad_rows: set[int] = set()
    for p in problems:
        position, column = located(p, numbers, list(table.columns))
        if position is None:
            continue
        current = shown.iat[position, 0]
        shown.iat[position, 0] = (current + "; " if current else "") + (f"{column}: " if column else "") + p.message
        if column is not None:
            bad_cells.add((position, column))
        else:
            bad_rows.add(position)
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


def problem_line(p: Problem, labels: list[str], numbers: list[int], columns: list[str]) -> str:
    position, column = located(p, numbers, columns)
    if position is None:
        return ui.md_escape(f"- {p}")  # the request, the file, or a server that cannot run it
    where = f"row {labels[position]}" + (f", column '{column}'" if column else "")
    return ui.md_escape(f"- {where}: {p.message}")


def preview_rows(jobs: list[service.Job], limit: int = 500) -> list[dict[str, Any]]:
    """What a dry run would enqueue, one line per task: source row, batch name and the resolved values."""
    out = []
    for job in jobs[:limit]:
        line: dict[str, Any] = {"row": job.row_number, "batch": job.batch_name or ""}
        line.update({k: v if isinstance(v, (int, float, str)) else str(v) for k, v in job.resolved.items()})
        out.append(line)
    return out


def _blank(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN / pandas NA
    except (TypeError, ValueError):
        return False


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
    webhook = st.text_input("Webhook URL (optional; called with a signed JSON summary when the batch is done)",
                            key="batch_webhook", placeholder="https://example.com/hooks/comfybatch")
    ui.show_flash("batch")
    if csv_file is None:
        st.info("Upload a CSV file to check it and see what would be submitted.")
        st.stop()

    table = csvin.read_table(csv_file.getvalue(), csv_file.name, ctx.settings.max_csv_bytes, ctx.settings.max_rows)
    frame = pd.DataFrame(table.rows, columns=table.columns, dtype="string")
    frame.insert(0, ROW, pd.array(table.numbers, dtype="Int64"))
    st.subheader("Table")
    st.caption("Column # is the row number in your file (the header is row 1). Edit cells, add or delete rows; "
               "the table is checked again after every edit.")
    edited = st.data_editor(frame, key=f"batch_editor_{csv_file.file_id}", num_rows="dynamic", hide_index=True,
                            disabled=[ROW], column_config={ROW: st.column_config.NumberColumn(ROW, width="small")})
    rows, labels = table_rows(table, edited, ctx.settings.max_count)
    numbers = [r.number or 0 for r in rows]
    images = {f.name: f.getvalue() for f in image_files or []}
    submission = service.Submission(wf.name, rows, name=batch_name or None, priority=int(priority), images=images,
                                    source=csv_file.name, file=csv_file.name, webhook=webhook.strip() or None)
    dry: service.Submitted | None
    problems: list[Problem] = []
    try:
        dry = service.submit(ctx.settings, ctx.store, replace(submission, dry_run=True), actor=ctx.actor)
    except InputError as exc:
        dry, problems, summary = None, exc.problems or [Problem(exc.summary)], exc.summary

    if problems:
        columns = list(edited.columns.drop(ROW))
        lines = [problem_line(p, labels, numbers, columns) for p in problems]
        bad_rows = {p.row for p in problems if located(p, numbers, columns)[0] is not None}
        header = (f"{len(problems)} problem(s) in {len(bad_rows)} row(s); nothing will be enqueued until they are "
                  "fixed." if bad_rows else ui.md_escape(summary))
        st.error(header + "\n\n" + "\n".join(lines))
        if bad_rows:
            st.dataframe(marked_table(edited.drop(columns=[ROW]), labels, numbers, problems), hide_index=True)
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
            st.dataframe(pd.DataFrame(preview_rows(dry.jobs)), hide_index=True)
            if dry.jobs:
                st.json(dry.jobs[0].graph, expanded=False)
        cells = json.dumps([[r.number, r.params, r.count, r.batch_name] for r in rows], ensure_ascii=False,
                           default=str)
        digest = hashlib.sha256(cells.encode() + wf.name.encode() + b"".join(sorted(images.values()))).hexdigest()
        previous = st.session_state.get("batch_submitted")
        if previous and previous[0] == digest:
            st.info(f"This table was already submitted as batch {', '.join(map(str, previous[1]))}.")
        if st.button("Submit batch", type="primary", disabled=bool(previous and previous[0] == digest)):
            result = service.submit(ctx.settings, ctx.store, submission, actor=ctx.actor)
            st.session_state["batch_submitted"] = (digest, result.batch_ids)
            ids = ", ".join(map(str, result.batch_ids))
            ui.flash("batch", "success", f"Batch {ids}: {len(result.task_ids)} task(s) queued.")
            st.rerun()
        st.page_link(ui.page_path("tasks"), label="Watch progress on the Tasks page", icon=":material/list_alt:")
