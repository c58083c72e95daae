"""JSON shapes of the HTTP API: batches, tasks, images, workflows and events as clients see them, every URL
absolute (built by the caller's `url` function from settings.public_url or the request). Pure: rows in,
dicts out; the only reads are the ones a shape needs (a task's images, a batch's summary)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core import queries, service, workflows
from core.config import Settings
from core.errors import ComfyBatchError
from core.store import Store
from core.workflows import Param, Workflow

Url = Callable[[str], str]
TASK_FIELDS = ("id", "batch_id", "row_number", "workflow", "prompt", "seed", "status", "priority", "server",
               "prompt_id", "attempts", "progress_value", "progress_max", "error", "created_at", "submitted_at",
               "started_at", "finished_at")


def batch_json(store: Store, batch_id: int, url: Url) -> dict[str, Any]:
    summary = service.batch_summary(store, batch_id)
    base = f"/batches/{batch_id}"
    return {**summary, "url": url(base), "tasks_url": url(f"/tasks?batch_id={batch_id}"),
            "images_url": url(f"{base}/images"), "zip_url": url(f"{base}/images.zip"),
            "csv_url": url(f"{base}/results.csv"), "events_url": url(f"/events/stream?batch_id={batch_id}")}


def task_json(task: dict[str, Any], url: Url) -> dict[str, Any]:
    """A task as listed: status, progress, attempts, server, error; no graph."""
    data = {k: task.get(k) for k in TASK_FIELDS}
    data["progress"] = queries.task_progress(task)
    data["cancel_requested"] = bool(task.get("cancel_requested"))
    data["url"] = url(f"/tasks/{task['id']}")
    data["batch_url"] = url(f"/batches/{task['batch_id']}")
    return data


def task_detail_json(settings: Settings, store: Store, task: dict[str, Any], workflow: Workflow | None,
                     url: Url) -> dict[str, Any]:
    """A task with the parameters it was given, every value it ran with (the resolved seed included), its
    images and its status history."""
    data = task_json(task, url)
    data["params"] = task.get("params") or {}
    data["parameters"] = queries.task_parameters(task, workflow)
    data["images"] = [image_json(settings, img, url) for img in store.images_for_task(task["id"])]
    data["events_url"] = url(f"/tasks/{task['id']}/events")
    return data


def image_json(settings: Settings, image: dict[str, Any], url: Url) -> dict[str, Any]:
    """An image; `url` is the object store's (presigned or public) once it is stored there, else this API's.
    `storage` is the upload state: null (storage off when it was made), pending, uploading, stored, failed."""
    local = url(f"/images/{image['id']}")
    return {"id": image["id"], "task_id": image["task_id"], "batch_id": image["batch_id"],
            "node_id": image["node_id"], "index": image["idx"], "path": image["path"],
            "filename": image["path"].replace("\\", "/").rsplit("/", 1)[-1], "width": image.get("width"),
            "height": image.get("height"), "size_bytes": image.get("size_bytes"),
            "created_at": image.get("created_at"), "url": service.image_link(settings, image) or local,
            "local_url": local, "thumbnail_url": url(f"/images/{image['id']}/thumbnail"),
            "storage": image.get("remote_state"), "storage_key": image.get("remote_key")}


def event_json(event: dict[str, Any]) -> dict[str, Any]:
    return {"id": event["id"], "task_id": event["task_id"], "batch_id": event["batch_id"],
            "status": event["status"], "at": event["at"], "detail": event.get("detail"), "actor": event.get("actor")}


def workflow_json(wf: Workflow, url: Url) -> dict[str, Any]:
    """A workflow with its named parameters and every other input a row may set as `<node id>.<input>`."""
    named = {(p.node_id, p.input_name) for p in wf.params.values()}
    addressable = []
    for node_id in sorted(wf.graph, key=workflows.id_order):
        node = wf.graph[node_id]
        for input_name, value in node.get("inputs", {}).items():
            if (node_id, input_name) in named or isinstance(value, list):
                continue  # named already, or a link (links cannot be overwritten)
            key = f"{node_id}.{input_name}"
            addressable.append({"key": key, "node_class": node.get("class_type"), "type": wf.param_for(key).kind,
                                "default": value})
    return {"name": wf.name, "title": wf.title, "description": wf.description, "declared": wf.declared,
            "parameters": [param_json(p) for p in wf.params.values()], "node_inputs": addressable,
            "presets": wf.presets,
            "url": url(f"/workflows/{wf.name}")}


def param_json(p: Param) -> dict[str, Any]:
    return {"name": p.name, "target": p.target, "type": p.kind, "default": p.default, "label": p.label or p.name,
            "minimum": p.minimum, "maximum": p.maximum, "choices": list(p.choices) if p.choices else None,
            "required": p.required, "multiline": p.multiline, "help": getattr(p, "help", "")}


def load_workflow_quietly(settings_dir: Any, name: str) -> Workflow | None:
    """The task's workflow if it still loads (a deleted or broken template only costs the named view)."""
    try:
        return workflows.get_workflow(settings_dir, name)
    except ComfyBatchError:
        return None

