"""Comparison grids of a sweep batch: rows and columns are two of its swept parameters, each cell the image of
the task with those values (the other swept parameters fixed to one value each), and the grid exported as one
PNG contact sheet with the values drawn as labels, or as a ZIP named by the values.

Bounded: a grid has at most `MAX_CELLS` cells (choose fixed values for the other axes), the sheet at most
`MAX_SIDE` pixels a side (cells shrink to fit), and images are read one at a time. Side effects: only the
files written by `contact_sheet` and `grid_zip`.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from core import thumbs
from core.errors import InputError, NotFound, Problem, clip
from core.store import Store

MAX_CELLS = 400
MAX_SIDE = 4096
CELL = 256
LABEL_WIDTH = 180
HEADER = 40
MARGIN = 6
BACKGROUND = (255, 255, 255)
EMPTY = (235, 235, 235)
INK = (20, 20, 20)
FALLBACK_FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                  "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf")


@dataclass
class Grid:
    batch_id: int
    row_axis: str | None
    col_axis: str | None
    rows: list[Any]
    cols: list[Any]
    fixed: dict[str, Any] = field(default_factory=dict)
    cells: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)  # (row, col) -> image row

    def label(self, axis: str | None, value: Any) -> str:
        return "" if axis is None else f"{axis} = {show(value)}"


def show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def batch_axes(store: Store, batch_id: int) -> dict[str, list[Any]]:
    """The swept parameters of a batch and their values (empty for a batch made without lists)."""
    batch = store.get_batch(batch_id)
    return json.loads(batch["axes"]) if batch.get("axes") else {}


def sweep_batches(store: Store, limit: int = 200, person: str | None = None) -> list[dict[str, Any]]:
    """The newest batches made from lists (only `person`'s when given), for the grid page's picker."""
    mine, args = (" AND submitted_by = ?", [person]) if person is not None else ("", [])
    return list(store.db.query(f"SELECT id, name, axes FROM batches WHERE axes IS NOT NULL{mine} ORDER BY id DESC "
                               "LIMIT ?", [*args, limit]))


def _path(axis: str) -> str:
    if '"' in axis or "\\" in axis:
        raise InputError(f"the parameter name {clip(axis, 60)!r} cannot be a grid axis (it holds a quote)")
    return f'$."{axis}"'


def build(store: Store, batch_id: int, row_axis: str | None, col_axis: str | None,
          fixed: dict[str, Any] | None = None) -> Grid:
    """The grid of a sweep batch. `fixed` gives one value to each other swept parameter (its first value when
    not given). InputError for an axis the batch did not sweep, a value it did not use or too many cells."""
    axes = batch_axes(store, batch_id)
    if not axes:
        raise NotFound(f"batch {batch_id} was not made from lists of values: it has no grid")
    problems = [Problem(f"batch {batch_id} did not sweep this parameter (it swept: {', '.join(axes)})",
                        parameter=a, code="invalid") for a in (row_axis, col_axis) if a is not None and a not in axes]
    if row_axis is not None and row_axis == col_axis:
        problems.append(Problem("rows and columns need two different parameters", parameter=row_axis))
    chosen = dict(fixed or {})
    for axis, value in chosen.items():
        if axis not in axes or value not in axes[axis]:
            problems.append(Problem(f"not one of the batch's values for it: {clip(show(value), 60)}",
                                    parameter=axis, code="invalid"))
    if problems:
        raise InputError("this grid cannot be drawn", problems)
    rows = axes[row_axis] if row_axis else [None]
    cols = axes[col_axis] if col_axis else [None]
    if len(rows) * len(cols) > MAX_CELLS:
        raise InputError(f"a grid of {len(rows)} x {len(cols)} cells; at most {MAX_CELLS}: choose other axes")
    others = {a: chosen.get(a, values[0]) for a, values in axes.items() if a not in (row_axis, col_axis)}
    grid = Grid(batch_id, row_axis, col_axis, rows, cols, others)
    where: list[str] = ["t.batch_id = ?"]
    args: list[Any] = [batch_id]
    for axis, value in others.items():
        where.append("t.params -> ? = ?")
        args.extend([_path(axis), json.dumps(value, ensure_ascii=False)])
    row_sql = "t.params -> ?" if row_axis else "NULL"
    col_sql = "t.params -> ?" if col_axis else "NULL"
    head = [_path(a) for a in (row_axis, col_axis) if a]
    sql = (f"SELECT {row_sql}, {col_sql}, i.id, i.path, i.width, i.height, i.task_id FROM tasks t "
           "JOIN images i ON i.task_id = t.id "
           f"WHERE {' AND '.join(where)} ORDER BY t.id, i.node_id, i.idx LIMIT ?")
    row_at = {json.dumps(v, ensure_ascii=False): n for n, v in enumerate(rows)}
    col_at = {json.dumps(v, ensure_ascii=False): n for n, v in enumerate(cols)}
    for r, c, image_id, path, width, height, task_id in store.db.execute(sql, [*head, *args, MAX_CELLS * 20]):
        key = (row_at.get(r, 0) if row_axis else 0, col_at.get(c, 0) if col_axis else 0)
        if (row_axis and r not in row_at) or (col_axis and c not in col_at):
            continue
        grid.cells.setdefault(key, {"id": image_id, "path": path, "width": width, "height": height,
                                    "task_id": task_id})
    return grid


@dataclass(frozen=True)
class Layout:
    """Where everything sits on a contact sheet (tests read the cells' boxes from it)."""

    cell: int
    label_width: int
    header: int
    rows: int
    cols: int

    @property
    def size(self) -> tuple[int, int]:
        return (self.label_width + self.cols * (self.cell + MARGIN) + MARGIN,
                self.header + self.rows * (self.cell + MARGIN) + MARGIN)

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        x = self.label_width + MARGIN + col * (self.cell + MARGIN)
        y = self.header + MARGIN + row * (self.cell + MARGIN)
        return (x, y, x + self.cell, y + self.cell)

    def column_label_box(self, col: int) -> tuple[int, int, int, int]:
        x0, _, x1, _ = self.cell_box(0, col)
        return (x0, 0, x1, self.header)

    def row_label_box(self, row: int) -> tuple[int, int, int, int]:
        _, y0, _, y1 = self.cell_box(row, 0)
        return (0, y0, self.label_width, y1)


def layout(grid: Grid, cell: int = CELL) -> Layout:
    rows, cols = len(grid.rows), len(grid.cols)
    fit = min((MAX_SIDE - LABEL_WIDTH - MARGIN) // cols - MARGIN, (MAX_SIDE - HEADER - MARGIN) // rows - MARGIN)
    return Layout(max(16, min(cell, fit)), LABEL_WIDTH, HEADER, rows, cols)


@functools.lru_cache(maxsize=1)
def font_file() -> tuple[str | None, bool]:
    """(a TrueType font file, whether it covers Chinese): a CJK font when fontconfig knows one, else DejaVu
    Sans or Liberation Sans (Chinese labels then show as boxes), else None (Pillow's own font)."""
    if shutil.which("fc-list"):
        try:
            found = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=5)
            files = sorted(line.split(":")[0].strip() for line in found.stdout.splitlines() if line.strip())
            if files:
                return files[0], True
        except (OSError, subprocess.SubprocessError):
            pass
    for path in FALLBACK_FONTS:
        if Path(path).is_file():
            return path, False
    return None, False


def _font(size: int) -> Any:
    path, _ = font_file()
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    return ImageFont.load_default(size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """The text, cut with an ellipsis so it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(output_dir: Path, grid: Grid, target: Path, cell: int = CELL) -> Layout:
    """Draw the grid as one PNG: column labels on top, row labels on the left, each cell its image scaled to
    fit (a grey square where a task has no image). The labels are also kept as PNG text ('comfybatch-grid')."""
    lay = layout(grid, cell)
    sheet = Image.new("RGB", lay.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(14)
    for c, value in enumerate(grid.cols):
        x0, y0, x1, y1 = lay.column_label_box(c)
        draw.text((x0 + 2, y1 - 22), _fit(draw, grid.label(grid.col_axis, value), font, x1 - x0 - 4), fill=INK,
                  font=font)
    for r, value in enumerate(grid.rows):
        x0, y0, x1, y1 = lay.row_label_box(r)
        draw.text((x0 + MARGIN, (y0 + y1) // 2 - 8), _fit(draw, grid.label(grid.row_axis, value), font,
                                                          x1 - x0 - 2 * MARGIN), fill=INK, font=font)
    for r in range(len(grid.rows)):
        for c in range(len(grid.cols)):
            box = lay.cell_box(r, c)
            image = grid.cells.get((r, c))
            if image is None:
                draw.rectangle(box, fill=EMPTY)
                continue
            try:
                with Image.open(thumbs.source_path(output_dir, image["path"])) as im:
                    im.draft("RGB", (lay.cell, lay.cell))
                    picture = im.convert("RGB")
                    picture.thumbnail((lay.cell, lay.cell))
            except (OSError, NotFound):  # the file is gone (deleted after an upload): an empty cell
                draw.rectangle(box, fill=EMPTY)
                continue
            sheet.paste(picture, (box[0] + (lay.cell - picture.width) // 2, box[1] + (lay.cell - picture.height) // 2))
    info = PngImagePlugin.PngInfo()
    info.add_itxt("comfybatch-grid", json.dumps({
        "batch": grid.batch_id, "rows": [grid.label(grid.row_axis, v) for v in grid.rows],
        "cols": [grid.label(grid.col_axis, v) for v in grid.cols],
        "fixed": {k: show(v) for k, v in grid.fixed.items()}}, ensure_ascii=False))
    sheet.save(target, "PNG", pnginfo=info)
    return lay


def _safe(text: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", text, flags=re.UNICODE).strip("_")[:60] or "_"


def grid_zip(output_dir: Path, grid: Grid, target: Path) -> int:
    """The grid's images in a ZIP, named `r01_<row value>__c02_<column value>.<ext>`; returns how many."""
    count = 0
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as zf:
        for (r, c), image in sorted(grid.cells.items()):
            path = output_dir / image["path"]
            if not path.is_file():
                continue
            name = (f"r{r + 1:02d}_{_safe(grid.label(grid.row_axis, grid.rows[r]))}__"
                    f"c{c + 1:02d}_{_safe(grid.label(grid.col_axis, grid.cols[c]))}{path.suffix}")
            zf.write(path, arcname=name)
            count += 1
    return count
