"""The engine's front door: the functions the pages, the CLI and the HTTP API all call.

Submitting validates everything first and enqueues all or nothing. Side effects: the database (through
Store), input images copied into the content-addressed input folder, and (for cancel) nothing on ComfyUI
directly: the scheduler that owns a task's server carries a cancel out.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import csvin, files, preflight, workflows
from core.comfy import ComfyClient, probe
from core.config import Settings
from core.errors import InputError
from core.models import TaskStatus
from core.store import Store
from core.workflows import Workflow


@dataclass
class Job:
    """One validated row: its resolved parameters and graph, before it is enqueued."""

    row_number: int | None
    params: dict[str, Any]
    resolved: dict[str, Any]
    graph: dict[str, Any]
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    batch_name: str | None = None


@dataclass
class Submitted:
    batch_ids: list[int]
    task_ids: list[int]
    jobs: list[Job]
    reports: list[preflight.ServerReport] = field(default_factory=list)
    servers: list[str] | None = None  # the servers the tasks are routed to; None = any


def input_dir(settings: Settings) -> Path:
    return settings.output_dir / "_inputs"


def load_workflow(settings: Settings, name: str) -> Workflow:
    return workflows.get_workflow(settings.workflows_dir, name)


def add_workflow(settings: Settings, filename: str, data: bytes) -> Workflow:
    """Save an uploaded API-format workflow as `workflows/<name>.json` (name from the file name) and return
    it with its discovered parameters. A UI-format file, bad JSON or an existing name is refused, unchanged."""
    stem = Path(filename).stem.strip()
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem).strip("_")
    if not name:
        raise InputError(f"{filename}: cannot make a workflow name from this file name")
    target = settings.workflows_dir / f"{name}.json"
    if target.exists():
        raise InputError(f"{filename}: a workflow named '{name}' already exists; rename the file to add another")
    try:
        graph = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{filename}: not a valid JSON file ({exc})") from None
    workflows.check_api_format(graph, filename)
    files.write_atomic(target, json.dumps(graph, ensure_ascii=False, indent=2).encode("utf-8"))
    return workflows.load_workflow(target)


def build_jobs(settings: Settings, workflow: Workflow, rows: list[dict[str, Any]], count: int = 1,
               source: str = "", images: dict[str, bytes] | None = None, image_dir: Path | None = None,
               row_numbers: list[int] | None = None, counts: list[int | None] | None = None,
               batch_names: list[str | None] | None = None, row_problems: list[list[str]] | None = None,
               rng: random.Random | None = None) -> list[Job]:
    """Validate every row and expand counts. Raises one InputError naming every bad row; nothing is written
    except input images, which are content-addressed and harmless to keep."""
    rng = rng or random.Random()
    problems: list[str] = []
    jobs: list[Job] = []
    image_params = {k for k, p in workflow.params.items() if p.kind == "image"}
    for i, row in enumerate(rows):
        number = row_numbers[i] if row_numbers else None
        where = f"{source} row {number}" if number is not None else (f"{source} row {i + 1}" if source else "")
        if row_problems and row_problems[i]:
            problems.extend(row_problems[i])
        try:
            resolved = workflows.resolve_params(workflow, row, rng, where)
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        inputs: dict[str, dict[str, str]] = {}
        for key in list(resolved):
            param = workflow.param_for(key)
            if key in image_params or param.kind == "image":
                try:
                    inputs[param.target] = _stage_image(settings, str(resolved[key]), images, image_dir)
                except InputError as exc:
                    problems.append(f"{where}: parameter '{key}': {exc}" if where else f"parameter '{key}': {exc}")
                    continue
                resolved[key] = inputs[param.target]["name"]
        n = (counts[i] if counts and counts[i] else None) or count
        for copy in range(n):
            values = dict(resolved)
            if "seed" in workflow.params and copy > 0:
                fixed = row.get("seed") not in (None, "", "random")
                values["seed"] = (resolved["seed"] + copy) if fixed else rng.randint(0, workflows.SEED_MAX)
            jobs.append(Job(number, dict(row), values, workflows.patch(workflow, values), inputs,
                            batch_names[i] if batch_names else None))
    if problems:
        raise InputError(f"{len(problems)} problem(s) found; nothing was enqueued", problems)
    return jobs


def enqueue(store: Store, workflow: Workflow, jobs: list[Job], batch_name: str | None = None, priority: int = 0,
            source: str | None = None, servers: list[str] | None = None) -> Submitted:
    """Write validated jobs as one batch per batch name (rows without one share `batch_name`)."""
    groups: dict[str, list[Job]] = {}
    default_name = batch_name or f"{workflow.name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    for job in jobs:
        groups.setdefault(job.batch_name or default_name, []).append(job)
    batch_ids, task_ids = [], []
    prompt_param = workflow.params.get("prompt")
    for name, group in groups.items():
        rows = [{"row_number": j.row_number, "params": j.params, "seed": j.resolved.get("seed"), "graph": j.graph,
                 "inputs": j.inputs, "servers": ",".join(servers) if servers else None,
                 "prompt": str(j.resolved.get("prompt") or (j.graph[prompt_param.node_id]["inputs"].get(
                     prompt_param.input_name) if prompt_param else "") or "")} for j in group]
        batch_id, ids = store.create_batch(name, workflow.name, rows, priority=priority, source=source)
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
        problems = [f"{r.url}: {p}" for r in reachable for p in r.problems]
        raise InputError(f"no ComfyUI server can run workflow '{workflow.name}'; nothing was enqueued", problems)
    if all(r.ok for r in reachable):
        return reports, None
    return reports, [r.url for r in reports if r.ok or not r.reachable]


def submit_rows(settings: Settings, store: Store, workflow_name: str, rows: list[dict[str, Any]],
                batch_name: str | None = None, priority: int = 0, count: int = 1, dry_run: bool = False,
                images: dict[str, bytes] | None = None, image_dir: Path | None = None) -> Submitted:
    workflow, urls = workflow_for_servers(settings, store, workflow_name)
    jobs = build_jobs(settings, workflow, rows, count=count, images=images, image_dir=image_dir)
    return _submit(store, workflow, jobs, urls, batch_name, priority, None, dry_run)


def submit_csv(settings: Settings, store: Store, data: bytes, filename: str, workflow_name: str,
               batch_name: str | None = None, priority: int = 0, count: int = 1, dry_run: bool = False,
               images: dict[str, bytes] | None = None, image_dir: Path | None = None) -> Submitted:
    workflow, urls = workflow_for_servers(settings, store, workflow_name)
    parsed = csvin.read_csv(data, filename)
    jobs = build_jobs(settings, workflow, [r.params for r in parsed], count=count, source=filename, images=images,
                      image_dir=image_dir, row_numbers=[r.row_number for r in parsed],
                      counts=[r.count for r in parsed], batch_names=[r.batch_name for r in parsed],
                      row_problems=[r.problems for r in parsed])
    return _submit(store, workflow, jobs, urls, batch_name, priority, filename, dry_run)


def _submit(store: Store, workflow: Workflow, jobs: list[Job], urls: list[str], batch_name: str | None,
            priority: int, source: str | None, dry_run: bool) -> Submitted:
    reports, servers = route(workflow, jobs, urls)
    if dry_run:
        return Submitted([], [], jobs, reports, servers)
    result = enqueue(store, workflow, jobs, batch_name, priority, source=source, servers=servers)
    result.reports, result.servers = reports, servers
    return result


def _stage_image(settings: Settings, ref: str, images: dict[str, bytes] | None, image_dir: Path | None
                 ) -> dict[str, str]:
    """Find an input image by file name (uploaded alongside, or beside the CSV) and copy it into the
    content-addressed input folder, so the task keeps working if the original moves."""
    name = Path(ref).name
    if images is not None:
        # Uploaded alongside (pages, API): only those files count; never read the server's disk for them.
        if name not in images:
            raise InputError(f"image file '{ref}' is not among the uploaded images "
                             f"({', '.join(sorted(images)) or 'none uploaded'})")
        data = images[name]
    else:
        path = Path(ref) if Path(ref).is_absolute() else (image_dir or Path.cwd()) / ref
        if not path.is_file():
            raise InputError(f"image file '{ref}' not found (looked in {path.parent})")
        data = path.read_bytes()
    if files.describe_image(data)["width"] is None:
        raise InputError(f"'{name}' is not an image file PIL can read")
    sha = hashlib.sha256(data).hexdigest()
    stored = input_dir(settings) / f"{sha}{Path(name).suffix.lower() or '.png'}"
    if not stored.is_file():
        files.write_atomic(stored, data)
    return {"path": str(stored), "sha256": sha, "name": name}


# -- acting on tasks ------------------------------------------------------------------------------
def cancel(store: Store, task_ids: Iterable[int]) -> dict[str, list[int]]:
    """Queued tasks are cancelled at once; tasks on a server are removed from its queue or interrupted by
    the scheduler, then marked cancelled."""
    cancelled, in_flight = store.request_cancel(task_ids)
    return {"cancelled": cancelled, "cancelling": [t["id"] for t in in_flight]}


def retry(store: Store, task_ids: Iterable[int]) -> list[int]:
    return store.retry(task_ids)


def batch_summary(store: Store, batch_id: int) -> dict[str, Any]:
    batch = store.get_batch(batch_id)
    counts = store.counts(batch_id)
    total = sum(counts.values())
    done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
    row = store.db.execute("SELECT MIN(submitted_at), MAX(finished_at), COUNT(finished_at) FROM tasks "
                           "WHERE batch_id = ? AND status = 'succeeded'", (batch_id,)).fetchone()
    eta = None
    if row[2] and row[0] and row[1] and row[1] > row[0] and total > done:
        rate = row[2] / (row[1] - row[0])
        eta = (total - done) / rate
    return {**batch, "counts": counts, "total": total, "done": done,
            "progress": (done / total) if total else 1.0, "eta_seconds": eta}


def export_batch(settings: Settings, store: Store, batch_id: int, csv_path: Path | None = None,
                 zip_path: Path | None = None) -> dict[str, int]:
    store.get_batch(batch_id)
    images = store.images_for_batch(batch_id)
    result = {"images": len(images)}
    if csv_path:
        tasks = store.list_tasks(batch_id=batch_id, limit=10**9, newest_first=False)
        by_task: dict[int, list[dict[str, Any]]] = {}
        for img in images:
            by_task.setdefault(img["task_id"], []).append(img)
        csv_path.write_text(files.results_csv(tasks, by_task), encoding="utf-8-sig")
        result["rows"] = len(tasks)
    if zip_path:
        result["zipped"] = files.export_zip(settings.output_dir, images, zip_path)
    return result


def zip_bytes(settings: Settings, images: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    files.export_zip(settings.output_dir, images, buf)
    return buf.getvalue()


# -- servers --------------------------------------------------------------------------------------
HEALTH_FRESH = 15.0  # seconds a health snapshot published by the scheduler is trusted


def server_health(settings: Settings, store: Store, timeout: float = 3.0) -> list[dict[str, Any]]:
    """Health of every known server. Uses what the running scheduler published in the last few seconds, and
    probes (one by one, `timeout` each) only the servers it has no fresh word on."""
    store.sync_servers(settings.comfyui_urls, lambda: uuid.uuid4().hex)
    report = []
    now = time.time()
    for server in store.servers():
        entry: dict[str, Any] = {"url": server["url"], "enabled": bool(server["enabled"]),
                                 "source": server["source"]}
        if server.get("health") and now - (server.get("health_at") or 0) < HEALTH_FRESH:
            entry.update(json.loads(server["health"]))
        else:
            entry.update(probe(server["url"], server["client_id"], min(timeout, settings.connect_timeout)))
        report.append(entry)
    return report


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
