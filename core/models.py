"""Plain value types shared by the engine, the pages and the CLI."""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    QUEUED = "queued"          # in our database, waiting for a server
    SUBMITTED = "submitted"    # posted to a ComfyUI server (or about to be: prompt_id stored first)
    RUNNING = "running"        # ComfyUI reported execution_start
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES

    @property
    def in_flight(self) -> bool:
        return self in (TaskStatus.SUBMITTED, TaskStatus.RUNNING)


FINAL_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})
ALL_STATUSES = tuple(TaskStatus)
