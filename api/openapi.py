"""The OpenAPI 3.0 document of the HTTP API, served at /api/v1/openapi.json. Written by hand beside the
route table (api.app.ENDPOINTS); tests/test_api.py fails when a route is missing here or a
path here has no route. Pure: a dict out."""

from __future__ import annotations

from typing import Any

from api.calls import PREFIX
from core.config import Settings
from core.models import ALL_STATUSES

STATUSES = list(ALL_STATUSES)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "The request cannot be read (malformed JSON, a bad query value).",
            401: "No token, or a wrong one, while COMFYBATCH_API_TOKENS is set.",
            404: "No such id (or path).", 409: "The task is not in a state that allows this.",
            413: "The body is larger than COMFYBATCH_MAX_UPLOAD_MB.", 415: "The body has the wrong content type.",
            422: "The request was read but is not valid; every problem is listed. Nothing was changed."}
    return {str(c): _json(_ref("Error"), text[c]) for c in (401, *codes)}


def _path_id(name: str, what: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": f"The {what} id.",
            "schema": {"type": "integer", "minimum": 1}, "example": 1}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


PAGING = [_query("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "Page size."),
          _query("offset", {"type": "integer", "minimum": 0, "default": 0}, "Items to skip.")]
EVENT_FILTERS = [_query("after", {"type": "integer", "minimum": 0, "default": 0}, "Only events with a larger id."),
                 _query("batch_id", {"type": "integer", "minimum": 1}, "Only this batch's events."),
                 _query("task_id", {"type": "integer", "minimum": 1}, "Only this task's events.")]
PRIORITY_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["priority"], "additionalProperties": False,
    "properties": {"priority": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000,
                                "description": "Higher runs first."}}}}}}
SCALAR = {"description": "Text, a number or true/false (null: the template's value, or a random seed).",
          "anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
PARAMS = {"type": "object", "additionalProperties": SCALAR,
          "description": "Parameter name (named, `<node id>.<input>` or `<node title>.<input>`) -> value."}


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


def paths() -> dict[str, dict[str, Any]]:
    batch_id, task_id, image_id = _path_id("batch_id", "batch"), _path_id("task_id", "task"), _path_id(
        "image_id", "image")
    binary = {"type": "string", "format": "binary"}
    return {
        "/": {"get": _op("Links to the main collections", {"200": _json({"type": "object"}, "Links.")})},
        "/openapi.json": {"get": _op("This document", {"200": _json({"type": "object"}, "OpenAPI 3.0.")})},
        "/health": {"get": _op("Health of the app, its scheduler and every ComfyUI server",
                               {"200": _json(_ref("Health"), "Always 200 when the app answers; see `status`.")})},
        "/workflows": {"get": _op("Workflows and their parameter schemas", {"200": _json({
            "type": "object", "properties": {"workflows": {"type": "array", "items": _ref("Workflow")},
                                             "problems": {"type": "array", "items": {"type": "string"}}}},
            "Every loadable workflow, and one sentence per file that could not be loaded.")})},
        "/workflows/{name}": {"get": _op("One workflow", {"200": _json(_ref("Workflow"), "The workflow."),
                                                           **_errors(404)},
                                         [{"name": "name", "in": "path", "required": True,
                                           "schema": {"type": "string"}, "example": "empty_image"}])},
        "/batches": {
            "get": _op("Batches, newest first", {"200": _json({"type": "object", "properties": {
                "batches": {"type": "array", "items": _ref("Batch")}, "next": {"type": "string", "nullable": True}}},
                "A page of batches."), **_errors(400)}, PAGING),
            "post": _op("Submit a batch from rows or one prompt", {
                "201": _json(_ref("Submitted"), "Enqueued; `Location` is the (first) batch."),
                "200": _json({"type": "object"}, "`dry_run`: what would be enqueued."),
                **_errors(400, 413, 415, 422)},
                body={"required": True, "content": {"application/json": {"schema": _ref("Submission")}}},
                description="Checked like the CLI: a 422 lists every problem (row, parameter, reason) and "
                            "enqueues nothing."),
        },
        "/batches/csv": {"post": _op("Submit a CSV file (and the input images it names), as the Batch page does", {
            "201": _json(_ref("Submitted"), "Enqueued."), "200": _json({"type": "object"}, "`dry_run` result."),
            **_errors(400, 413, 415, 422)}, body={"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["workflow", "csv"], "properties": {
                    "workflow": {"type": "string"}, "csv": binary,
                    "images": {"type": "array", "items": binary,
                               "description": "Files the CSV's image column names (by file name)."},
                    "name": {"type": "string"}, "priority": {"type": "integer"},
                    "count": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "dry_run": {"type": "boolean"}}}}}})},
        "/batches/{batch_id}": {"get": _op("A batch: counts by status, progress, ETA, links", {
            "200": _json(_ref("Batch"), "The batch."), **_errors(404)}, [batch_id])},
        "/batches/{batch_id}/images": {"get": _op("A batch's images", {"200": _json({"type": "object", "properties": {
            "images": {"type": "array", "items": _ref("Image")}}}, "Every image."), **_errors(404)}, [batch_id])},
        "/batches/{batch_id}/images.zip": {"get": _op("A batch's images as a ZIP", {
            "200": {"description": "ZIP (stored, not recompressed).",
                    "content": {"application/zip": {"schema": binary}}}, **_errors(404)}, [batch_id])},
        "/batches/{batch_id}/results.csv": {"get": _op("A batch's results as CSV (row -> seed, status, files)", {
            "200": {"description": "CSV, UTF-8 with BOM.", "content": {"text/csv": {"schema": {"type": "string"}}}},
            **_errors(404)}, [batch_id])},
        "/batches/{batch_id}/cancel": {"post": _op("Cancel every unfinished task of a batch", {
            "200": _json({"type": "object"}, "`cancelled` (were queued), `cancelling` (on a server)."),
            **_errors(404)}, [batch_id])},
        "/batches/{batch_id}/retry": {"post": _op("Requeue every failed or cancelled task of a batch", {
            "200": _json({"type": "object"}, "`requeued` task ids."), **_errors(404)}, [batch_id])},
        "/batches/{batch_id}/priority": {"post": _op("Set the priority of every task of a batch", {
            "200": _json({"type": "object"}, "Updated."), **_errors(400, 404, 422)}, [batch_id], PRIORITY_BODY)},
        "/tasks": {"get": _op("Tasks, filtered and paged", {"200": _json({"type": "object", "properties": {
            "tasks": {"type": "array", "items": _ref("Task")}, "total": {"type": "integer"},
            "next": {"type": "string", "nullable": True}}}, "A page of tasks."), **_errors(400)}, [
            _query("batch_id", {"type": "integer", "minimum": 1}, "Only this batch."),
            _query("status", {"type": "string", "enum": STATUSES}, "Only these statuses (repeat, or comma-separate)."),
            _query("workflow", {"type": "string"}, "Only this workflow."),
            _query("q", {"type": "string"}, "Prompt text contains this."),
            _query("order", {"type": "string", "enum": ["desc", "asc"], "default": "desc"}, "By id."), *PAGING])},
        "/tasks/{task_id}": {"get": _op("A task: status, progress, attempts, server, error, parameters, seed, images",
                                        {"200": _json(_ref("TaskDetail"), "The task."), **_errors(404)}, [task_id])},
        "/tasks/{task_id}/events": {"get": _op("A task's status history", {"200": _json({
            "type": "object", "properties": {"events": {"type": "array", "items": _ref("Event")}}}, "Oldest first."),
            **_errors(404)}, [task_id])},
        "/tasks/{task_id}/cancel": {"post": _op("Cancel a task (queued: at once; on a server: removed/interrupted)", {
            "200": _json({"type": "object"}, "Done or under way."), **_errors(404, 409)}, [task_id])},
        "/tasks/{task_id}/retry": {"post": _op("Requeue a failed or cancelled task", {
            "200": _json({"type": "object"}, "Requeued."), **_errors(404, 409)}, [task_id])},
        "/tasks/{task_id}/priority": {"post": _op("Set a task's priority", {
            "200": _json({"type": "object"}, "Updated."), **_errors(400, 404, 422)}, [task_id], PRIORITY_BODY)},
        "/images/{image_id}": {"get": _op("An image, bytes exactly as ComfyUI made them", {
            "200": {"description": "The file.", "content": {"image/png": {"schema": binary}}}, **_errors(404)},
            [image_id])},
        "/images/{image_id}/thumbnail": {"get": _op("A WebP thumbnail (at most 320 px)", {
            "200": {"description": "WebP.", "content": {"image/webp": {"schema": binary}}}, **_errors(404)},
            [image_id])},
        "/events": {"get": _op("Status changes as a JSON page (poll with `after` = `last_id`)", {
            "200": _json({"type": "object", "properties": {"events": {"type": "array", "items": _ref("Event")},
                                                           "last_id": {"type": "integer"},
                                                           "latest_id": {"type": "integer"}}},
                   "Oldest first. `last_id`: where the next page starts; `latest_id`: the newest event of all."),
            **_errors(400)}, [*EVENT_FILTERS, _query("limit", {"type": "integer", "minimum": 1, "maximum": 5000},
                                                     "Most events returned.")])},
        "/events/stream": {"get": _op("Status changes as server-sent events", {
            "200": {"description": "`text/event-stream`: each event's `id` is its event id and `data` an Event as "
                                   "JSON. Reconnect with `Last-Event-ID` (or `after`) to resume.",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}}, **_errors(400)},
            [*EVENT_FILTERS, _query("timeout", {"type": "integer", "minimum": 1, "maximum": 300, "default": 30},
                                    "Seconds before the server ends the stream (clients reconnect)."),
             {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"},
              "description": "Resume after this event id (sent by EventSource on reconnect)."}])},
    }


def schemas() -> dict[str, Any]:
    nullable_int = {"type": "integer", "nullable": True}
    nullable_num = {"type": "number", "nullable": True}
    nullable_str = {"type": "string", "nullable": True}
    image = {"type": "object", "properties": {
        "id": {"type": "integer"}, "task_id": {"type": "integer"}, "batch_id": {"type": "integer"},
        "node_id": {"type": "string"}, "index": {"type": "integer"}, "path": {"type": "string"},
        "filename": {"type": "string"}, "width": nullable_int, "height": nullable_int, "size_bytes": nullable_int,
        "url": {"type": "string", "description": "The object store's URL (presigned or public) once the image is "
                                                 "stored there, else local_url."},
        "local_url": {"type": "string"}, "thumbnail_url": {"type": "string"},
        "storage": {"type": "string", "nullable": True, "enum": ["pending", "uploading", "stored", "failed", None],
                    "description": "Upload to object storage: null when storage was off as the image was made."},
        "storage_key": nullable_str}}
    task = {"type": "object", "properties": {
        "id": {"type": "integer"}, "batch_id": {"type": "integer"}, "row_number": nullable_int,
        "workflow": {"type": "string"}, "prompt": {"type": "string"}, "seed": nullable_int,
        "status": {"type": "string", "enum": STATUSES}, "priority": {"type": "integer"}, "server": nullable_str,
        "attempts": {"type": "integer"}, "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "error": nullable_str, "created_at": {"type": "number"}, "submitted_at": nullable_num,
        "started_at": nullable_num, "finished_at": nullable_num, "cancel_requested": {"type": "boolean"},
        "url": {"type": "string"}, "batch_url": {"type": "string"}},
        "description": "Times are Unix seconds."}
    return {
        "Error": {"type": "object", "required": ["error", "problems"], "properties": {
            "error": {"type": "string", "description": "A sentence saying what is wrong."},
            "problems": {"type": "array", "items": {"type": "object", "properties": {
                "message": {"type": "string"}, "row": nullable_int, "parameter": nullable_str}}}}},
        "Submission": {
            "type": "object", "required": ["workflow"], "additionalProperties": False,
            "example": {"workflow": "empty_image", "rows": [{"color": 255, "width": 32}, {"1.color": 65280}],
                        "name": "example"},
            "description": "Either `rows`, or `prompt` and/or `params` (one job repeated `count` times).",
            "properties": {
                "workflow": {"type": "string", "description": "A name from GET /workflows."},
                "rows": {"type": "array", "minItems": 1, "items": PARAMS, "description": "One job per row."},
                "prompt": {"type": "string"}, "params": PARAMS,
                "count": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1,
                          "description": "Jobs per row (a fixed seed counts up: seed, seed+1, ...)."},
                "name": {"type": "string", "maxLength": 200, "nullable": True},
                "priority": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000, "default": 0},
                "images": {"type": "object", "additionalProperties": {"type": "string", "format": "byte"},
                           "description": "Input images: file name -> base64; image parameters name them."},
                "dry_run": {"type": "boolean", "default": False,
                            "description": "Check and resolve only; enqueue nothing (200)."}}},
        "Submitted": {"type": "object", "properties": {
            "batch_ids": {"type": "array", "items": {"type": "integer"}},
            "task_ids": {"type": "array", "items": {"type": "integer"}},
            "batches": {"type": "array", "items": _ref("Batch")}}},
        "Batch": {"type": "object", "properties": {
            "id": {"type": "integer"}, "name": {"type": "string"}, "workflow": {"type": "string"},
            "priority": {"type": "integer"}, "created_at": {"type": "number"},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"},
                       "description": "Tasks by status."},
            "total": {"type": "integer"}, "done": {"type": "integer"},
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "eta_seconds": nullable_num, "images": {"type": "integer"},
            "stored_remotely": {"type": "integer", "description": "Images uploaded to object storage."},
            "upload_pending": {"type": "integer"}, "upload_failed": {"type": "integer"},
            "url": {"type": "string"}, "tasks_url": {"type": "string"},
            "images_url": {"type": "string"}, "zip_url": {"type": "string"}, "csv_url": {"type": "string"},
            "events_url": {"type": "string"}}},
        "Task": task,
        "TaskDetail": {"allOf": [task, {"type": "object", "properties": {
            "params": {"type": "object", "description": "The parameters as submitted."},
            "parameters": {"type": "object", "description": "Every value the task ran with (resolved seed too)."},
            "images": {"type": "array", "items": _ref("Image")}, "events_url": {"type": "string"}}}]},
        "Image": image,
        "Event": {"type": "object", "properties": {
            "id": {"type": "integer"}, "task_id": {"type": "integer"}, "batch_id": {"type": "integer"},
            "status": {"type": "string", "enum": STATUSES}, "at": {"type": "number"}, "detail": nullable_str}},
        "Workflow": {"type": "object", "properties": {
            "name": {"type": "string"}, "title": {"type": "string"}, "description": {"type": "string"},
            "parameters": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "target": {"type": "string"},
                "type": {"type": "string", "enum": ["int", "float", "string", "bool", "seed", "image"]},
                "default": {}, "minimum": nullable_num, "maximum": nullable_num,
                "choices": {"type": "array", "nullable": True, "items": {}}, "required": {"type": "boolean"}}}},
            "node_inputs": {"type": "array", "description": "Other inputs a row may set as `<node id>.<input>`.",
                            "items": {"type": "object"}}}},
        "Health": {"type": "object", "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "scheduler": {"type": "object"}, "counts": {"type": "object"},
            "servers": {"type": "array", "items": {"type": "object"}}}},
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
        "paths": {PREFIX + path: ops for path, ops in paths().items()},
        "components": {"schemas": schemas(),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
