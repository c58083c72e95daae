"""Submissions over HTTP: a JSON body (rows, or one prompt with parameters and a count) or a multipart CSV
upload, checked the way the CLI and the Batch page check them (`service.build_jobs`) and enqueued all or
nothing (`service.enqueue`). Pure apart from those two calls.

Every problem with the request's shape is collected before the rows are checked, and then reported together
with the rows' own problems, so one reply names everything to fix. Input images come only from the request
(base64 in JSON, files in the multipart form): a value that names anything else is refused, so a client can
never make the server read a file of its own disk.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import csvin, service
from core.config import Settings
from core.errors import InputError, NotFound, WorkflowError
from core.store import Store
from core.workflows import Workflow

JSON_FIELDS = ("workflow", "rows", "prompt", "params", "count", "name", "priority", "images", "dry_run")
FORM_FIELDS = ("workflow", "count", "name", "priority", "dry_run")
MAX_ROWS = 10_000
MAX_TASKS = 20_000  # rows x count in one request
MAX_COUNT = 1000
MAX_PRIORITY = 1_000_000
MAX_INT = 2**63 - 1  # what SQLite can store
MAX_NAME = 200
_ROW = re.compile(r"\brow (\d+)\b")


class BadRequest(InputError):
    """The body cannot be read at all (not JSON, not UTF-8): HTTP 400 rather than 422."""


@dataclass
class Intake:
    """A submission whose shape is valid; `problems` holds what the row checks should report with it."""

    workflow: str
    rows: list[dict[str, Any]]
    row_numbers: list[int] | None
    count: int = 1
    name: str | None = None
    priority: int = 0
    images: dict[str, bytes] | None = None
    dry_run: bool = False
    problems: list[str] = field(default_factory=list)  # found in the request's shape, reported with the rows'
    csv_name: str = "upload.csv"
    csv_data: bytes | None = None


def parse_json(body: bytes) -> Any:
    """The request body as JSON; BadRequest naming line and column when it is not."""
    if not body.strip():
        raise BadRequest("the request body is empty: send a JSON object like "
                         '{"workflow": "empty_image", "rows": [{"1.color": 255}]}')
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                         ) from None
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    bad = _first_bad_string(data)
    if bad is not None:
        raise BadRequest(f"the request body holds text that is not valid Unicode near {bad!r}")
    return data


def read_json_submission(data: Any) -> Intake:
    if not isinstance(data, dict):
        raise InputError('the request body must be a JSON object like {"workflow": "empty_image", "rows": [...]}')
    problems = [f"unknown field '{k}' (the fields are: {', '.join(JSON_FIELDS)})" for k in data
                if k not in JSON_FIELDS]
    workflow = data.get("workflow")
    if not isinstance(workflow, str) or not workflow.strip():
        problems.append("field 'workflow': required, the name of a workflow (GET /api/v1/workflows lists them)")
        workflow = ""
    rows, numbers = _rows(data, problems)
    count = _int_field(data.get("count", 1), "count", 1, MAX_COUNT, problems)
    priority = _int_field(data.get("priority", 0), "priority", -MAX_PRIORITY, MAX_PRIORITY, problems)
    name = _name(data.get("name"), problems)
    images = _json_images(data.get("images"), problems)
    dry_run = data.get("dry_run", False)
    if not isinstance(dry_run, bool):
        problems.append(f"field 'dry_run': expected true or false, got {_show(dry_run)}")
    if len(rows) * count > MAX_TASKS:
        problems.append(f"{len(rows)} row(s) x count {count} would make {len(rows) * count} tasks; at most "
                        f"{MAX_TASKS} per request (split the batch)")
        rows, numbers = [], None
    return Intake(workflow.strip(), rows, numbers, count, name, priority, images, dry_run is True, problems)


def read_form_submission(fields: dict[str, list[str]], csv_files: list[tuple[str, bytes]],
                         images: dict[str, bytes], problems: list[str]) -> Intake:
    """Checks of a multipart CSV upload (its rows are read by `submit_csv`)."""
    problems += [f"unknown form field '{k}' (the fields are: csv, images, {', '.join(FORM_FIELDS)})"
                 for k in fields if k not in FORM_FIELDS]
    problems += [f"form field '{k}' is given {len(v)} times; give it once" for k, v in fields.items() if len(v) > 1]
    value = {k: v[0] for k, v in fields.items()}
    workflow = value.get("workflow", "").strip()
    if not workflow:
        problems.append("form field 'workflow': required, the name of a workflow (GET /api/v1/workflows lists them)")
    if len(csv_files) != 1:
        problems.append(f"form field 'csv': send exactly one CSV file (got {len(csv_files)})")
    count = _int_field(_form_int(value.get("count", "1")), "count", 1, MAX_COUNT, problems)
    priority = _int_field(_form_int(value.get("priority", "0")), "priority", -MAX_PRIORITY, MAX_PRIORITY, problems)
    name = _name(value.get("name") or None, problems)
    dry_run = value.get("dry_run", "false").strip().lower()
    if dry_run not in ("true", "false", "1", "0", "yes", "no", ""):
        problems.append(f"form field 'dry_run': expected true or false, got {dry_run!r}")
    intake = Intake(workflow, [], None, count, name, priority, images, dry_run in ("true", "1", "yes"), problems)
    if len(csv_files) == 1:
        intake.csv_name = safe_filename(csv_files[0][0]) or "upload.csv"
        intake.csv_data = csv_files[0][1]
    return intake


def submit_json(settings: Settings, store: Store, intake: Intake) -> service.Submitted:
    """Check every row (also when the request has other problems, so one reply names them all), then
    preflight and enqueue all or nothing."""
    problems = list(intake.problems)
    workflow, urls = _workflow(settings, store, intake.workflow, problems)
    jobs: list[service.Job] = []
    if workflow is not None and intake.rows:
        numbers: list[int | None] = [*intake.row_numbers] if intake.row_numbers else [None] * len(intake.rows)
        row_problems = [_check_images(workflow, row, intake.images or {}, n)
                        for row, n in zip(intake.rows, numbers, strict=True)]
        try:
            jobs = service.build_jobs(settings, workflow, intake.rows, count=intake.count,
                                      images=intake.images or {}, row_numbers=intake.row_numbers,
                                      row_problems=row_problems)
        except InputError as exc:
            # The engine names JSON rows with an empty source (" row 2: ..."): trim that.
            problems.extend(p.strip() for p in exc.problems or [exc.summary])
    _raise_if(problems)
    assert workflow is not None
    return _enqueue(store, workflow, jobs, urls, intake, "api")


def submit_csv(settings: Settings, store: Store, intake: Intake) -> service.Submitted:
    """What `service.submit_csv` does, except that image cells may only name uploaded files."""
    problems = list(intake.problems)
    workflow, urls = _workflow(settings, store, intake.workflow, problems) if intake.workflow else (None, [])
    jobs: list[service.Job] = []
    filename = intake.csv_name
    if workflow is not None and intake.csv_data is not None:
        try:
            parsed = csvin.read_csv(intake.csv_data, filename)
            if not parsed:
                raise InputError(f"{filename}: the file has a header but no rows")
            if len(parsed) > MAX_ROWS or sum(r.count or intake.count for r in parsed) > MAX_TASKS:
                raise InputError(f"{filename}: more than {MAX_TASKS} tasks in one upload; split the file")
            images = intake.images or {}
            for row in parsed:
                row.problems.extend(_check_images(workflow, row.params, images, row.row_number, filename))
            jobs = service.build_jobs(settings, workflow, [r.params for r in parsed], count=intake.count,
                                      source=filename, images=images, row_numbers=[r.row_number for r in parsed],
                                      counts=[r.count for r in parsed], batch_names=[r.batch_name for r in parsed],
                                      row_problems=[r.problems for r in parsed])
        except csv.Error as exc:
            problems.append(f"{filename}: not a readable CSV file ({exc})")
        except InputError as exc:
            problems.extend(exc.problems or [exc.summary])
    _raise_if(problems)
    assert workflow is not None
    return _enqueue(store, workflow, jobs, urls, intake, filename)


# -- pieces -----------------------------------------------------------------------------------------
def _enqueue(store: Store, workflow: Workflow, jobs: list[service.Job], urls: list[str], intake: Intake,
             source: str) -> service.Submitted:
    """Preflight on the enabled servers (routing the batch to those that can run it), then enqueue."""
    reports, servers = service.route(workflow, jobs, urls)
    if intake.dry_run:
        return service.Submitted([], [], jobs, reports, servers)
    result = service.enqueue(store, workflow, jobs, intake.name, intake.priority, source=source, servers=servers)
    result.reports, result.servers = reports, servers
    return result


def _raise_if(problems: list[str]) -> None:
    """One InputError naming every problem, those of the request first, then row by row."""
    if problems:
        def row_of(text: str) -> int:
            found = _ROW.search(text)
            return int(found.group(1)) if found else 0

        raise InputError(f"{len(problems)} problem(s) found; nothing was enqueued", sorted(problems, key=row_of))


def _workflow(settings: Settings, store: Store, name: str, problems: list[str]
              ) -> tuple[Workflow | None, list[str]]:
    """The workflow (with the choices the servers offer) and the enabled servers' URLs; (None, []) with a
    problem when it cannot be used."""
    if not name:
        return None, []
    try:
        name.encode("utf-8")
        return service.workflow_for_servers(settings, store, name)
    except (NotFound, UnicodeEncodeError) as exc:
        problems.append(f"field 'workflow': {exc}")
    except WorkflowError as exc:
        problems.append(f"field 'workflow': {exc.summary}")
        problems.extend(exc.problems)
    return None, []


def _check_images(workflow: Workflow, row: dict[str, Any], images: dict[str, bytes], number: int | None,
                  source: str = "") -> list[str]:
    """Problems of the row's image parameters; a bad one is removed from the row, so the engine never goes
    looking for it on disk."""
    problems = []
    where = (f"{source} row {number}: " if source else f"row {number}: ") if number is not None else ""
    for key in list(row):
        try:
            param = workflow.param_for(key)
        except InputError:
            continue  # reported by the engine's own check
        if param.kind != "image":
            continue
        value = row[key]
        if isinstance(value, str) and value in images:
            continue
        del row[key]
        sent = ", ".join(sorted(images)) or "none"
        problems.append(f"{where}parameter '{key}': image {_show(value)} was not uploaded with the request "
                        f"(images sent: {sent})")
    return problems


def _rows(data: dict[str, Any], problems: list[str]) -> tuple[list[dict[str, Any]], list[int] | None]:
    has_rows = "rows" in data
    has_single = "prompt" in data or "params" in data
    if has_rows and has_single:
        problems.append("give either 'rows' (a list of parameter objects) or 'prompt'/'params' (one job), not both")
        return [], None
    if not has_rows and not has_single:
        problems.append("give 'rows' (a list of parameter objects, one job each) or 'prompt' and/or 'params' "
                        "(one job, repeated 'count' times)")
        return [], None
    if has_rows:
        rows = data["rows"]
        if not isinstance(rows, list) or not rows:
            problems.append(f"field 'rows': expected a non-empty list of objects, got {_show(rows)}")
            return [], None
        if len(rows) > MAX_ROWS:
            problems.append(f"field 'rows': {len(rows)} rows; at most {MAX_ROWS} per request")
            return [], None
        checked, numbers = [], []
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                problems.append(f"row {number}: expected an object of parameters, got {_show(row)}")
                continue
            checked.append(_scalars(row, f"row {number}: ", problems))
            numbers.append(number)
        return checked, numbers
    params = data.get("params", {})
    if not isinstance(params, dict):
        problems.append(f"field 'params': expected an object of parameters, got {_show(params)}")
        params = {}
    row = _scalars(params, "", problems)
    if "prompt" in data:
        if not isinstance(data["prompt"], str):
            problems.append(f"field 'prompt': expected text, got {_show(data['prompt'])}")
        elif "prompt" in row:
            problems.append("give the prompt once: as 'prompt' or as params.prompt")
        else:
            row["prompt"] = data["prompt"]
    return [row], None


def _scalars(row: dict[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    """A copy of the row without the values no parameter can take (objects, lists, huge numbers), each of
    them reported once here rather than again by the engine."""
    kept = {}
    for key, value in row.items():
        if isinstance(value, (dict, list)):
            problems.append(f"{where}parameter '{key}': expected text, a number, true/false or null, got "
                            f"{_show(value)}")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            problems.append(f"{where}parameter '{key}': {value} is too large")
        else:
            kept[key] = value
    return kept


def _int_field(value: Any, field: str, low: int, high: int, problems: list[str]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        problems.append(f"field '{field}': expected a whole number from {low} to {high}, got {_show(value)}")
        return max(low, 0) if low <= 0 <= high else low
    return value


def _form_int(raw: str) -> Any:
    try:
        return int(raw.strip())
    except ValueError:
        return raw


def _name(value: Any, problems: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_NAME:
        problems.append(f"field 'name': expected text of at most {MAX_NAME} characters, got {_show(value)}")
        return None
    return value.strip() or None


def _json_images(value: Any, problems: list[str]) -> dict[str, bytes]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"field 'images': expected an object of file name -> base64 data, got {_show(value)}")
        return {}
    images = {}
    for name, data in value.items():
        if safe_filename(name) != name:
            problems.append(f"field 'images': {name!r} is not a plain file name (no folders, not hidden)")
        elif not isinstance(data, str):
            problems.append(f"field 'images': '{name}': expected base64 text, got {_show(data)}")
        else:
            try:
                images[name] = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                problems.append(f"field 'images': '{name}': not valid base64")
    return images


def safe_filename(name: str | None) -> str:
    """The last part of an uploaded file's name, or '' when nothing usable is left."""
    base = Path(str(name or "").replace("\\", "/")).name.strip()
    if not base or base.startswith(".") or len(base) > 255 or any(ord(c) < 32 for c in base):
        return ""
    try:
        base.encode("utf-8")
    except UnicodeEncodeError:
        return ""
    return base


def _show(value: Any) -> str:
    kind = {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(type(value))
    text = json.dumps(value, ensure_ascii=False, default=str)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{kind} {text}" if kind else text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _first_bad_string(data: Any) -> str | None:
    """The first string (key or value) that cannot be encoded as UTF-8 (a lone surrogate from \\ud800)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item.encode("utf-8", "backslashreplace").decode()[:40]
    return None
