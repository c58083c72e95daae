"""Parameter sweeps (X/Y/Z): a row whose values include lists stands for every combination of those lists.

A row `{"prompt": ["a cat", "a dog"], "cfg": [4, 7, 10], "seed": 5}` makes 2 x 3 = 6 tasks. Every face gives
lists the same way: JSON lists in the API, one value per line on the Generate page, and in a CSV cell (or the
Generate page's "other inputs") a JSON array:

    prompt,cfg,steps
    "[""a cat"", ""a dog""]","[4, 7, 10]",20

A cell is a list when it starts with `[`, ends with `]` and reads as a JSON array of plain values (text,
numbers, true/false); any other cell is one value as before, so a prompt such as `[masterpiece] a cat` stays
text. A cell that starts with `["` but is not valid JSON is refused (it was meant as a list).

Limits, checked before anything is expanded: at most `MAX_AXES` lists in a row, at most
`COMFYBATCH_MAX_SWEEP_VALUES` values in one list, and the product (times the count) counts against
`COMFYBATCH_MAX_TASKS` like any other tasks (core.intake). The product is computed from the list lengths;
combinations are generated one at a time.

A random seed is drawn once per row for the whole sweep (each copy adds one), so the cells of a comparison
grid differ only by what the lists vary, as in other image tools.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from typing import Any

from core.errors import InputError, Problem, clip

MAX_AXES = 6
SCALARS = (str, int, float, bool)


def axes(params: dict[str, Any]) -> dict[str, list[Any]]:
    """The swept parameters of a row and their values, in the row's order."""
    return {k: list(v) for k, v in params.items() if isinstance(v, (list, tuple))}


def size(params: dict[str, Any]) -> int:
    """How many combinations a row stands for (1 without lists), from the lengths alone."""
    return math.prod(len(v) for v in params.values() if isinstance(v, (list, tuple)))


def combinations(params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each combination as a plain row, the first list varying slowest; one at a time, never all at once."""
    swept = axes(params)
    if not swept:
        yield dict(params)
        return
    names = list(swept)
    for values in itertools.product(*swept.values()):
        yield {**params, **dict(zip(names, values, strict=True))}


def check(params: dict[str, Any], max_values: int) -> list[Problem]:
    """Problems of a row's lists: too many lists, an empty or too long list, a value that is not plain."""
    problems = []
    swept = axes(params)
    if len(swept) > MAX_AXES:
        problems.append(Problem(f"{len(swept)} parameters have lists ({', '.join(swept)}); at most {MAX_AXES} in "
                                "one row", code="too_large"))
    for name, values in swept.items():
        if not values:
            problems.append(Problem("an empty list: give at least one value", parameter=name, code="invalid"))
        elif len(values) > max_values:
            problems.append(Problem(f"a list of {len(values):,} values; at most {max_values:,} "
                                    "(COMFYBATCH_MAX_SWEEP_VALUES)", parameter=name, code="too_large"))
        elif bad := next((v for v in values if not isinstance(v, SCALARS)), None):
            problems.append(Problem(f"a list may hold text, numbers or true/false, got {clip(repr(bad), 60)}",
                                    parameter=name, code="wrong_type"))
        elif len({json.dumps(v) for v in values}) != len(values):
            problems.append(Problem("the list repeats a value; give each value once", parameter=name,
                                    code="invalid"))
    return problems


def parse_cell(text: str) -> list[Any] | None:
    """A CSV cell's list (the JSON array syntax above), or None when the cell is one plain value. Raises
    InputError for a cell that starts like a list of text (`["`) but is not valid JSON."""
    value = text.strip()
    if not (value.startswith("[") and value.endswith("]")) and not value.startswith('["'):
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        if value.startswith('["'):
            raise InputError(f"looks like a list of values but is not a JSON array ({exc.msg} at character "
                             f"{exc.pos + 1}); write it as [\"a cat\", \"a dog\"] or [4, 7, 10]") from None
        return None
    except RecursionError:  # nested thousands deep: not a list of plain values either
        return None
    if not isinstance(parsed, list) or not all(isinstance(v, SCALARS) for v in parsed):
        return None  # e.g. [[1, 2]]: not a list of plain values; kept as text
    return parsed


def merge_axes(found: dict[str, list[Any]], row_axes: dict[str, Any]) -> None:
    """Add one job's swept values to a batch's axes, keeping the order values were first given."""
    for name, value in row_axes.items():
        values = found.setdefault(name, [])
        if value not in values:
            values.append(value)
