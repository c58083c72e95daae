"""Display formatting for the pages, pure (no streamlit): task rows for the Tasks table, times, durations,
sizes and the plain per-batch status line the browser tests read."""

from __future__ import annotations

import time
from typing import Any

from core.models import ALL_STATUSES, TaskStatus
from core.queries import task_progress


def task_row(task: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """A task shaped for the Tasks table: progress as 0..1 and the timings in seconds."""
    now = time.time() if now is None else now
    status = task["status"]
    submitted, started, finished = task.get("submitted_at"), task.get("started_at"), task.get("finished_at")
    wait = (submitted or (now if status == TaskStatus.QUEUED else None))
    return {
        "id": task["id"], "batch": task["batch_id"], "row": task.get("row_number"), "status": status,
        "progress": task_progress(task), "server": task.get("server") or "", "attempts": task["attempts"],
        "priority": task["priority"], "prompt": clip(task.get("prompt") or "", 120), "error": task.get("error") or "",
        "created": format_time(task["created_at"]),
        "wait_s": round(wait - task["created_at"], 1) if wait else None,
        "run_s": round((finished or now) - started, 1) if started else None,
    }


def format_time(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else ""


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_bytes(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def batch_status_line(summary: dict[str, Any]) -> str:
    """The plain line the Tasks page prints per batch, e.g. 'Batch 3: 10/10 done (100%)'."""
    counts = summary["counts"]
    line = f"Batch {summary['id']}: {summary['done']}/{summary['total']} done ({summary['progress']:.0%})"
    details = ", ".join(f"{counts[s]} {s}" for s in ALL_STATUSES if counts.get(s))
    if details:
        line += f" - {details}"
    if summary.get("paused"):
        line += " - paused"
    if summary.get("run_next"):
        line += " - runs next"
    if summary["done"] < summary["total"]:
        line += " - " + eta_text(summary)
    return line + storage_text(summary) + webhook_text(summary)


def webhook_text(summary: dict[str, Any]) -> str:
    """' - webhook delivered (2 calls)', ' - webhook retrying (1 call; HTTP 500), next in 25 s', or ''."""
    hook = summary.get("webhook")
    if not hook:
        return ""
    calls = f"{hook['attempts']} call{'s' if hook['attempts'] != 1 else ''}"
    words = {"waiting": "webhook waits for the batch to finish", "pending": f"webhook retrying ({calls}",
             "sending": f"webhook sending ({calls}", "delivered": f"webhook delivered ({calls})",
             "failed": f"webhook failed ({calls}"}
    text = " - " + words.get(hook["state"], f"webhook {hook['state']}")
    if hook["state"] in ("pending", "sending", "failed"):
        text += f"; {clip(hook['last_error'] or '', 80)})" if hook["last_error"] else ")"
    if hook["state"] == "pending" and hook.get("next_at"):
        text += f", next try in {format_duration(max(0.0, hook['next_at'] - time.time()))}"
    return text


def eta_text(summary: dict[str, Any]) -> str:
    """'ETA unknown', or 'about 2 min 05 s left (done about 14:03:10)' from the measured estimate."""
    if summary.get("eta_seconds") is None:
        return "ETA unknown"
    return (f"about {format_duration(summary['eta_seconds'])} left (done about "
            f"{time.strftime('%H:%M:%S', time.localtime(summary['eta_at']))})")


def storage_text(summary: dict[str, Any]) -> str:
    """' - 3/4 image(s) in object storage, 1 uploading' for a batch that uses object storage, else ''."""
    stored, pending, failed = (summary.get(k, 0) for k in ("stored_remotely", "upload_pending", "upload_failed"))
    if not (stored or pending or failed):
        return ""
    text = f" - {stored}/{summary.get('images', 0)} image(s) in object storage"
    if pending:
        text += f", {pending} uploading"
    if failed:
        text += f", {failed} upload(s) failed"
    return text


def clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
