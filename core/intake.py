"""What a submission is, and how it is checked: the one validation path behind `service.submit`.

Every face builds the same `Submission` (a workflow name, rows of parameters, count, name, priority, images)
and hands it to `service.submit`: the CLI from its options or a CSV file, the API from a JSON body or a
multipart upload, the Generate page from its form, the Batch page from the rows of its edited table. Limits
(rows, count, total tasks) are checked here before anything is expanded; every row is then checked and its
problems collected, so one answer names everything to fix and nothing is enqueued until nothing is wrong.

Side effect: input images are copied into the content-addressed input folder as rows are checked (harmless to
keep: a file named by its hash).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core import files, sweeps, workflows
from core.config import Settings
from core.errors import InputError, Problem, sort_key
from core.workflows import Workflow

MAX_PRIORITY = 1_000_000
MAX_NAME = 200
MAX_IMAGES = 1000  # input image files sent with one submission
MAX_WEBHOOK_URL = 2000


@dataclass
class Row:
    """One row of a submission: parameters as the user gave them, where it came from, its own problems."""

    params: dict[str, Any]
    number: int | None = None  # spreadsheet row (header = 1), position in a JSON list; None for one prompt
    count: int | None = None  # copies of this row (a CSV count column); None: the submission's count
    batch_name: str | None = None  # a CSV batch_name column; None: the submission's name
    problems: list[Problem] = field(default_factory=list)  # found while reading it (CSV shape, JSON types)


@dataclass
class Submission:
    """A request to enqueue work, the same for every face."""

    workflow: str
    rows: list[Row]
    count: int = 1
    name: str | None = None
    priority: int = 0
    images: dict[str, bytes] | None = None  # uploaded alongside (pages, API); None: read beside the CSV (CLI)
    image_dir: Path | None = None  # where the CLI finds image files named by rows
    source: str | None = None  # recorded on the batch: a CSV file name, or "api", "cli", "page"
    file: str | None = None  # the file the row numbers refer to, named in problems
    dry_run: bool = False
    problems: list[Problem] = field(default_factory=list)  # found by the face while reading the request
    webhook: str | None = None  # an http(s) URL called once each batch of the submission is final


@dataclass
class Job:
    """One validated task, before it is enqueued: its resolved parameters and graph."""

    row_number: int | None
    params: dict[str, Any]
    resolved: dict[str, Any]
    graph: dict[str, Any]
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    batch_name: str | None = None
    axes: dict[str, Any] = field(default_factory=dict)  # this job's values of its row's lists (core.sweeps)


def whole_number(value: Any, low: int, high: int | None = None) -> bool:
    """True for an int (not a bool) from `low` to `high` (no upper bound when None)."""
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


def check_request(settings: Settings, sub: Submission) -> list[Problem]:
    """Problems of the request as a whole (count, priority, name, size), found before any row is looked at."""
    problems = []
    if not whole_number(sub.count, 1, settings.max_count):
        problems.append(Problem(f"expected a whole number from 1 to {settings.max_count}, got "
                                f"{workflows.show(sub.count)}", field="count", code="out_of_range"))
    if not whole_number(sub.priority, -MAX_PRIORITY, MAX_PRIORITY):
        problems.append(Problem(f"expected a whole number from {-MAX_PRIORITY} to {MAX_PRIORITY}, got "
                                f"{workflows.show(sub.priority)}", field="priority", code="out_of_range"))
    if sub.name is not None and (not isinstance(sub.name, str) or len(sub.name) > MAX_NAME or "\x00" in sub.name):
        problems.append(Problem(f"expected text of at most {MAX_NAME} characters (no NUL), got "
                                f"{workflows.show(sub.name)}", field="name", code="invalid"))
    if sub.webhook is not None:
        problems.extend(check_webhook(sub.webhook))
    if not sub.rows and not sub.problems:
        problems.append(Problem("nothing to submit: no rows", field="rows", code="required"))
    elif len(sub.rows) > settings.max_rows:
        problems.append(Problem(f"{len(sub.rows):,} rows; at most {settings.max_rows:,} in one submission "
                                "(COMFYBATCH_MAX_ROWS)", field="rows", code="too_large"))
    if len(sub.images or {}) > MAX_IMAGES:
        problems.append(Problem(f"{len(sub.images or {})} image files; at most {MAX_IMAGES}", field="images",
                                code="too_large"))
    count = sub.count if whole_number(sub.count, 1) else 1
    tasks = task_count(sub)
    if tasks > settings.max_tasks:
        lists = " and their lists" if any(sweeps.axes(row.params) for row in sub.rows) else ""
        problems.append(Problem(f"{len(sub.rows):,} row(s){lists} with count {count:,} would make {tasks:,} tasks; "
                                f"at most {settings.max_tasks:,} in one submission (COMFYBATCH_MAX_TASKS): split it",
                                field="count" if len(sub.rows) == 1 else "rows", code="too_large"))
    return problems


def check_webhook(url: Any) -> list[Problem]:
    """A webhook URL: http or https, with a host, no spaces or control characters, at most MAX_WEBHOOK_URL."""
    if not isinstance(url, str) or not url.strip():
        return [Problem(f"expected an http(s) URL, got {workflows.show(url)}", field="webhook", code="invalid")]
    if len(url) > MAX_WEBHOOK_URL:
        return [Problem(f"{len(url):,} characters; a webhook URL may have at most {MAX_WEBHOOK_URL:,}",
                        field="webhook", code="too_large")]
    parts = urlsplit(url.strip())
    if (parts.scheme.lower() not in ("http", "https") or not parts.hostname
            or any(c.isspace() or ord(c) < 32 for c in url.strip())):
        return [Problem(f"expected an http:// or https:// URL with a host name, got {workflows.show(url)}",
                        field="webhook", code="invalid")]
    return []


def task_count(sub: Submission) -> int:
    """Tasks the submission would make (each row's count times the product of its lists), from the numbers
    alone: what pages show before submitting and what the limits are checked against."""
    count = sub.count if whole_number(sub.count, 1) else 1
    return sum((row.count or count) * sweeps.size(row.params) for row in sub.rows)


def build_jobs(settings: Settings, workflow: Workflow, sub: Submission, rng: random.Random | None = None
               ) -> list[Job]:
    """Check every row and expand counts. Raises one InputError naming every problem of the submission (its
    own first, then row by row); call only once `check_request` found nothing, so expansion is bounded."""
    rng = rng or random.Random()
    problems: list[Problem] = list(sub.problems)
    jobs: list[Job] = []
    for row in sub.rows:
        where: dict[str, Any] = {"row": row.number, "file": sub.file if row.number is not None else None}
        problems.extend(p.at(**where) for p in row.problems)  # and the row's values are checked too
        swept = sweeps.axes(row.params)
        if swept:
            found = sweeps.check(row.params, settings.max_sweep_values)
            if found:
                problems.extend(p.at(**where) for p in found)
                continue
        params = dict(row.params)
        fixed_seed = params.get("seed") not in (None, "", "random")
        if swept and "seed" in workflow.params and "seed" not in swept and not fixed_seed:
            # One seed for the whole sweep, so the grid's cells differ only by what the lists vary.
            params["seed"] = rng.randint(0, workflows.SEED_MAX)
            fixed_seed = True
        seen: set[str] = set()
        for combo in sweeps.combinations(params):
            try:
                resolved = workflows.resolve_params(workflow, combo, rng)
            except InputError as exc:
                for p in exc.problems:  # one bad value of a list fails many combinations: say it once
                    if (text := str(p)) not in seen:
                        seen.add(text)
                        problems.append(p.at(**where))
                continue
            inputs = stage_images(settings, workflow, sub, resolved, where, problems)
            if inputs is None or problems:
                continue  # nothing will be enqueued: do not spend memory on graphs
            given = {**row.params, **{k: combo[k] for k in swept}}
            for copy in range(row.count or sub.count):
                values = dict(resolved)
                if "seed" in workflow.params and copy > 0:
                    values["seed"] = (resolved["seed"] + copy) if fixed_seed else rng.randint(0, workflows.SEED_MAX)
                jobs.append(Job(row.number, given, values, workflows.patch(workflow, values), inputs,
                               row.batch_name, {k: combo[k] for k in swept}))
    if problems:
        problems.sort(key=sort_key)
        raise InputError(f"{len(problems)} problem(s) found; nothing was enqueued", problems)
    return jobs


def stage_images(settings: Settings, workflow: Workflow, sub: Submission, resolved: dict[str, Any],
                 where: dict[str, Any], problems: list[Problem]) -> dict[str, dict[str, str]] | None:
    """Stage the input images a row names, replacing each value by the file's name; the staged files by input
    target, or None (with the problems added) when one cannot be used."""
    inputs: dict[str, dict[str, str]] = {}
    ok = True
    for key in list(resolved):
        param = workflow.param_for(key)
        if param.kind != "image":
            continue
        try:
            inputs[param.target] = stage_image(settings, str(resolved[key]), sub.images, sub.image_dir)
        except InputError as exc:
            problems.append(Problem(exc.summary, parameter=key, **where))
            ok = False
            continue
        resolved[key] = inputs[param.target]["name"]
    return inputs if ok else None


def input_dir(settings: Settings) -> Path:
    return settings.output_dir / "_inputs"


def stage_image(settings: Settings, ref: str, images: dict[str, bytes] | None, image_dir: Path | None
                ) -> dict[str, str]:
    """Find an input image by file name (uploaded alongside, or beside the CSV for the CLI) and copy it into
    the content-addressed input folder, so the task keeps working if the original moves."""
    name = Path(ref).name
    if images is not None:
        # Uploaded alongside (pages, API): only those files count; never read the server's disk for them.
        if ref not in images:
            shown = ", ".join(sorted(images)[:10]) + (" ..." if len(images) > 10 else "")
            raise InputError(f"image {workflows.show(ref)} was not uploaded with the submission (images sent: "
                             f"{shown or 'none'})")
        data = images[ref]
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
