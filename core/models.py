"""Plain value types shared by the engine, the pages, the API and the CLI: the task statuses and their groups,
each defined once here (store, CLI, API, OpenAPI document and pages all read them from this module)."""

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
        return self in FINAL

    @property
    def in_flight(self) -> bool:
        return self in IN_FLIGHT


# The status groups. Tuples of plain strings keep SQL parameters and JSON simple.
ALL_STATUSES: tuple[str, ...] = tuple(s.value for s in TaskStatus)
IN_FLIGHT: tuple[str, ...] = (TaskStatus.SUBMITTED.value, TaskStatus.RUNNING.value)  # on a ComfyUI server
UNFINISHED: tuple[str, ...] = (TaskStatus.QUEUED.value, *IN_FLIGHT)  # what cancel acts on
FINAL: tuple[str, ...] = (TaskStatus.SUCCEEDED.value, TaskStatus.FAILED.value, TaskStatus.CANCELLED.value)
RETRYABLE: tuple[str, ...] = (TaskStatus.FAILED.value, TaskStatus.CANCELLED.value)  # what retry acts on
FINAL_STATUSES = frozenset(TaskStatus(s) for s in FINAL)
