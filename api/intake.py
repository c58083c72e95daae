"""Reading a submission off an HTTP request: a JSON body (rows, or one prompt with parameters and a count) or a
multipart CSV upload, turned into the engine's `Submission`. Only HTTP concerns live here (the body's syntax,
field names, base64, file parts); everything about the values is checked by `service.submit`, the same path
the CLI and the pages take, so a request gets the same answers they do.

Problems with the request's shape are collected as typed Problems on the Submission and reported together with
the rows' own problems, so one reply names everything to fix. Input images come only from the request (base64
in JSON, files in the multipart form): a value naming anything else is refused by the engine, so a client can
never make the server read a file of its own disk.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

from core import csvin
from core.config import Settings
from core.errors import InputError, Problem, clip
from core.intake import Row, Submission
from core.workflows import show

JSON_FIELDS = ("workflow", "rows", "prompt", "params", "count", "name", "priority", "images", "dry_run", "webhook")
FORM_FIELDS = ("workflow", "count", "name", "priority", "dry_run", "webhook")
FILE_FIELDS = ("csv", "images")


class BadRequest(InputError):
    """The body cannot be read at all (not JSON, not UTF-8): HTTP 400 rather than 422."""


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
        raise BadRequest(f"the request body is not valid JSON: {str(exc)[:200]}") from None
    bad = _first_bad_string(data)
    if bad is not None:
        raise BadRequest(f"the request body holds text that is not valid Unicode near {bad!r}")
    return data


def json_submission(data: Any) -> Submission:
    """A JSON body as a Submission; what is wrong with its shape goes into `problems`."""
    if not isinstance(data, dict):
        raise InputError('the request body must be a JSON object like {"workflow": "empty_image", "rows": [...]}')
    problems = [Problem(f"not a field of this request (the fields are: {', '.join(JSON_FIELDS)})", field=clip(k),
                        code="unknown") for k in data if k not in JSON_FIELDS]
    workflow = data.get("workflow")
    if workflow is not None and not isinstance(workflow, str):
        problems.append(Problem(f"expected the name of a workflow, got {show(workflow)}", field="workflow"))
        workflow = ""
    dry_run = data.get("dry_run", False)
    if not isinstance(dry_run, bool):
        problems.append(Problem(f"expected true or false, got {show(dry_run)}", field="dry_run"))
    name = data.get("name")
    if isinstance(name, str):
        name = name.strip() or None
    return Submission(workflow or "", _rows(data, problems), count=data.get("count", 1), name=name,
                      priority=data.get("priority", 0), images=_json_images(data.get("images"), problems),
                      source="api", dry_run=dry_run is True, problems=problems, webhook=data.get("webhook"))


def form_submission(settings: Settings, fields: dict[str, list[str]], files: dict[str, list[tuple[str, bytes]]]
                    ) -> Submission:
    """A multipart CSV upload as a Submission; the CSV is read by the engine's one CSV reader."""
    problems = [Problem(f"not a field of this form (the fields are: {', '.join((*FILE_FIELDS, *FORM_FIELDS))})",
                        field=clip(k), code="unknown") for k in [*fields, *files] if k not in (*FORM_FIELDS,
                                                                                               *FILE_FIELDS)]
    problems += [Problem(f"given {len(v)} times; give it once", field=k) for k, v in fields.items()
                 if k in FORM_FIELDS and len(v) > 1]
    value = {k: v[0] for k, v in fields.items()}
    images: dict[str, bytes] = {}
    for name, data in files.get("images", []):
        safe = safe_filename(name)
        if safe:
            images[safe] = data
        else:
            problems.append(Problem(f"{clip(name)!r} is not a usable file name", field="images"))
    dry_run = value.get("dry_run", "false").strip().lower()
    if dry_run not in ("true", "false", "1", "0", "yes", "no", ""):
        problems.append(Problem(f"expected true or false, got {clip(dry_run)!r}", field="dry_run"))
    sub = Submission(value.get("workflow", "").strip(), [], count=_form_int(value.get("count", "1")),
                     name=value.get("name", "").strip() or None, priority=_form_int(value.get("priority", "0")),
                     images=images, dry_run=dry_run in ("true", "1", "yes"), problems=problems,
                     webhook=value.get("webhook", "").strip() or None)
    csv_files = files.get("csv", [])
    if len(csv_files) != 1:
        problems.append(Problem(f"send exactly one CSV file (got {len(csv_files)})", field="csv"))
        return sub
    filename = safe_filename(csv_files[0][0]) or "upload.csv"
    sub.source = sub.file = filename
    try:
        sub.rows = csvin.read_rows(csv_files[0][1], filename, settings.max_csv_bytes, settings.max_rows,
                                   settings.max_count)
    except InputError as exc:  # the file as a whole (size, encoding, header): reported with the other fields
        problems.append(Problem(exc.summary, field="csv", code="unreadable"))
        problems.extend(p.at(file=filename) for p in exc.problems)
    return sub


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


def _rows(data: dict[str, Any], problems: list[Problem]) -> list[Row]:
    has_rows = "rows" in data
    has_single = "prompt" in data or "params" in data
    if has_rows and has_single:
        problems.append(Problem("give either 'rows' (a list of parameter objects) or 'prompt'/'params' (one job), "
                                "not both", field="rows"))
        return []
    if not has_rows and not has_single:
        problems.append(Problem("give 'rows' (a list of parameter objects, one job each) or 'prompt' and/or "
                                "'params' (one job, repeated 'count' times)", field="rows", code="required"))
        return []
    if has_rows:
        rows = data["rows"]
        if not isinstance(rows, list) or not rows:
            problems.append(Problem(f"expected a non-empty list of objects, got {show(rows)}", field="rows"))
            return []
        checked = []
        for number, row in enumerate(rows, start=1):
            if isinstance(row, dict):
                checked.append(Row(row, number=number))
            else:
                checked.append(Row({}, number=number, problems=[Problem(
                    f"expected an object of parameters, got {show(row)}", code="wrong_type")]))
        return checked
    params = data.get("params", {})
    if not isinstance(params, dict):
        problems.append(Problem(f"expected an object of parameters, got {show(params)}", field="params"))
        params = {}
    row = dict(params)
    if "prompt" in data:
        if not isinstance(data["prompt"], str):
            problems.append(Problem(f"expected text, got {show(data['prompt'])}", field="prompt"))
        elif "prompt" in row:
            problems.append(Problem("give the prompt once: as 'prompt' or as params.prompt", field="prompt"))
        else:
            row["prompt"] = data["prompt"]
    return [Row(row)]


def _form_int(raw: str) -> Any:
    text = raw.strip()
    if text.removeprefix("-").isascii() and text.removeprefix("-").isdigit() and len(text) <= 20:
        return int(text)
    return raw


def _json_images(value: Any, problems: list[Problem]) -> dict[str, bytes]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(Problem(f"expected an object of file name -> base64 data, got {show(value)}",
                                field="images"))
        return {}
    images = {}
    for name, data in value.items():
        if safe_filename(name) != name:
            problems.append(Problem(f"{clip(name)!r} is not a plain file name (no folders, not hidden)",
                                    field="images"))
        elif not isinstance(data, str):
            problems.append(Problem(f"'{name}': expected base64 text, got {show(data)}", field="images"))
        else:
            try:
                images[name] = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                problems.append(Problem(f"'{name}': not valid base64", field="images"))
    return images


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
