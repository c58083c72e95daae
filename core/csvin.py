"""CSV intake, pure: bytes in, rows out. Reads UTF-8, UTF-8 with BOM and GBK/GB18030 (Excel on a Chinese
Windows) files; the header row names parameters; row numbers are the spreadsheet's (header = row 1)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

from core.errors import InputError

SPECIAL_COLUMNS = ("count", "batch_name")


@dataclass
class CsvRow:
    row_number: int
    params: dict[str, str]
    count: int | None = None
    batch_name: str | None = None
    problems: list[str] = field(default_factory=list)  # row-level problems, reported with the parameter checks


def decode(data: bytes, filename: str) -> str:
    """Decode a CSV file: UTF-8 (with or without BOM) first, then GB18030 (a superset of GBK)."""
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise InputError(f"{filename}: cannot read the file as UTF-8 or GBK/GB18030 text; save it from Excel as "
                     "'CSV UTF-8' and upload it again")


def read_csv(data: bytes, filename: str) -> list[CsvRow]:
    """Rows of the file with empty cells dropped. Problems with the file or its header raise InputError;
    problems within a row are kept on the row, so they are reported together with its parameter checks."""
    text = decode(data, filename)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel  # type: ignore[assignment]
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{filename}: the file is empty") from None
    header = [h.strip() for h in header]
    problems = []
    if not any(header):
        raise InputError(f"{filename}: row 1 (the header) is empty; it must name the parameters, e.g. prompt,seed")
    seen: dict[str, int] = {}
    for i, name in enumerate(header):
        if not name:
            problems.append(f"{filename} row 1 column {i + 1}: empty column name")
        elif name.lower() in seen:
            problems.append(f"{filename} row 1 column {i + 1}: duplicate column '{name}'")
        seen[name.lower()] = i
    rows: list[CsvRow] = []
    for line_no, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue  # blank lines (Excel leaves them at the end)
        row = CsvRow(line_no, {})
        if len(cells) > len(header) and any(c.strip() for c in cells[len(header):]):
            row.problems.append(f"{filename} row {line_no}: {len(cells)} cells but the header has "
                                f"{len(header)} columns")
        for name, cell in zip(header, cells, strict=False):
            if not name:
                continue
            value = cell.strip()
            if not value:
                continue
            key = name.lower()
            if key == "count":
                try:
                    row.count = int(value)
                    if row.count < 1 or row.count > 1000:
                        raise ValueError
                except ValueError:
                    row.problems.append(f"{filename} row {line_no} column 'count': expected a whole number from 1 to "
                                    f"1000, got {value!r}")
            elif key == "batch_name":
                row.batch_name = value.strip()
            else:
                row.params[name] = value
        rows.append(row)
    if problems:
        raise InputError(f"{filename}: {len(problems)} problem(s) in the header; nothing was enqueued", problems)
    if not rows:
        raise InputError(f"{filename}: no data rows below the header")
    return rows


def template_csv(param_names: list[str], example: dict[str, Any]) -> str:
    """A CSV with the workflow's parameters as columns and one example row, for users to fill in."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*param_names, "count"])
    writer.writerow([("" if example.get(n) is None else example.get(n)) for n in param_names] + [1])
    return out.getvalue()
