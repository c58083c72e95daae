"""The OpenAPI 3.0 document of the HTTP API, served at /api/v1/openapi.json. Written by hand beside the
route table (api.app.ENDPOINTS); tests/test_api.py fails when a route is missing here or a path here has no
route, and fuzzes every operation with schemathesis, checking each reply against this document.

Every constant comes from the code that enforces it, never re-typed: the prefix (api.calls), the statuses
(core.models), the limits of a submission (core.intake, and the running server's Settings), page sizes and
stream timeouts (api.endpoints, api.events), the fields of a problem (core.errors.Problem). Pure: a dict out.
"""

from __future__ import annotations

import re
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

from api import endpoints, events
from api.calls import MAX_ID, PREFIX
from core import thumbs
from core.config import Settings
from core.errors import Problem
from core.intake import MAX_IMAGES, MAX_NAME, MAX_PRIORITY, MAX_WEBHOOK_URL
from core.models import ALL_STATUSES
from core.workflows import KINDS

# The `status` filter of GET /tasks: one or more statuses, comma-separated (spaces around them allowed), in
# each of one or more `status` values; an empty value is no filter (api.calls.Call.statuses reads it so).
_ONE_STATUS = " *(?:" + "|".join(re.escape(s) for s in ALL_STATUSES) + ") *"
STATUS_LIST = f"^{_ONE_STATUS}(?:,{_ONE_STATUS})*$"
NO_NUL = "^[^\\x00]*$"  # text the server refuses when it holds a NUL character


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        reply["headers"] = headers
    return reply


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "required": True, "schema": {"type": "string", "minLength": 1}}


ERROR_TEXT = {
    400: "The request cannot be read (malformed JSON, a bad query value).",
    401: "No token, or a wrong one, while COMFYBATCH_API_TOKENS is set.",
    404: "No such id (or path).", 409: "The task is not in a state that allows this.",
    413: "The body is larger than COMFYBATCH_MAX_UPLOAD_MB.", 415: "The body has the wrong content type.",
    422: "The request was read but is not valid; every problem is listed. Nothing was changed.",
    503: "The API is not started (the server could not load its settings).",
}


def _errors(*codes: int) -> dict[str, Any]:
    """Error replies: the given codes, and on every operation 401 (token) and 503 (not started)."""
    replies = {str(c): _json(_ref("Error"), ERROR_TEXT[c]) for c in sorted({401, 503, *codes})}
    replies["401"]["headers"] = {"WWW-Authenticate": _header("`Bearer realm=\"ComfyBatch\"` (and the error).")}
    return replies


def _path_id(name: str, what: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": f"The {what} id.",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}, "example": 1}


def _query(name: str, schema: dict[str, Any], description: str, empty: bool = True) -> dict[str, Any]:
    """An optional query parameter; `empty`: the server reads an empty value as the parameter left out."""
    parameter = {"name": name, "in": "query", "required": False, "description": description, "schema": schema}
    if empty:
        parameter["allowEmptyValue"] = True
    return parameter


def _id_query(name: str, description: str) -> dict[str, Any]:
    return _query(name, {"type": "integer", "minimum": 1, "maximum": MAX_ID}, description)


def _paging(max_offset: int) -> list[dict[str, Any]]:
    return [_query("limit", {"type": "integer", "minimum": 1, "maximum": endpoints.MAX_PAGE_SIZE,
                             "default": endpoints.PAGE_SIZE}, "Page size."),
            _query("offset", {"type": "integer", "minimum": 0, "maximum": max_offset, "default": 0},
                   "Items to skip.")]


def _event_filters() -> list[dict[str, Any]]:
    return [_query("after", {"type": "integer", "minimum": 0, "maximum": MAX_ID, "default": 0},
                   "Only events with a larger id."),
            _id_query("batch_id", "Only this batch's events."), _id_query("task_id", "Only this task's events.")]


PRIORITY = {"type": "integer", "minimum": -MAX_PRIORITY, "maximum": MAX_PRIORITY, "description": "Higher runs first."}
WEBHOOK = {"type": "string", "format": "uri", "maxLength": MAX_WEBHOOK_URL, "nullable": True,
           "description": "An http(s) URL POSTed a signed JSON summary once every task of the batch is final."}
PRIORITY_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["priority"], "additionalProperties": False,
    "properties": {"priority": PRIORITY}}}}}
SERVER_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["url"], "additionalProperties": False,
    "properties": {"url": {"type": "string", "description": "A configured server's URL, as /health lists it."}}}}}}
SERVER_STATES = ["active", "draining", "drained", "quarantined", "disabled"]
SCALAR = {"description": "Text, a number or true/false (null: the template's value, or a random seed).",
          "anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
PARAMS = {"type": "object", "additionalProperties": SCALAR,
          "description": "Parameter name (named, `<node id>.<input>` or `<node title>.<input>`) -> value."}
BINARY = {"type": "string", "format": "binary"}
STRING = {"type": "string"}
INTEGER = {"type": "integer"}
URL = {"type": "string", "description": "Absolute."}


def _object(properties: dict[str, Any], required: bool = True, **extra: Any) -> dict[str, Any]:
    """An object whose listed properties are always present (`required`)."""
    schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(properties)
    return schema


def _list(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


def _op(summary: str, responses: dict[str, Any], parameters: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None, description: str = "") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = body
    return op


def paths(settings: Settings) -> dict[str, dict[str, Any]]:
    batch_id, task_id, image_id = _path_id("batch_id", "batch"), _path_id("task_id", "task"), _path_id(
        "image_id", "image")
    json_body = (400, 413, 415, 422)  # what any operation that reads a JSON body may answer
    attachment = {"Content-Disposition": _header("`attachment; filename=...`.")}
    submitted = {
        "201": _json(_ref("Submitted"), "Enqueued; `Location` is the (first) batch.",
                     {"Location": _header("The URL of the (first) batch.")}),
        "200": _json(_ref("DryRun"), "`dry_run`: what would be enqueued; nothing was.")}
    return {
        "/": {"get": _op("Links to the main collections", {
            "200": _json(_object({"name": STRING, "version": STRING, **{f"{k}_url": URL for k in (
                "openapi", "health", "workflows", "batches", "tasks", "events")}}), "Links."), **_errors()})},
        "/openapi.json": {"get": _op("This document", {"200": _json(_object({
            "openapi": STRING, "info": {"type": "object"}, "paths": {"type": "object"}}), "OpenAPI 3.0."),
            **_errors()})},
        "/health": {"get": _op("Health of the app, its scheduler and every ComfyUI server", {
            "200": _json(_ref("Health"), "Always 200 when the app answers; see `status`."), **_errors()})},
        "/workflows": {"get": _op("Workflows and their parameter schemas", {"200": _json(_object({
            "workflows": _list(_ref("Workflow")), "problems": _list(STRING)}),
            "Every loadable workflow, and one sentence per file that could not be loaded."), **_errors()})},
        "/workflows/{name}": {"get": _op("One workflow", {"200": _json(_ref("Workflow"), "The workflow."),
                                                           **_errors(404)},
                                         [{"name": "name", "in": "path", "required": True,
                                           "schema": STRING, "example": "empty_image"}])},
        "/batches": {
            "get": _op("Batches, newest first", {"200": _json(_object({
                "batches": _list(_ref("Batch")), "limit": INTEGER, "offset": INTEGER,
                "next": {**URL, "nullable": True}}), "A page of batches."), **_errors(400)},
                _paging(endpoints.MAX_BATCH_OFFSET)),
            "post": _op("Submit a batch from rows or one prompt", {**submitted, **_errors(*json_body)},
                        body={"required": True, "content": {"application/json": {"schema": _ref("Submission")}}},
                        description="Checked like the CLI: a 422 lists every problem (row, parameter, reason) "
                                    "and enqueues nothing."),
        },
        "/batches/csv": {"post": _op("Submit a CSV file (and the input images it names), as the Batch page does", {
            **submitted, **_errors(*json_body)}, body={"required": True, "content": {"multipart/form-data": {
                "schema": {"type": "object", "required": ["workflow", "csv"], "properties": {
                    "workflow": STRING, "csv": BINARY,
                    "images": {"type": "array", "items": BINARY, "maxItems": MAX_IMAGES,
                               "description": "Files the CSV's image column names (by file name)."},
                    "name": {"type": "string", "maxLength": MAX_NAME}, "priority": PRIORITY,
                    "count": {"type": "integer", "minimum": 1, "maximum": settings.max_count},
                    "dry_run": {"type": "boolean"}, "webhook": WEBHOOK}}}},
                "description": f"At most {settings.max_csv_mb:g} MB of CSV and {settings.max_rows:,} rows."})},
        "/batches/{batch_id}": {"get": _op("A batch: counts by status, progress, ETA, links", {
            "200": _json(_ref("Batch"), "The batch."), **_errors(404)}, [batch_id])},
        "/batches/{batch_id}/images": {"get": _op("A batch's images", {"200": _json(_object({
            "batch_id": INTEGER, "images": _list(_ref("Image"))}), "Every image."), **_errors(404)}, [batch_id])},
        "/batches/{batch_id}/images.zip": {"get": _op("A batch's images as a ZIP", {
            "200": {"description": "ZIP (stored, not recompressed).", "headers": attachment,
                    "content": {"application/zip": {"schema": BINARY}}}, **_errors(404)}, [batch_id])},
        "/batches/{batch_id}/results.csv": {"get": _op("A batch's results as CSV (row -> seed, status, files)", {
            "200": {"description": "CSV, UTF-8 with BOM.", "headers": attachment,
                    "content": {"text/csv": {"schema": STRING}}}, **_errors(404)}, [batch_id])},
        "/batches/{batch_id}/cancel": {"post": _op("Cancel every unfinished task of a batch", {
            "200": _json(_object({"cancelled": _list(INTEGER), "cancelling": _list(INTEGER), "batch": _ref("Batch")}),
                         "`cancelled` (were queued), `cancelling` (on a server)."), **_errors(404)}, [batch_id])},
        "/batches/{batch_id}/retry": {"post": _op("Requeue every failed or cancelled task of a batch", {
            "200": _json(_object({"requeued": _list(INTEGER), "batch": _ref("Batch")}), "`requeued` task ids."),
            **_errors(404)}, [batch_id])},
        "/batches/{batch_id}/priority": {"post": _op("Set the priority of every task of a batch", {
            "200": _json(_object({"updated": INTEGER, "priority": INTEGER, "batch": _ref("Batch")}), "Updated."),
            **_errors(404, *json_body)}, [batch_id], PRIORITY_BODY)},
        "/batches/{batch_id}/pause": {"post": _op("Pause a batch: nothing more of it starts; what runs finishes", {
            "200": _json(_object({"batch": _ref("Batch")}), "Paused (kept across restarts)."), **_errors(404)},
            [batch_id])},
        "/batches/{batch_id}/resume": {"post": _op("Resume a paused batch where it stopped", {
            "200": _json(_object({"batch": _ref("Batch")}), "Resumed."), **_errors(404)}, [batch_id])},
        "/batches/{batch_id}/run-next": {"post": _op("Move a batch ahead of every other batch at its priority", {
            "200": _json(_object({"batch": _ref("Batch")}), "Runs next (higher priorities still go first)."),
            **_errors(404)}, [batch_id])},
        "/queue": {"get": _op("Whether the whole queue is paused, and tasks by status", {
            "200": _json(_ref("Queue"), "The queue."), **_errors()})},
        "/queue/pause": {"post": _op("Pause the whole queue: nothing new starts; what runs finishes", {
            "200": _json(_ref("Queue"), "Paused (kept across restarts)."), **_errors()})},
        "/queue/resume": {"post": _op("Resume the whole queue", {
            "200": _json(_ref("Queue"), "Resumed."), **_errors()})},
        "/servers/drain": {"post": _op("Drain a server: no new work; it finishes what it has, then shows drained", {
            "200": _json(_ref("ServerState"), "Draining (or drained)."), **_errors(404, *json_body)},
            body=SERVER_BODY)},
        "/servers/undrain": {"post": _op("Put a drained server back to work", {
            "200": _json(_ref("ServerState"), "Active again."), **_errors(404, *json_body)}, body=SERVER_BODY)},
        "/tasks": {"get": _op("Tasks, filtered and paged", {"200": _json(_object({
            "tasks": _list(_ref("Task")), "total": INTEGER, "limit": INTEGER, "offset": INTEGER,
            "next": {**URL, "nullable": True}}), "A page of tasks."), **_errors(400)}, [
            _id_query("batch_id", "Only this batch."),
            _query("status", {"type": "array", "items": {"type": "string", "pattern": STATUS_LIST}},
                   f"Only these statuses ({', '.join(ALL_STATUSES)}): repeat the parameter, or comma-separate."),
            _query("workflow", STRING, "Only this workflow."),
            _query("q", {"type": "string", "pattern": NO_NUL}, "Prompt text contains this."),
            _query("order", {"type": "string", "enum": list(endpoints.ORDERS), "default": endpoints.ORDERS[0]},
                   "By id.", empty=False), *_paging(endpoints.MAX_TASK_OFFSET)])},
        "/tasks/{task_id}": {"get": _op("A task: status, progress, attempts, server, error, parameters, seed, images",
                                        {"200": _json(_ref("TaskDetail"), "The task."), **_errors(404)}, [task_id])},
        "/tasks/{task_id}/events": {"get": _op("A task's status history", {"200": _json(_object({
            "task_id": INTEGER, "events": _list(_ref("Event"))}), "Oldest first."), **_errors(404)}, [task_id])},
        "/tasks/{task_id}/cancel": {"post": _op("Cancel a task (queued: at once; on a server: removed/interrupted)", {
            "200": _json(_object({"cancelled": _list(INTEGER), "cancelling": _list(INTEGER), "task": _ref("Task")}),
                         "Done or under way."), **_errors(404, 409)}, [task_id])},
        "/tasks/{task_id}/retry": {"post": _op("Requeue a failed or cancelled task", {
            "200": _json(_object({"requeued": _list(INTEGER), "task": _ref("Task")}), "Requeued."),
            **_errors(404, 409)}, [task_id])},
        "/tasks/{task_id}/priority": {"post": _op("Set a task's priority", {
            "200": _json(_object({"updated": INTEGER, "priority": INTEGER, "task": _ref("Task")}), "Updated."),
            **_errors(404, *json_body)}, [task_id], PRIORITY_BODY)},
        "/images/{image_id}": {"get": _op("An image, bytes exactly as ComfyUI made them", {
            "200": {"description": "The file, with the media type of its name.", "content": {
                "image/*": {"schema": BINARY}, "application/octet-stream": {"schema": BINARY}}}, **_errors(404)},
            [image_id])},
        "/images/{image_id}/thumbnail": {"get": _op(f"A thumbnail (at most {thumbs.THUMB_SIZE} px)", {
            "200": {"description": "The thumbnail.", "content": {thumbs.THUMB_FORMAT[2]: {"schema": BINARY}}},
            **_errors(404)}, [image_id])},
        "/events": {"get": _op("Status changes as a JSON page (poll with `after` = `last_id`)", {
            "200": _json(_object({"events": _list(_ref("Event")), "last_id": INTEGER, "latest_id": INTEGER,
                                  "next": URL}),
                         "Oldest first. `last_id`: where the next page starts; `latest_id`: the newest event of all."),
            **_errors(400)}, [*_event_filters(), _query(
                "limit", {"type": "integer", "minimum": 1, "maximum": events.MAX_EVENTS_PAGE,
                          "default": events.EVENTS_PAGE}, "Most events returned.")])},
        "/events/stream": {"get": _op("Status changes as server-sent events", {
            "200": {"description": "`text/event-stream`: each event's `id` is its event id and `data` an Event as "
                                   "JSON. Reconnect with `Last-Event-ID` (or `after`) to resume.",
                    "content": {"text/event-stream": {"schema": STRING}}}, **_errors(400)},
            [*_event_filters(), _query(
                "timeout", {"type": "integer", "minimum": 1, "maximum": events.STREAM_MAX_SECONDS,
                            "default": events.STREAM_SECONDS},
                "Seconds before the server ends the stream (clients reconnect)."),
             {"name": "Last-Event-ID", "in": "header", "required": False, "schema": STRING,
              "description": "Resume after this event id (sent by EventSource on reconnect)."}])},
    }


def _problem_item() -> dict[str, Any]:
    """A `problems` item: the keys of core.errors.Problem.as_dict(), typed from Problem's own fields."""
    hints = get_type_hints(Problem)
    properties: dict[str, Any] = {}
    for key in Problem("").as_dict():
        hint = hints.get(key, str)  # `reason` is the bare `message`
        options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
        kinds = [t for t in options if t is not type(None)]
        schema: dict[str, Any] = {"type": "integer" if kinds == [int] else "string"}
        if len(kinds) < len(options) or key == "node":  # `node` falls back to the target's node: still optional
            schema["nullable"] = True
        properties[key] = schema
    properties["message"]["description"] = "The problem as one sentence, with where it is."
    properties["reason"]["description"] = "Why, without where."
    properties["code"]["description"] = "A stable kind: invalid, unknown, required, too_large, ..."
    return _object(properties, additionalProperties=False)


def schemas(settings: Settings) -> dict[str, Any]:
    nullable_int = {"type": "integer", "nullable": True}
    nullable_num = {"type": "number", "nullable": True}
    nullable_str = {"type": "string", "nullable": True}
    status = {"type": "string", "enum": list(ALL_STATUSES)}
    fraction = {"type": "number", "minimum": 0, "maximum": 1}
    task = _object({
        "id": INTEGER, "batch_id": INTEGER, "row_number": nullable_int, "workflow": STRING, "prompt": STRING,
        "seed": nullable_int, "status": status, "priority": INTEGER, "server": nullable_str,
        "prompt_id": nullable_str, "attempts": INTEGER, "progress_value": nullable_int,
        "progress_max": nullable_int, "progress": fraction, "error": nullable_str, "created_at": {"type": "number"},
        "submitted_at": nullable_num, "started_at": nullable_num, "finished_at": nullable_num,
        "cancel_requested": {"type": "boolean"}, "url": URL, "batch_url": URL},
        description="Times are Unix seconds.")
    return {
        "Error": _object({"error": {"type": "string", "description": "A sentence saying what is wrong."},
                          "problems": _list(_problem_item())}, additionalProperties=False),
        "Submission": {
            "type": "object", "required": ["workflow"], "additionalProperties": False,
            "example": {"workflow": "empty_image", "rows": [{"color": 255, "width": 32}, {"1.color": 65280}],
                        "name": "example"},
            "description": "Either `rows`, or `prompt` and/or `params` (one job repeated `count` times). "
                           f"At most {settings.max_rows:,} rows and {settings.max_tasks:,} tasks.",
            "properties": {
                "workflow": {"type": "string", "description": "A name from GET /workflows."},
                "rows": {"type": "array", "minItems": 1, "items": PARAMS, "description": "One job per row."},
                "prompt": STRING, "params": PARAMS,
                "count": {"type": "integer", "minimum": 1, "maximum": settings.max_count, "default": 1,
                          "description": "Jobs per row (a fixed seed counts up: seed, seed+1, ...)."},
                "name": {"type": "string", "maxLength": MAX_NAME, "nullable": True},
                "priority": {**PRIORITY, "default": 0},
                "images": {"type": "object", "additionalProperties": {"type": "string", "format": "byte"},
                           "maxProperties": MAX_IMAGES,
                           "description": "Input images: file name -> base64; image parameters name them."},
                "dry_run": {"type": "boolean", "default": False,
                            "description": "Check and resolve only; enqueue nothing (200)."},
                "webhook": WEBHOOK}},
        "Preflight": _object({
            "servers": {**_list(STRING), "nullable": True, "description": "Where the tasks go; null: any server."},
            "preflight": _list(_object({"url": STRING, "reachable": {"type": "boolean"}, "ok": {"type": "boolean"},
                                        "problems": _list(STRING), "error": nullable_str}, required=False))}),
        "Submitted": {"allOf": [_ref("Preflight"), _object({
            "batch_ids": _list(INTEGER), "task_ids": _list(INTEGER), "batches": _list(_ref("Batch"))})]},
        "DryRun": {"allOf": [_ref("Preflight"), _object({
            "dry_run": {"type": "boolean", "enum": [True]}, "tasks": INTEGER,
            "jobs": _list(_object({"row": nullable_int, "batch_name": nullable_str,
                                   "parameters": {"type": "object"}}))})]},
        "Batch": _object({
            "id": INTEGER, "name": STRING, "workflow": STRING, "priority": INTEGER, "created_at": {"type": "number"},
            "counts": {"type": "object", "additionalProperties": INTEGER,
                       "description": f"Tasks by status ({', '.join(ALL_STATUSES)})."},
            "paused": {"type": "boolean", "description": "Nothing more of it starts until resumed."},
            "run_next": {"type": "boolean", "description": "Marked to go ahead of other batches at its priority."},
            "submitted_by": {**nullable_str, "description": "Who submitted it: a signed-in person, the owner of the "
                             "API token used (\"api\" for a COMFYBATCH_API_TOKENS token), \"cli\", or \"local\" "
                             "(no sign-in configured); null for batches made before people were recorded."},
            "total": INTEGER, "done": INTEGER, "progress": fraction,
            "eta_seconds": {**nullable_num, "description": "Seconds left, from the measured run times of its workflow "
                            "on the servers that can take it now; null: unknown (no measurement yet, no server, "
                            "or paused)."},
            "eta_at": {**nullable_num, "description": "The estimated finish time (Unix seconds); null: unknown."},
            "images": INTEGER, "stored_remotely": {**INTEGER, "description": "Images uploaded to object storage."},
            "upload_pending": INTEGER, "upload_failed": INTEGER,
            "webhook": {"type": "object", "nullable": True, "description": "The batch's webhook (null: none): url, "
                        "state (waiting, pending, sending, delivered, failed), attempts, next_at, last_error and "
                        "calls (attempt, at, status_code, error, seconds)."},
            "url": URL, "tasks_url": URL, "images_url": URL, "zip_url": URL, "csv_url": URL, "events_url": URL}),
        "Task": task,
        "TaskDetail": {"allOf": [task, _object({
            "params": {"type": "object", "description": "The parameters as submitted."},
            "parameters": {"type": "object", "description": "Every value the task ran with (resolved seed too)."},
            "images": _list(_ref("Image")), "events_url": URL})]},
        "Image": _object({
            "id": INTEGER, "task_id": INTEGER, "batch_id": INTEGER, "node_id": STRING, "index": INTEGER,
            "path": STRING, "filename": STRING, "width": nullable_int, "height": nullable_int,
            "size_bytes": nullable_int, "created_at": nullable_num,
            "url": {**URL, "description": "The object store's URL (presigned or public) once the image is stored "
                                         "there, else local_url."},
            "local_url": URL, "thumbnail_url": URL,
            "storage": {"type": "string", "nullable": True, "enum": ["pending", "uploading", "stored", "failed", None],
                        "description": "Upload to object storage: null when storage was off as the image was made."},
            "storage_key": nullable_str}),
        "Event": _object({"id": INTEGER, "task_id": INTEGER, "batch_id": INTEGER, "status": status,
                          "at": {"type": "number"}, "detail": nullable_str,
                          "actor": {**nullable_str, "description": "Who caused it, when a person acted on "
                                    "someone else's batch (a cancel, a pause, a retry)."}}),
        "Workflow": _object({
            "name": STRING, "title": nullable_str, "description": nullable_str, "declared": {"type": "boolean"},
            "parameters": _list(_object({
                "name": STRING, "target": STRING,
                "type": {"type": "string", "enum": list(KINDS)},
                "default": {}, "label": STRING, "minimum": nullable_num, "maximum": nullable_num,
                "choices": {"type": "array", "nullable": True, "items": {}}, "required": {"type": "boolean"},
                "multiline": {"type": "boolean"}, "help": nullable_str})),
            "node_inputs": {**_list(_object({"key": STRING, "node_class": nullable_str, "type": STRING,
                                             "default": {}})),
                            "description": "Other inputs a row may set as `<node id>.<input>`."},
            "presets": {}, "url": URL}),
        "Queue": _object({"paused": {"type": "boolean", "description": "Nothing new starts while true."},
                          "counts": {"type": "object", "additionalProperties": INTEGER,
                                     "description": "Tasks by status."}}),
        "ServerState": _object({"url": STRING, "state": {"type": "string", "enum": SERVER_STATES},
                                "draining": {"type": "boolean"},
                                "in_flight": {**INTEGER, "description": "Our tasks still on it."},
                                "models": {**_list(STRING), "description": "The model files its last task loaded."},
                                "quarantined_until": {**nullable_num, "description": "Unix seconds; set while "
                                                      "quarantined after repeated failures."},
                                "quarantine_reason": nullable_str}),
        "Health": _object({
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "scheduler": _object({"running": {"type": "boolean"}, "owner": nullable_str, "host": nullable_str,
                                  "pid": nullable_int}),
            "counts": {"type": "object", "additionalProperties": INTEGER, "description": "Tasks by status."},
            "servers": _list(_object({"url": STRING, "enabled": {"type": "boolean"},
                                      "state": {"type": "string", "enum": SERVER_STATES},
                                      "draining": {"type": "boolean"}, "in_flight": INTEGER,
                                      "models": _list(STRING),
                                      "quarantined_until": nullable_num, "quarantine_reason": nullable_str,
                                      "fed_by": {**nullable_str, "description": "The scheduler process feeding "
                                                 "it (`pid N on HOST`: the app or a `python -m core worker`); "
                                                 "null while none holds its lease."}},
                                     required=True))}),
    }


def document(base_url: str, settings: Settings) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "ComfyBatch API", "version": "1",
                 "description": "Bulk image generation on ComfyUI servers. Errors are "
                                "`{\"error\": sentence, \"problems\": [...]}`. When COMFYBATCH_API_TOKENS is set, "
                                "every request needs `Authorization: Bearer <token>`."},
        "servers": [{"url": base_url}],
        "security": [{"bearer": []}],
        "paths": {PREFIX + path: ops for path, ops in paths(settings).items()},
        "components": {"schemas": schemas(settings),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
