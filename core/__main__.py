"""The command line: `python -m core ...`, thin over core.service. Errors exit non-zero with one line.
The CLI acts as the local admin `cli` (core.users.CLI): whoever can run it can read the database anyway."""

from __future__ import annotations

import sys

# The CLI uses neither pandas nor numpy, but sqlite-utils imports both when they are installed: 0.3 s of
# start-up for every command (and for `worker --until-idle` in a pipeline). Only this entry point does this.
for _unused in ("pandas", "numpy"):
    sys.modules.setdefault(_unused, None)  # type: ignore[arg-type]

import argparse
import json
import logging
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from core import service, users
from core.config import Settings
from core.errors import ComfyBatchError, InputError, Problem
from core.logs import setup_logging
from core.models import RETRYABLE, UNFINISHED
from core.scheduler import Scheduler
from core.store import Store
from core.users import CLI


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.load()
        setup_logging(settings.log_dir, stderr=args.command == "worker" and not args.quiet,
                      level=logging.getLevelName(settings.log_level))
        store = Store(settings.db_path)
        try:
            return int(args.func(settings, store, args) or 0)
        finally:
            store.close()
    except InputError as exc:
        print(f"error: {exc.summary}", file=sys.stderr)
        for problem in exc.problems:
            print(f"- {_line(problem)}", file=sys.stderr)
        return 2
    except ComfyBatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


OPTIONS = {"count": "--count", "priority": "--priority", "name": "--batch-name", "workflow": "--workflow"}


def _line(problem: Problem) -> str:
    """A problem as the CLI says it: request fields are named by the option that sets them."""
    if problem.field in OPTIONS:
        return f"{OPTIONS[problem.field]}: {replace(problem, field=None)}"
    return str(problem)


def _params(pairs: list[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--param {pair!r}: expected KEY=VALUE, e.g. --param steps=20 or --param 6.text=cat")
        params[key.strip()] = value
    return params


def cmd_submit(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    if args.file and args.prompt is not None:
        raise InputError("give either a CSV file or --prompt, not both")
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        if path.stat().st_size > settings.max_csv_bytes:  # refused before it is read into memory
            raise InputError(f"{path.name}: the file is larger than {settings.max_csv_mb:g} MB "
                             "(COMFYBATCH_MAX_CSV_MB); split it into smaller files")
        sub = service.csv_submission(settings, path.read_bytes(), path.name, args.workflow, image_dir=path.parent)
    else:
        row = _params(args.param)
        if args.prompt is not None:
            row["prompt"] = args.prompt
        sub = service.Submission(args.workflow, [service.Row(row)], source="cli")
    sub.count, sub.name, sub.priority, sub.dry_run = args.count, args.batch_name, args.priority, args.dry_run
    sub.webhook = args.webhook
    result = service.submit(settings, store, sub, actor=CLI)
    if args.dry_run:
        for job in result.jobs:
            print(json.dumps(job.graph, ensure_ascii=False))
        return 0
    for batch_id in result.batch_ids:
        print(batch_id)
    print(f"{len(result.task_ids)} task(s) queued in batch {', '.join(map(str, result.batch_ids))}",
          file=sys.stderr)
    return 0


def cmd_worker(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    backends = service.start_local_backends(settings, store) if args.backends else None
    if not settings.comfyui_urls and not store.servers(enabled_only=True):
        raise InputError("no ComfyUI server configured: set COMFYUI_URL, e.g. COMFYUI_URL=http://127.0.0.1:8188")
    scheduler = Scheduler(settings, store)
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stop_event.set())
    scheduler.start()
    tty = sys.stderr.isatty()

    def progress_line(final: bool = False) -> str:
        counts = "  ".join(f"{k} {v}" for k, v in store.counts().items()) or "no tasks"
        role = "" if final else f"  (feeding {len(scheduler.workers)} server(s))"
        return f"\r{counts}{role}\x1b[K"

    try:
        while not scheduler.stop_event.is_set():
            time.sleep(0.05)
            if args.until_idle and scheduler.ticked.is_set() and not scheduler.busy():
                break
            if tty:
                sys.stderr.write(progress_line())
                sys.stderr.flush()
    except KeyboardInterrupt:
        pass
    finally:
        scheduler.stop()
        if backends is not None:
            backends.stop()
        if tty:
            sys.stderr.write(progress_line(final=True) + "\n")
    return 0


def cmd_status(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    summary = None if args.batch is None else service.batch_summary(store, args.batch)
    counts = store.counts() if summary is None else summary["counts"]
    if args.json:
        print(json.dumps(counts))
    else:
        for status, n in counts.items():
            print(f"{status:10} {n}")
        if not counts:
            print("no tasks")
        if summary is not None and summary["done"] < summary["total"]:
            print(f"{'eta':10} {_eta(summary)}")
        if summary is not None and summary["webhook"]:
            hook = summary["webhook"]
            print(f"{'webhook':10} {hook['state']} after {hook['attempts']} call(s)"
                  + (f"; last error: {hook['last_error']}" if hook["last_error"] else ""))
        if store.queue_paused():
            print(f"{'queue':10} paused (python -m core resume)")
    return 0


def _eta(summary: dict[str, Any]) -> str:
    if summary["eta_seconds"] is None:
        return "unknown" + (" (paused)" if summary["paused"] else "")
    finish = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary["eta_at"]))
    return f"{summary['eta_seconds']:.0f} s (done about {finish})"


def _task_ids(store: Store, args: argparse.Namespace, statuses: tuple[str, ...]) -> list[int]:
    if not args.task and not args.batch:
        raise InputError("name tasks with --task ID or batches with --batch ID")
    return service.task_ids_for(store, args.task or [], args.batch or [], statuses)


def cmd_cancel(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    result = service.cancel(store, _task_ids(store, args, UNFINISHED), actor=CLI)
    print(f"cancelled {len(result['cancelled'])}, cancelling on server {len(result['cancelling'])}")
    return 0


def cmd_retry(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    ids = service.retry(store, _task_ids(store, args, RETRYABLE), actor=CLI)
    print(f"requeued {len(ids)} task(s)")
    return 0


def cmd_pause(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    """Pause (or resume) one batch, or with no batch the whole queue."""
    resume = args.command == "resume"
    if args.batch is None:
        state = service.resume_queue(store, actor=CLI) if resume else service.pause_queue(store, actor=CLI)
        print("queue " + ("paused: nothing new starts until `resume`" if state["paused"] else "resumed"))
    else:
        batch = (service.resume_batch if resume else service.pause_batch)(store, args.batch, actor=CLI)
        print(f"batch {batch['id']} " + ("paused" if batch["paused"] else "resumed"))
    return 0


def cmd_run_next(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    batch = service.run_batch_next(store, args.batch, actor=CLI)
    print(f"batch {batch['id']} runs next at priority {batch['priority']}")
    return 0


def cmd_drain(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    state = (service.undrain_server if args.command == "undrain" else service.drain_server)(store, args.url,
                                                                                     actor=CLI)
    print(f"{state['url']}: {state['state']}" + (f" ({state['in_flight']} task(s) still on it)"
                                                  if state["state"] == "draining" else ""))
    return 0


def cmd_export(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    if not args.csv and not args.zip:
        raise InputError("export: give --csv FILE and/or --zip FILE")
    result = service.export_batch(settings, store, args.batch, Path(args.csv) if args.csv else None,
                                  Path(args.zip) if args.zip else None)
    print(json.dumps(result))
    return 0


def cmd_servers(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    report = service.server_health(settings, store)
    if not report:
        raise InputError("no ComfyUI server configured: set COMFYUI_URL, e.g. COMFYUI_URL=http://127.0.0.1:8188")
    for s in report:
        state = "up" if s["up"] else "DOWN"
        extra: Any = (f"ComfyUI {s.get('version')} on {s.get('device')}, queue {s.get('queue_running')}+"
                      f"{s.get('queue_pending')}") if s["up"] else s.get("error", "")
        drain = f"({s['state']}) " if s["state"] in ("draining", "drained") else ""
        if s.get("quarantined_until"):
            drain += (f"(quarantined until {time.strftime('%H:%M:%S', time.localtime(s['quarantined_until']))}: "
                      f"{s['quarantine_reason']}) ")
        fed = f"\tfed by {s['fed_by']}" if s.get("fed_by") else ""
        print(f"{s['url']}\t{state}\t{'' if s['enabled'] else '(disabled) '}{drain}{extra}{fed}")
    return 0 if all(s["up"] for s in report if s["enabled"]) else 1


def cmd_storage_sync(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            sys.stderr.write(f"\ruploading {done}/{total}\x1b[K")
            sys.stderr.flush()

    try:
        result = service.sync_storage(settings, store, args.batch, progress, actor=CLI)
    finally:
        if tty:
            sys.stderr.write("\r\x1b[K")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"stored {result['stored']}, already in the store {result['already']}, failed {result['failed']}, "
              f"to retry {result['retry']}, still pending {result['left']} "
              f"({result['queued']} image(s) newly queued)")
    return 1 if result["failed"] or result["retry"] else 0


def cmd_storage_status(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    service.require_storage(settings)
    status = service.storage_status(settings, store)
    if args.json:
        print(json.dumps(status))
    else:
        state = ("reachable, bucket exists" if status["bucket_exists"] else
                 "UNREACHABLE" if status["reachable"] is False else "NOT USABLE")
        print(f"bucket '{status['bucket']}' at {status['endpoint']}: {state}")
        print(f"images: {status['stored']} stored, {status['pending']} pending, {status['failed']} failed, "
              f"{status['local_only']} local only")
        for label in ("error", "last_error"):
            if status[label]:
                print(f"{label.replace('_', ' ')}: {status[label]}")
    return 0 if status["bucket_exists"] else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core", description="ComfyBatch: bulk image generation on ComfyUI.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="enqueue a CSV file or a single prompt")
    s.add_argument("file", nargs="?", help="CSV file: one job per row, columns are parameters")
    s.add_argument("--workflow", required=True, help="template name in the workflows folder")
    s.add_argument("--prompt", help="a single prompt instead of a CSV file")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="parameter (repeatable)")
    s.add_argument("--batch-name")
    s.add_argument("--webhook", metavar="URL", help="http(s) URL called (POST, JSON) when the batch is final")
    s.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    s.add_argument("--count", type=int, default=1, help="images per row (a CSV 'count' column wins)")
    s.add_argument("--dry-run", action="store_true", help="print the graphs, one JSON per line; enqueue nothing")
    s.set_defaults(func=cmd_submit)
    w = sub.add_parser("worker", help="run the scheduler")
    w.add_argument("--until-idle", action="store_true", help="exit once nothing is queued or in flight")
    w.add_argument("--quiet", action="store_true", help="no log lines on stderr")
    w.add_argument("--backends", action="store_true",
                   help="also start and supervise the local ComfyUI backends (COMFYBATCH_BACKEND_*), as the app does")
    w.set_defaults(func=cmd_worker)
    st = sub.add_parser("status", help="task counts by status")
    st.add_argument("batch", nargs="?", type=int)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    for name, func, help_text in (("cancel", cmd_cancel, "cancel tasks"),
                                  ("retry", cmd_retry, "retry failed or cancelled tasks")):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--batch", type=int, action="append", help="every matching task of this batch")
        c.add_argument("--task", type=int, action="append", help="one task id (repeatable)")
        c.set_defaults(func=func)
    e = sub.add_parser("export", help="write a batch's results CSV and/or ZIP of images")
    e.add_argument("batch", type=int)
    e.add_argument("--csv")
    e.add_argument("--zip")
    e.set_defaults(func=cmd_export)
    for name, help_text in (("pause", "pause a batch (no new tasks of it start), or with no batch the whole queue"),
                            ("resume", "resume a paused batch, or with no batch the whole queue")):
        pa = sub.add_parser(name, help=help_text)
        pa.add_argument("batch", nargs="?", type=int, help="batch id (default: the whole queue)")
        pa.set_defaults(func=cmd_pause)
    rn = sub.add_parser("run-next", help="move a batch ahead of every other batch at its priority")
    rn.add_argument("batch", type=int)
    rn.set_defaults(func=cmd_run_next)
    for name, help_text in (("drain", "a server takes no new work and finishes what it has (maintenance)"),
                            ("undrain", "a drained server takes work again")):
        dr = sub.add_parser(name, help=help_text)
        dr.add_argument("url", help="the server's URL, as `servers` lists it")
        dr.set_defaults(func=cmd_drain)
    sv = sub.add_parser("servers", help="health of each configured ComfyUI server")
    sv.set_defaults(func=cmd_servers)
    so = sub.add_parser("storage", help="object storage (S3 and S3-compatible stores)")
    storage = so.add_subparsers(dest="storage_command", required=True)
    sy = storage.add_parser("sync", help="upload the images not in the object store yet (made while it was off, "
                                         "or whose upload failed)")
    sy.add_argument("batch", nargs="?", type=int, help="only this batch (default: every batch)")
    sy.add_argument("--json", action="store_true", help="print the counts as JSON")
    sy.set_defaults(func=cmd_storage_sync)
    ss = storage.add_parser("status", help="whether the store answers and the bucket exists; uploads by state")
    ss.add_argument("--json", action="store_true")
    ss.set_defaults(func=cmd_storage_status)
    us = sub.add_parser("users", help="local accounts (COMFYBATCH_USERS_FILE)")
    users_sub = us.add_subparsers(dest="users_command", required=True)
    ua = users_sub.add_parser("add", help="add a user or set their password and role; the password is read from "
                                          "standard input (one line) or asked for without echo")
    ua.add_argument("name")
    ua.add_argument("--role", choices=users.ROLES, default=users.MEMBER)
    ua.set_defaults(func=cmd_users_add)
    return p


def cmd_users_add(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    """Write a user with an Argon2 hash of the password into the users file; nobody writes hashes by hand."""
    if settings.users_file is None:
        raise InputError("set COMFYBATCH_USERS_FILE (the local accounts file, e.g. users.toml) first")
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise InputError("the two passwords differ; nothing was written")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    users.save_account(settings.users_file, args.name, args.role, password)
    print(f"{args.name} ({args.role}) saved in {settings.users_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
