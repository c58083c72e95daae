"""The one CSV reader, pure: bytes in, a table out, then rows of parameters. The CLI, the API and the Batch page
all read CSV files here, so a file gets the same answer whichever face it came in by.

Encodings (Excel on every platform, in this order): a byte-order mark decides (UTF-8 or UTF-16, the latter is
Excel's "Unicode Text"); otherwise UTF-8, then GBK/GB18030 (Excel on a Chinese Windows) when the decoded text is
plausibly Chinese. Anything else (a Western cp1252 file, Shift-JIS, Big5) is refused with the encodings we accept,
never stored as mojibake. GB18030 decodes almost any byte string, so plausibility is checked: at least
`GB_PLAUSIBLE` of the non-ASCII characters must be in GB2312 (the common simplified-Chinese set); cp1252 accents
between ASCII letters decode to rare GBK-extension characters and fail that test.

Row numbers are the spreadsheet's (the header is row 1). Limits (file size, rows, count) come from the caller's
settings and are checked before anything grows with the input.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from core import sweeps
from core.errors import InputError, Problem, clip
from core.intake import Row

SPECIAL_COLUMNS = ("count", "batch_name")
ACCEPTED = "UTF-8 (with or without BOM), UTF-16 with BOM, or GBK/GB18030"
SAVE_HINT = "in Excel use File > Save As > 'CSV UTF-8 (Comma delimited)' and upload that file"
GB_PLAUSIBLE = 0.8
MAX_CELL = 131_072  # characters in one cell (the csv module's own field limit), far above any prompt


@dataclass
class CsvTable:
    """A CSV file as a grid: the header, each row's cells (exactly one per column) and its spreadsheet row
    number, and the problems of rows whose shape is wrong (too few or too many cells)."""

    filename: str
    columns: list[str]
    rows: list[list[str]]
    numbers: list[int]
    problems: list[Problem] = field(default_factory=list)


def decode(data: bytes, filename: str) -> str:
    """The file's text, or InputError naming the encodings we read."""
    if data.startswith(codecs.BOM_UTF8):
        try:
            return data[len(codecs.BOM_UTF8):].decode("utf-8")
        except UnicodeDecodeError as exc:
            at = exc.start + len(codecs.BOM_UTF8)
            raise InputError(f"{filename}: the file starts with a UTF-8 mark but is not UTF-8 text (byte "
                             f"0x{data[at]:02x} on line {_line_of(data, at)}); it mixes encodings. "
                             f"Accepted: {ACCEPTED}; {SAVE_HINT}") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise InputError(f"{filename}: the file starts with a UTF-16 mark but is not UTF-16 text. "
                             f"Accepted: {ACCEPTED}; {SAVE_HINT}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        first_bad = exc.start
    try:
        text = data.decode("gb18030")
    except UnicodeDecodeError:
        text = None
    if text is not None and _plausibly_chinese(text):
        return text
    raise InputError(f"{filename}: cannot read the text: it is not UTF-8 (byte 0x{data[first_bad]:02x} on line "
                     f"{_line_of(data, first_bad)}) and does not read as Chinese GBK/GB18030 either (a Western "
                     f"Windows, Shift-JIS or Big5 file?). Accepted: {ACCEPTED}; {SAVE_HINT}")


def read_table(data: bytes, filename: str, max_bytes: int, max_rows: int) -> CsvTable:
    """The file as a table. The file, its header and its size raise InputError (nothing can be shown); rows
    with the wrong number of cells are kept, padded or cut to the header's width, with a problem each."""
    if len(data) > max_bytes:
        raise InputError(f"{filename}: the file is {_mb(len(data))} MB; at most {_mb(max_bytes)} MB "
                         "(COMFYBATCH_MAX_CSV_MB): split it into smaller files")
    text = decode(data, filename)
    try:
        dialect: Any = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    records = _records(reader, filename, max_rows)
    try:
        header = [h.strip() for h in next(records)[1]]
    except StopIteration:
        raise InputError(f"{filename}: the file is empty") from None
    if not any(header):
        raise InputError(f"{filename}: row 1 (the header) is empty; it must name the parameters, e.g. prompt,seed")
    problems, seen = [], set()
    for i, name in enumerate(header, start=1):
        if not name:
            problems.append(Problem(f"column {i} has no name", row=1, file=filename, code="header"))
        elif name.lower() in seen:
            problems.append(Problem(f"column {i}: duplicate column '{name}'", row=1, file=filename, code="header"))
        seen.add(name.lower())
    if problems:
        raise InputError(f"{filename}: the header row (row 1) needs fixing; nothing was enqueued", problems)
    table = CsvTable(filename, header, [], [])
    width = len(header)
    for number, cells in records:
        if not any(c.strip() for c in cells):
            continue  # blank lines (Excel leaves them at the end)
        extra = [c for c in cells[width:] if c.strip()]
        if extra or len(cells) < width:
            table.problems.append(Problem(
                f"{len(cells)} cells but the header has {width} columns"
                + ("; add the missing separators (empty cells are fine)" if not extra else
                   f"; remove what is beyond the last column ({clip(extra[0], 40)})"),
                row=number, file=filename, code="ragged_row"))
        table.rows.append([*cells[:width], *[""] * (width - len(cells))])
        table.numbers.append(number)
    if not table.rows:
        raise InputError(f"{filename}: no data rows below the header")
    return table


def table_rows(columns: list[str], cells: list[list[str]], numbers: list[int], filename: str,
               max_count: int) -> list[Row]:
    """Rows of parameters from a table's cells (the file's, or the Batch page's edited grid). Empty cells keep
    the template's value; `count` and `batch_name` columns are read here; problems stay on their row."""
    rows = []
    for number, row_cells in zip(numbers, cells, strict=True):
        row = Row({}, number=number)
        for name, cell in zip(columns, row_cells, strict=False):
            value = cell.strip()
            if not name or not value:
                continue
            key = name.lower()
            if "\x00" in value:
                row.problems.append(Problem("contains a NUL character (\\x00); remove it", column=name,
                                            code="nul"))
            elif key == "count":
                try:
                    row.count = int(value) if len(value) <= 20 else -1
                    if not 1 <= row.count <= max_count:
                        raise ValueError
                except ValueError:
                    row.count = None
                    row.problems.append(Problem(f"expected a whole number from 1 to {max_count}, got "
                                                f"{clip(value, 40)!r}", column="count", code="out_of_range"))
            elif key == "batch_name":
                row.batch_name = value
            else:
                try:
                    values = sweeps.parse_cell(value)
                except InputError as exc:
                    row.problems.append(Problem(exc.summary, column=name, code="invalid_list"))
                    continue
                row.params[name] = value if values is None else values
        rows.append(row)
    return rows


def read_rows(data: bytes, filename: str, max_bytes: int, max_rows: int, max_count: int) -> list[Row]:
    """Rows of a CSV file, each carrying its own problems (ragged rows included): what the CLI and API use."""
    table = read_table(data, filename, max_bytes, max_rows)
    rows = table_rows(table.columns, table.rows, table.numbers, filename, max_count)
    by_number = {row.number: row for row in rows}
    for problem in table.problems:
        by_number[problem.row].problems.append(problem)
    return rows


def template_csv(param_names: list[str], example: dict[str, Any]) -> str:
    """A CSV with the workflow's parameters as columns and one example row, for users to fill in."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*param_names, "count"])
    writer.writerow([("" if example.get(n) is None else example.get(n)) for n in param_names] + [1])
    return out.getvalue()


def _records(reader: Any, filename: str, max_rows: int) -> Any:
    """(row number, cells) of each record, refusing the file as soon as it has too many rows or a cell too
    large for one field, so memory never grows past the limits."""
    number = 0
    data_rows = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InputError(f"{filename} row {number + 1}: not readable as CSV ({exc}); a cell may hold at most "
                             f"{MAX_CELL:,} characters") from None
        number += 1
        if number > 1 and any(c.strip() for c in cells):
            data_rows += 1
            if data_rows > max_rows:
                raise InputError(f"{filename}: more than {max_rows:,} rows (COMFYBATCH_MAX_ROWS); split the file")
        yield number, cells


def _plausibly_chinese(text: str) -> bool:
    counts = Counter(text)  # counted in C; each distinct character is then checked once
    wide = {c: n for c, n in counts.items() if ord(c) > 127}
    total = sum(wide.values())
    common = 0
    for c, n in wide.items():
        try:
            c.encode("gb2312")
            common += n
        except UnicodeEncodeError:
            pass
    return not total or common / total >= GB_PLAUSIBLE


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.1f}".rstrip("0").rstrip(".")
