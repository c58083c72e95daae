"""A CSV file as an editable table, and back, for the Batch page. Pure: bytes in, rows out.

The page shows the uploaded file as a grid, lets the user fix cells, writes the grid back to CSV bytes and
validates those with the same engine path as any CSV (`service.submit_csv`). Row numbers are the
spreadsheet's (header = row 1), so the engine's problems ("jobs.csv row 3: parameter 'steps' ...") point
at a table position: `locate_problems` turns each problem line into (position, column, reason).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Any

from core import csvin
from core.errors import InputError

_LOCATION = re.compile(r"\brow (\d+)(?: column (?:'([^']*)'|(\d+)))?(?:: (?:unknown )?parameter '([^']*)')?")


@dataclass(frozen=True)
class Problem:
    position: int | None  # 0-based table row, None for a problem with the whole file or the header
    column: str | None  # the column (parameter) it concerns, when known
    reason: str
    text: str  # the engine's full line


def read_table(data: bytes, filename: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV file (UTF-8, BOM or GBK), cells as text, every row as wide as the widest.

    Blank rows inside the file are kept so table positions keep the file's row numbers; trailing ones are
    dropped. Cells beyond the header get columns named 'extra 1', 'extra 2', ... (the engine rejects them
    by name). A header the grid cannot show (empty or repeated names) raises InputError.
    """
    text = csvin.decode(data, filename)
    try:
        dialect: Any = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    records = list(csv.reader(io.StringIO(text, newline=""), dialect))
    if not records or not any(c.strip() for c in records[0]):
        raise InputError(f"{filename}: row 1 (the header) is empty; it must name the parameters, e.g. prompt,seed")
    header = [h.strip() for h in records[0]]
    problems, seen = [], set()
    for i, name in enumerate(header, start=1):
        if not name:
            problems.append(f"{filename} row 1 column {i}: empty column name")
        elif name.lower() in seen:
            problems.append(f"{filename} row 1 column {i}: duplicate column '{name}'")
        seen.add(name.lower())
    if problems:
        raise InputError(f"{filename}: the header row needs fixing in the file itself", problems)
    rows = records[1:]
    while rows and not any(c.strip() for c in rows[-1]):
        rows.pop()
    width = max([len(header), *(len(r) for r in rows)])
    columns = header + [f"extra {i}" for i in range(1, width - len(header) + 1)]
    return columns, [[*r, *[""] * (width - len(r))] for r in rows]


def table_to_csv(columns: list[str], rows: list[list[Any]]) -> bytes:
    """CSV bytes for a table; every cell quoted, so the engine's dialect sniffing cannot misread it."""
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if _blank(v) else str(v) for v in row])
    return out.getvalue().encode("utf-8")


def locate_problems(problems: list[str]) -> list[Problem]:
    """Parse the engine's problem lines ("<file> row <n>: parameter '<col>' (...): reason")."""
    located = []
    for text in problems:
        m = _LOCATION.search(text)
        if not m:
            located.append(Problem(None, None, text, text))
            continue
        row = int(m.group(1))
        column = m.group(2) or m.group(4)
        rest = text[m.end():]
        reason = rest.split(": ", 1)[1] if rest.startswith((" (", ":")) and ": " in rest else rest.lstrip(": ")
        located.append(Problem(row - 2 if row >= 2 else None, column, reason.strip() or text, text))
    return located


def preview_rows(jobs: list[Any], limit: int = 500) -> list[dict[str, Any]]:
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
