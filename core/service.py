"""The engine's front door: the functions the pages, the CLI and the HTTP API all call to submit, cancel,
retry, re-prioritise, export, manage servers and read health. No face writes through Store directly.

Acting: every function that changes state takes the acting user (`actor`, a core.users.Actor: a signed-in
person, an API token's owner, the CLI's "cli", or LOCAL when no sign-in is configured) and refuses with
Forbidden what the role does not allow: servers, drains and the whole queue's pause are an admin's; a member
acts only on their own batches. An admin acting on someone else's batch leaves an event saying so.

Submitting: every face builds a `Submission` (core.intake) and calls `submit`, which checks the request's
limits before expanding anything, checks every row, preflights the graphs on the enabled servers and enqueues
all or nothing. Side effects: the database (through Store), input images copied into the content-addressed
input folder, workflow files written by `add_workflow`, and (for cancel) nothing on ComfyUI directly: the
scheduler that owns a task's server carries a cancel out. With object storage on, `sync_storage` uploads
(the scheduler's uploader does it otherwise), and links, ZIPs and file routes read from the store.
"""

from __future__ import annotations

import io
import json
import random
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core import (
    acting,
    backends,
    csvin,
    exports,
    files,
    grids,
    preflight,
    queries,
    sessions,
    storage,
    sweeps,
    thumbs,
    uploads,
    webhooks,
    workflows,
)
from core.comfy import ComfyClient, probe
from core.config import Settings, parse_urls
from core.errors import ConfigError, InputError, NotFound, Problem, StorageError, sort_key
from core.intake import (
    MAX_PRIORITY,
    Job,
    Row,
    Submission,
    build_jobs,
    check_request,
    input_dir,
    task_count,
    whole_number,
)
from core.models import FINAL, RETRYABLE, UNFINISHED, TaskStatus
from core.scheduler import LEASE
from core.store import Store
from core.users import LOCAL, Actor, require_admin, require_owner
from core.workflows import Workflow

__all__ = ["Job", "Row", "Submission", "Submitted", "input_dir", "submit", "task_count"]


@dataclass
class Submitted:
    batch_ids: list[int]
    task_ids: list[int]
    jobs: list[Job]
    reports: list[preflight.ServerReport] = field(default_factory=list)
    servers: list[str] | None = None  # the servers the tasks are routed to; None = any


def load_workflow(settings: Settings, name: str) -> Workflow:
    return workflows.get_workflow(settings.workflows_dir, name)


def add_workflow(settings: Settings, filename: str, data: bytes, *, actor: Actor = LOCAL) -> Workflow:
    """Save an uploaded API-format workflow as `workflows/<name>.json` (name from the file name) and return
    it with its discovered parameters. Everything is checked before the file is written: size, JSON, the API
    format, every node, parameter discovery. A bad file or an existing name leaves the folder unchanged.
    Any role may add one (a workflow is a template, shared and never overwritten)."""
    stem = Path(filename).stem.strip()
    name = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in stem).strip("_")[:100]
    if not name:
        raise InputError(f"{filename}: cannot make a workflow name from this file name")
    if len(data) > workflows.MAX_WORKFLOW_BYTES:
        raise InputError(f"{filename}: {len(data):,} bytes is too large for a workflow (at most "
                         f"{workflows.MAX_WORKFLOW_BYTES:,}); an API-format graph is usually under 100 KB")
    target = settings.workflows_dir / f"{name}.json"
    if target.exists():
        raise InputError(f"{filename}: a workflow named '{name}' already exists; rename the file to add another")
    graph = workflows.parse_graph(data, filename)
    text = json.dumps(graph, ensure_ascii=False, indent=2)
    try:
        workflows.check_loadable(name, graph)
    except Exception as exc:  # whatever discovery trips over must refuse the file, not leave it behind
        raise InputError(f"{filename}: cannot be used as a workflow ({type(exc).__name__}: {str(exc)[:200]})"
                         ) from None
    files.write_atomic(target, text.encode("utf-8"))
    return workflows.load_workflow(target)


# -- submitting -------------------------------------------------------------------------------------
def submit(settings: Settings, store: Store, sub: Submission, rng: random.Random | None = None, *,
           actor: Actor = LOCAL) -> Submitted:
    """Check, preflight and enqueue a submission as `actor` (recorded as the batches' submitter), all or
    nothing. Raises InputError with every problem (the request's, then row by row, then the per-user cap);
    with `dry_run`, checks and resolves but enqueues nothing."""
    problems = list(sub.problems) + check_request(settings, sub)
    workflow: Workflow | None = None
    urls: list[str] = []
    if isinstance(sub.workflow, str) and sub.workflow.strip():
        try:
            workflow, urls = workflow_for_servers(settings, store, sub.workflow.strip())
        except NotFound as exc:
            problems.append(Problem(str(exc), field="workflow", code="not_found"))
        except InputError as exc:  # WorkflowError: the template itself is broken
            problems.append(Problem(exc.summary, field="workflow", code="broken_workflow"))
            problems.extend(exc.problems)
    else:
        problems.append(Problem("required: the name of a workflow", field="workflow", code="required"))
    if workflow is None or any(p.field in ("count", "rows") and p.code == "too_large" for p in problems):
        # Without a workflow the rows cannot be checked; over the limits they must not be expanded. Still
        # report each row's own problems (a ragged CSV row, a JSON object where a value belongs).
        problems.extend(p.at(row=r.number, file=sub.file if r.number is not None else None)
                        for r in sub.rows[:1000] for p in r.problems)
        problems.sort(key=sort_key)
        raise InputError(f"{len(problems)} problem(s) found; nothing was enqueued", problems)
    jobs = build_jobs(settings, workflow, replace(sub, problems=problems), rng)
    acting.check_user_cap(settings, store, actor, len(jobs))
    reports, servers = route(workflow, jobs, urls)
    if sub.dry_run:
        return Submitted([], [], jobs, reports, servers)
    result = enqueue(store, workflow, jobs, sub.name, sub.priority, source=sub.source, servers=servers,
                     submitted_by=actor.name)
    webhooks.register(store, result.batch_ids, sub.webhook)
    result.reports, result.servers = reports, servers
    return result


def csv_submission(settings: Settings, data: bytes, filename: str, workflow: str, **fields: Any) -> Submission:
    """A Submission of a CSV file's rows (read by the one CSV reader, within the settings' limits); other
    Submission fields (count, name, priority, images, image_dir, dry_run) as keywords."""
    rows = csvin.read_rows(data, filename, settings.max_csv_bytes, settings.max_rows, settings.max_count)
    return Submission(workflow, rows, source=filename, file=filename, **fields)


def enqueue(store: Store, workflow: Workflow, jobs: list[Job], batch_name: str | None = None, priority: int = 0,
            source: str | None = None, servers: list[str] | None = None, submitted_by: str | None = None
            ) -> Submitted:
    """Write validated jobs as one batch per batch name (rows without one share `batch_name`)."""
    groups: dict[str, list[Job]] = {}
    default_name = batch_name or f"{workflow.name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    for job in jobs:
        groups.setdefault(job.batch_name or default_name, []).append(job)
    batch_ids, task_ids = [], []
    prompt_param = workflow.params.get("prompt")
    for name, group in groups.items():
        rows = [{"models": workflows.loaded_models(j.graph), "row_number": j.row_number, "params": j.params,
                 "seed": j.resolved.get("seed"), "graph": j.graph,
                 "inputs": j.inputs, "servers": ",".join(servers) if servers else None,
                 "prompt": str(j.resolved.get("prompt") or (j.graph[prompt_param.node_id]["inputs"].get(
                     prompt_param.input_name) if prompt_param else "") or "")} for j in group]
        axes: dict[str, list[Any]] = {}
        for job in group:
            sweeps.merge_axes(axes, job.axes)
        batch_id, ids = store.create_batch(name, workflow.name, rows, priority=priority, source=source, axes=axes,
                                           submitted_by=submitted_by)
        batch_ids.append(batch_id)
        task_ids.extend(ids)
    return Submitted(batch_ids, task_ids, jobs)


def enabled_servers(settings: Settings, store: Store) -> list[str]:
    store.sync_servers(settings.comfyui_urls, lambda: uuid.uuid4().hex)
    return [s["url"] for s in store.servers(enabled_only=True)]


def workflow_for_servers(settings: Settings, store: Store, name: str) -> tuple[Workflow, list[str]]:
    """The workflow with list parameters offering the choices the (reachable) enabled servers have."""
    workflow = load_workflow(settings, name)
    urls = enabled_servers(settings, store)
    infos = [info for info in (preflight.object_info(u) for u in urls) if info is not None]
    return preflight.with_server_choices(workflow, infos), urls


def route(workflow: Workflow, jobs: list[Job], urls: list[str]
          ) -> tuple[list[preflight.ServerReport], list[str] | None]:
    """Preflight every job on every enabled server. Returns the reports and the servers to route to (None:
    any). Refuses (InputError) when servers answered and none of them can run the workflow."""
    uploaded = {target for job in jobs for target in job.inputs}
    reports = preflight.check_servers(urls, workflow, [j.graph for j in jobs], uploaded)
    reachable = [r for r in reports if r.reachable]
    if reachable and not any(r.ok for r in reachable):
        problems = [Problem(p, server=r.url, code="preflight") for r in reachable for p in r.problems]
        raise InputError(f"no ComfyUI server can run workflow '{workflow.name}'; nothing was enqueued", problems)
    if all(r.ok for r in reachable):
        return reports, None
    return reports, [r.url for r in reports if r.ok or not r.reachable]


# -- acting on tasks ------------------------------------------------------------------------------
def cancel(store: Store, task_ids: Iterable[int], *, actor: Actor = LOCAL) -> dict[str, list[int]]:
    """Queued tasks are cancelled at once; tasks on a server are removed from its queue or interrupted by
    the scheduler, then marked cancelled. Tasks already final are left alone."""
    ids = list(task_ids)
    others = acting.may_act(store, ids, actor, "cancel")
    cancelled, in_flight = store.request_cancel(ids)
    sessions.note_action(store, others, actor, f"cancel requested by {actor.name}")
    return {"cancelled": cancelled, "cancelling": [t["id"] for t in in_flight]}


def retry(store: Store, task_ids: Iterable[int], *, actor: Actor = LOCAL) -> list[int]:
    """Failed and cancelled tasks (models.RETRYABLE) go back to the queue with a fresh attempt count."""
    ids = list(task_ids)
    others = acting.may_act(store, ids, actor, "retry")
    requeued = store.retry(ids)
    sessions.note_action(store, [i for i in others if i in set(requeued)], actor, f"retried by {actor.name}")
    return requeued


def set_priority(store: Store, task_ids: Iterable[int], priority: int, *, actor: Actor = LOCAL) -> int:
    """Queued tasks with a higher priority are claimed first. Returns how many tasks were updated."""
    if not whole_number(priority, -MAX_PRIORITY, MAX_PRIORITY):
        raise InputError("1 problem(s) found; nothing was changed", [Problem(
            f"expected a whole number from {-MAX_PRIORITY} to {MAX_PRIORITY} (higher runs first), got "
            f"{workflows.show(priority)}", field="priority", code="out_of_range")])
    ids = list(task_ids)
    others = acting.may_act(store, ids, actor, "re-prioritise")
    updated = store.set_priority(ids, priority)
    sessions.note_action(store, others, actor, f"priority set to {priority} by {actor.name}")
    return updated


def batch_task_ids(store: Store, batch_id: int, statuses: Iterable[str] | None = None) -> list[int]:
    """A batch's task ids (NotFound for an unknown batch), optionally only those in `statuses`."""
    store.get_batch(batch_id)
    return store.task_ids(batch_id=batch_id, statuses=statuses)


def cancel_batch(store: Store, batch_id: int, *, actor: Actor = LOCAL) -> dict[str, list[int]]:
    require_owner(actor, store.get_batch(batch_id), "cancel")
    return cancel(store, batch_task_ids(store, batch_id, UNFINISHED), actor=actor)


def retry_batch(store: Store, batch_id: int, *, actor: Actor = LOCAL) -> list[int]:
    require_owner(actor, store.get_batch(batch_id), "retry")
    return retry(store, batch_task_ids(store, batch_id, RETRYABLE), actor=actor)


def set_batch_priority(store: Store, batch_id: int, priority: int, *, actor: Actor = LOCAL) -> int:
    require_owner(actor, store.get_batch(batch_id), "re-prioritise")
    return set_priority(store, batch_task_ids(store, batch_id), priority, actor=actor)


def task_ids_for(store: Store, task_ids: Iterable[int], batch_ids: Iterable[int], statuses: Iterable[str]
                 ) -> list[int]:
    """Named tasks (each must exist) plus the tasks of named batches that are in `statuses`: what the CLI's
    --task/--batch options select."""
    ids = []
    for task_id in task_ids:
        store.get_task(task_id)
        ids.append(task_id)
    for batch_id in batch_ids:
        ids.extend(batch_task_ids(store, batch_id, statuses))
    return ids


def batch_summary(store: Store, batch_id: int) -> dict[str, Any]:
    batch = store.get_batch(batch_id)
    counts = store.counts(batch_id)
    total = sum(counts.values())
    done = sum(counts.get(s, 0) for s in FINAL)
    eta = batch_eta(store, batch, total - done)
    uploaded = store.upload_counts(batch_id)
    stored, pending, failed = _upload_states(uploaded)
    batch.pop("turn", None)  # the fair-share clock: the scheduler's business, not the batch's
    return {**batch, "paused": bool(batch["paused"]), "run_next": batch["run_next"] is not None,
            "counts": counts, "total": total, "done": done,
            "progress": (done / total) if total else 1.0, "eta_seconds": eta,
            "eta_at": None if eta is None else time.time() + eta,
            "images": sum(uploaded.values()), "stored_remotely": stored, "upload_pending": pending,
            "upload_failed": failed, "webhook": webhooks.status(store, batch_id)}


def _upload_states(counts: dict[str, int]) -> tuple[int, int, int]:
    """(stored, pending, failed) from images counted by upload state; a claimed upload counts as pending."""
    return counts.get("stored", 0), counts.get("pending", 0) + counts.get("uploading", 0), counts.get("failed", 0)


def batch_eta(store: Store, batch: dict[str, Any], left: int) -> float | None:
    """Seconds until the batch is done, from measured run times: each server that can take its tasks now
    (enabled, not draining, not quarantined, on the batch's route) finishes one task per its mean run time of
    the batch's workflow (the workflow's mean over all servers for a server that has not run it yet). None
    (unknown) with no measurement yet, no server to run it, or the batch or the queue paused: never a guess."""
    if left == 0:
        return 0.0
    if batch["paused"] or store.queue_paused():
        return None
    measured = store.run_durations_by_server(batch["workflow"])
    every = [d for durations in measured.values() for d in durations]
    if not every:
        return None
    overall = sum(every) / len(every)
    routes = store.batch_routes(batch["id"])
    serving = [s["url"] for s in store.servers(enabled_only=True) if not s["draining"]
               and store.quarantine(s["url"]) is None
               and (not routes or any(r is None or s["url"] in r.split(",") for r in routes))]
    rate = sum(1 / max(sum(measured[u]) / len(measured[u]) if u in measured else overall, 1e-3) for u in serving)
    return left / rate if rate else None


# -- fleet controls: pause, run next, drain (kept in the database: they survive restarts) ----------------
def pause_batch(store: Store, batch_id: int, *, actor: Actor = LOCAL) -> dict[str, Any]:
    """Nothing more of the batch is claimed; what is already on a server finishes. Returns the batch."""
    acting.batch_action(store, batch_id, actor, "pause", "paused")
    store.set_batch_paused(batch_id, True)
    return batch_summary(store, batch_id)


def resume_batch(store: Store, batch_id: int, *, actor: Actor = LOCAL) -> dict[str, Any]:
    """The batch is claimed again, from where it stopped. Returns the batch."""
    acting.batch_action(store, batch_id, actor, "resume", "resumed")
    store.set_batch_paused(batch_id, False)
    return batch_summary(store, batch_id)


def run_batch_next(store: Store, batch_id: int, *, actor: Actor = LOCAL) -> dict[str, Any]:
    """Move the batch ahead of every other batch at its priority (higher priorities still go first)."""
    acting.batch_action(store, batch_id, actor, "run next", "moved to run next")
    store.set_run_next(batch_id)
    return batch_summary(store, batch_id)


def queue_state(store: Store) -> dict[str, Any]:
    return {"paused": store.queue_paused(), "counts": store.counts()}


def pause_queue(store: Store, *, actor: Actor = LOCAL) -> dict[str, Any]:
    """Nothing more is claimed from any batch until resume_queue; what is on servers finishes."""
    require_admin(actor, "pause the whole queue")
    store.set_queue_paused(True)
    return queue_state(store)


def resume_queue(store: Store, *, actor: Actor = LOCAL) -> dict[str, Any]:
    require_admin(actor, "resume the whole queue")
    store.set_queue_paused(False)
    return queue_state(store)


def _known_server(store: Store, raw_url: str) -> str:
    """A configured server's URL as typed (`host:port` gets http://); NotFound for any other text."""
    try:
        url = server_url(raw_url)
    except InputError:
        url = raw_url
    if url not in {s["url"] for s in store.servers()}:
        raise NotFound(f"server {workflows.show(url)} is not configured")
    return url


def drain_server(store: Store, raw_url: str, *, actor: Actor = LOCAL) -> dict[str, Any]:
    """Graceful maintenance: the server takes no new work, finishes what it has, then shows as drained."""
    require_admin(actor, "drain a server")
    url = _known_server(store, raw_url)
    store.set_server_draining(url, True)
    return server_state(store, url)


def undrain_server(store: Store, raw_url: str, *, actor: Actor = LOCAL) -> dict[str, Any]:
    require_admin(actor, "undrain a server")
    url = _known_server(store, raw_url)
    store.set_server_draining(url, False)
    return server_state(store, url)


def server_state(store: Store, url: str) -> dict[str, Any]:
    """`state`: disabled, quarantined (after repeated failures: until when and why), drained (draining and
    nothing left on it), draining (still finishing work) or active."""
    return _server_state(store, next(s for s in store.servers() if s["url"] == url))


def _server_state(store: Store, server: dict[str, Any]) -> dict[str, Any]:
    url = server["url"]
    in_flight = len(store.in_flight_tasks(url))
    quarantine = store.quarantine(url)
    if not server["enabled"]:
        state = "disabled"
    elif quarantine is not None:
        state = "quarantined"
    elif server["draining"]:
        state = "draining" if in_flight else "drained"
    else:
        state = "active"
    return {"url": url, "state": state, "draining": bool(server["draining"]), "in_flight": in_flight,
            "models": server["models"].split("|") if server["models"] else [],
            "quarantined_until": quarantine[0] if quarantine else None,
            "quarantine_reason": quarantine[1] if quarantine else None}


def export_batch(settings: Settings, store: Store, batch_id: int, csv_path: Path | None = None,
                 zip_path: Path | None = None) -> dict[str, int]:
    """Write a batch's results CSV and/or ZIP to files, streamed (core.exports): memory stays flat."""
    store.get_batch(batch_id)
    sel = exports.Selection(batch_id)
    result = {"images": int(store.db.execute("SELECT COUNT(*) FROM images WHERE batch_id = ?",
                                             (batch_id,)).fetchone()[0])}
    if csv_path:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        part = csv_path.with_name(f".part-{csv_path.name}")
        with open(part, "wb") as out:
            for chunk in results_csv_chunks(settings, store, batch_id):
                out.write(chunk)
        part.replace(csv_path)
        result["rows"] = store.count_tasks(batch_id=batch_id)
    if zip_path:
        result["zipped"] = files.export_zip(settings.output_dir, exports.iter_images(store, sel), zip_path,
                                            _stored_bytes(settings))
    return result


def results_csv_chunks(settings: Settings, store: Store, batch_id: int | None = None, picked: bool = False,
                       person: str | None = None) -> Iterator[bytes]:
    """A results CSV (UTF-8 with BOM, spreadsheet-safe cells) in chunks, read a page of tasks at a time: of a
    batch, of the picked images (`picked`, optionally of one batch), images in object storage with their URL
    (presigned links expire after COMFYBATCH_S3_LINK_EXPIRY). NotFound for an unknown batch, before anything
    is yielded."""
    if batch_id is not None:
        store.get_batch(batch_id)
    return exports.csv_chunks(store, exports.Selection(batch_id, picked, person),
                              lambda img: image_link(settings, img))


def results_csv_bytes(settings: Settings, store: Store, batch_id: int) -> bytes:
    """A (small) batch's results CSV as bytes; large ones go through results_csv_chunks or export_file."""
    return b"".join(results_csv_chunks(settings, store, batch_id))


def zip_bytes(settings: Settings, images: list[dict[str, Any]]) -> bytes:
    """A ZIP of a few image rows in memory (the API's small cases and tests); large ones: export_file."""
    buf = io.BytesIO()
    files.export_zip(settings.output_dir, images, buf, _stored_bytes(settings))
    return buf.getvalue()


def export_file(settings: Settings, store: Store, kind: str, batch_id: int | None = None, picked: bool = False,
                image_ids: Iterable[int] | None = None, person: str | None = None) -> exports.ExportFile:
    """Write an export to a temporary file the pages link to (`.url`, served by /files/export/...):
    `kind` "csv" (results) or "zip" (images) of a batch, of the picked images, or of given image ids; with
    `person`, only that person's batches (core.visibility.person_for)."""
    if batch_id is not None:
        store.get_batch(batch_id)
    label = f"batch-{batch_id}" if batch_id is not None else "comfybatch"
    label += "-picked" if picked else ""
    if kind == "csv":
        out = exports.new_file(settings, f"{label}-results.csv")
        with open(out.path, "wb") as f:
            for chunk in results_csv_chunks(settings, store, batch_id, picked, person):
                f.write(chunk)
        return out
    if kind != "zip":
        raise InputError(f"unknown export kind {workflows.show(kind)}: csv or zip")
    out = exports.new_file(settings, f"{label}-images.zip")
    images: Iterable[dict[str, Any]] = (queries.images_by_ids(store, image_ids) if image_ids is not None
                                        else exports.iter_images(store, exports.Selection(batch_id, picked, person)))
    files.export_zip(settings.output_dir, images, out.path, _stored_bytes(settings))
    return out


def export_grid(settings: Settings, store: Store, batch_id: int, row_axis: str | None, col_axis: str | None,
                fixed: dict[str, Any] | None, kind: str) -> exports.ExportFile:
    """A sweep batch's comparison grid as a PNG contact sheet (`kind` "png") or a ZIP of its cells ("zip")."""
    grid = grids.build(store, batch_id, row_axis, col_axis, fixed)
    if kind == "png":
        out = exports.new_file(settings, f"batch-{batch_id}-grid.png")
        grids.contact_sheet(settings.output_dir, grid, out.path)
    else:
        out = exports.new_file(settings, f"batch-{batch_id}-grid.zip")
        grids.grid_zip(settings.output_dir, grid, out.path)
    return out


def set_picked(store: Store, image_ids: Iterable[int], picked: bool) -> int:
    """Star (or unstar) images in the gallery; returns how many changed."""
    return store.set_picked(image_ids, picked)


# -- object storage -------------------------------------------------------------------------------
def image_link(settings: Settings, image: dict[str, Any]) -> str | None:
    """The object store URL of an image stored there (presigned or public, per COMFYBATCH_S3_LINKS), or
    None: the local route serves it. None too when a link cannot be signed (the local route still works)."""
    if not _in_store(settings, image):
        return None
    try:
        return storage.link(settings, image["remote_key"])
    except StorageError:
        return None


@dataclass(frozen=True)
class ImageSource:
    """Where to answer a request for an image from: a local file, or a redirect to the object store."""

    path: Path | None = None
    redirect: str | None = None
    media_type: str = "application/octet-stream"


def image_source(settings: Settings, store: Store, image_id: int, thumbnail: bool) -> ImageSource:
    """An image (bytes as ComfyUI made them) or its WebP thumbnail, from the local file when there is one,
    else from the object store (the local copy was deleted after its upload). NotFound otherwise."""
    row = queries.get_image(store, image_id)
    missing: NotFound | None = None
    try:
        if thumbnail:
            return ImageSource(thumbs.ensure_thumb(settings.output_dir, row["path"]), None, thumbs.THUMB_FORMAT[2])
        path = thumbs.source_path(settings.output_dir, row["path"])
        if path.is_file():
            return ImageSource(path, None, storage.content_type(path.name))
    except NotFound as exc:
        missing = exc
    link = image_link(settings, row)
    if link is not None:
        return ImageSource(None, link)
    if missing is not None:
        raise missing
    if row.get("local_deleted_at"):
        raise NotFound(f"image {image_id}: its local file was deleted after it was uploaded to object storage, "
                       "which is not configured now (set COMFYBATCH_S3_BUCKET and the other COMFYBATCH_S3_* "
                       "settings as they were)")
    raise NotFound(f"image {image_id}: its file {row['path']} is missing from the output folder")


def _stored_bytes(settings: Settings) -> Any:
    """For ZIPs: an image's bytes from the object store when its local file is gone (None if not stored)."""
    def fetch(image: dict[str, Any]) -> bytes | None:
        return storage.object_store(settings).get(image["remote_key"]) if _in_store(settings, image) else None
    return fetch


def _in_store(settings: Settings, image: dict[str, Any]) -> bool:
    """Whether an image row is stored in the object store this app is configured for now."""
    return bool(settings.storage_enabled and image.get("remote_state") == "stored" and image.get("remote_key"))


def storage_status(settings: Settings, store: Store, check: bool = True) -> dict[str, Any]:
    """Object storage as the Servers page and `storage status` show it: on or off, where, whether the store
    answers and the bucket exists (`check`: ask it, a few seconds at most), images by upload state, and the
    latest upload error. Never a credential."""
    counts = store.upload_counts()
    stored, pending, failed = _upload_states(counts)
    status: dict[str, Any] = {
        "enabled": settings.storage_enabled, "bucket": settings.s3_bucket or None,
        "endpoint": settings.s3_endpoint_url or (f"AWS S3 ({settings.s3_region})" if settings.s3_bucket else None),
        "links": settings.s3_links, "delete_local": settings.s3_delete_local,
        "stored": stored, "pending": pending, "failed": failed, "local_only": counts.get("local", 0),
        "last_error": store.last_upload_error(), "reachable": None, "bucket_exists": None, "error": None}
    if settings.storage_enabled and check:
        status.update(storage.health(settings))
    return status


def require_storage(settings: Settings) -> None:
    if not settings.storage_enabled:
        raise ConfigError("object storage is off: set COMFYBATCH_S3_BUCKET (and the other COMFYBATCH_S3_* "
                          "settings: endpoint, region, credentials) to upload results")


def sync_storage(settings: Settings, store: Store, batch_id: int | None = None,
                 progress: Any = None, *, actor: Actor = LOCAL) -> dict[str, int]:
    """Upload every image of a batch (or of all batches) that is not in the object store yet: images made
    while storage was off, and failed uploads. Checks the store first (StorageError when it is unreachable
    or misconfigured); `progress(done, total)` after each image. Returns counts (see core.uploads.sync)."""
    require_admin(actor, "upload to object storage")
    require_storage(settings)
    if batch_id is not None:
        store.get_batch(batch_id)
    return uploads.sync(settings, store, batch_id, progress)


# -- servers --------------------------------------------------------------------------------------
HEALTH_FRESH = 15.0  # seconds a health snapshot published by the scheduler is trusted


def server_health(settings: Settings, store: Store, timeout: float = 3.0) -> list[dict[str, Any]]:
    """Health of every known server. Uses what the running scheduler published in the last few seconds, and
    probes (one by one, `timeout` each) only the servers it has no fresh word on."""
    store.sync_servers(settings.comfyui_urls, lambda: uuid.uuid4().hex)
    report = []
    now = time.time()
    feeders = store.server_feeders()
    for server in store.servers():
        feeder = feeders.get(server["url"])
        entry: dict[str, Any] = {"url": server["url"], "enabled": bool(server["enabled"]),
                                 "source": server["source"], **_server_state(store, server),
                                 # which scheduler process feeds it (the app or a `python -m core worker`)
                                 "fed_by": f"pid {feeder['pid']} on {feeder['host']}" if feeder else None}
        if server.get("health") and now - (server.get("health_at") or 0) < HEALTH_FRESH:
            entry.update(json.loads(server["health"]))
        else:
            entry.update(probe(server["url"], server["client_id"], min(timeout, settings.connect_timeout)))
        report.append(entry)
    return report


def health(settings: Settings, store: Store) -> dict[str, Any]:
    """The app's health: its scheduler (who holds the lease), task counts and every server."""
    servers = server_health(settings, store)
    holder = store.lease_holder(LEASE)
    scheduler = {"running": holder is not None, "owner": holder["owner"] if holder else None,
                 "host": holder["host"] if holder else None, "pid": holder["pid"] if holder else None}
    enabled = [s for s in servers if s["enabled"]]
    ok = holder is not None and bool(enabled) and all(s["up"] for s in enabled)
    return {"status": "ok" if ok else "degraded", "scheduler": scheduler, "counts": store.counts(),
            "servers": servers}


def server_url(raw: str) -> str:
    """One server URL as typed on a page or in an API call (`host:port` gets http://), or InputError."""
    text = raw.strip() if isinstance(raw, str) else ""
    try:
        urls = parse_urls(text)
    except ConfigError:
        raise InputError(f"{workflows.show(text)} is not an http(s) URL; enter one server URL, e.g. "
                         "http://127.0.0.1:8188") from None
    if len(urls) != 1 or any(c.isspace() for c in urls[0]) or len(urls[0]) > 500:
        raise InputError("enter one server URL, e.g. http://127.0.0.1:8188")
    return urls[0]


def add_server(store: Store, raw_url: str, *, actor: Actor = LOCAL) -> str:
    """Add (or re-enable) a server at run time; the scheduler starts feeding it within a second."""
    require_admin(actor, "add a server")
    url = server_url(raw_url)
    store.add_server(url, client_id=uuid.uuid4().hex)
    return url


def set_server_enabled(store: Store, url: str, enabled: bool, *, actor: Actor = LOCAL) -> None:
    """Disabled: no new work; its in-flight tasks go back to the queue (the scheduler requeues them)."""
    require_admin(actor, "enable or disable a server")
    store.set_server_enabled(url, enabled)


def remove_server(store: Store, url: str, *, actor: Actor = LOCAL) -> None:
    require_admin(actor, "remove a server")
    store.remove_server(url)


def start_local_backends(settings: Settings, store: Store) -> backends.Supervisor | None:
    """Start the local ComfyUI backends the settings ask for (core.backends), each registered as a server
    (source 'local'), and return their supervisor (stop it on shutdown); None when none are asked for.
    InputError naming the setting when the folder, command, GPUs, ports or arguments are wrong."""
    plan = backends.plan(settings)
    if not plan.specs:
        return None
    for spec in plan.specs:
        store.add_local_server(spec.url, client_id=uuid.uuid4().hex)
    supervisor = backends.Supervisor(settings, store, plan)
    supervisor.start()
    return supervisor


def local_backends(settings: Settings) -> dict[str, Any]:
    """The local backends for the pages: `mode` (off, configured, demo, or invalid with `problems`), a `note`
    to show (the demo's noise images, or how to get a ComfyUI), the demo workflow's name, and each backend's
    last state with its log tail, as written by whichever ComfyBatch process supervises it."""
    try:
        plan = backends.plan(settings)
        mode, note, problems = plan.mode, plan.note, []
    except InputError as exc:
        mode, note, problems = "invalid", exc.summary, exc.problems
    return {"mode": mode, "note": note, "problems": problems, "demo_workflow": backends.DEMO_WORKFLOW,
            "backends": backends.read_status(settings)}


def check_server(url: str, timeout: float = 3.0) -> dict[str, Any]:
    client = ComfyClient(url, "comfybatch-probe", timeout, timeout)
    try:
        return client.system_stats()
    finally:
        client.close()


def wait_for_tasks(store: Store, task_ids: list[int], timeout: float, poll: float = 0.2) -> dict[str, int]:
    """Block until every task is final (or the timeout passes); returns counts by status."""
    deadline = time.monotonic() + timeout
    while True:
        rows = store.db.execute(f"SELECT status FROM tasks WHERE id IN ({','.join('?' * len(task_ids))})",
                                task_ids).fetchall()
        counts: dict[str, int] = {}
        for (status,) in rows:
            counts[status] = counts.get(status, 0) + 1
        if all(TaskStatus(s).is_final for s in counts) or time.monotonic() > deadline:
            return dict(sorted(counts.items()))
        time.sleep(poll)
