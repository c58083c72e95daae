"""The exception tree of ComfyBatch. Every failure a user can meet is one of these, with a sentence
that names what is wrong and where.

    ComfyBatchError
    ├── ConfigError          a setting is malformed (raised at start-up; fix the setting)
    ├── InputError           user input is invalid: CSV rows, parameters, uploads. Carries `problems`, a
    │   │                    list of `Problem` values (file, row, column, parameter, node, reason) that the
    │   │                    edges turn into text. Nothing was enqueued.
    │   └── WorkflowError    a workflow template cannot be used (missing, not JSON, UI format, broken links)
    ├── NotFound             an id (batch, task, image, workflow) that does not exist
    ├── Forbidden            the acting user's role or ownership does not allow the action (core.users)
    ├── SignInFailed         a wrong user name or password, or a sign-in refused during a lockout delay
    ├── ComfyError           talking to a ComfyUI server failed
    │   ├── ServerUnavailable  connection refused / timeout / 5xx: a retry, on this or another server, can help
    │   ├── PromptRejected     HTTP 400 from POST /prompt: the graph is invalid; never retried
    │   ├── ExecutionFailed    `execution_error` while running: may be transient (OOM), retried up to max attempts
    │   └── Interrupted        the prompt was interrupted on the server
    └── StorageError         talking to the object store (S3 or S3-compatible) failed; never names a credential
        ├── StorageUnavailable unreachable, timeout, 5xx, throttled: uploads wait and retry with backoff
        └── StorageRejected    the store refused: no such bucket, wrong credentials, access denied (fix the
                               settings; uploads keep waiting meanwhile)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a user's input, as data: where it is and why. Only the edges (CLI, API, pages)
    turn it into text; `str(problem)` is the one plain rendering they share, e.g.
    "jobs.csv row 3: parameter 'steps' (3.steps): expected an integer, got 'two'"."""

    message: str  # the reason, without the location
    row: int | None = None  # spreadsheet row (header = row 1), or 1-based position in a JSON `rows` list
    column: str | None = None  # a CSV column that is not a parameter (count, batch_name) or the header
    parameter: str | None = None  # the parameter key as the user wrote it
    target: str | None = None  # the node input it sets, "<node id>.<input>"
    node: str | None = None  # a node id the problem is about (workflow files, preflight)
    field: str | None = None  # a request field or option (workflow, count, priority, images, ...)
    file: str | None = None  # the CSV or workflow file
    server: str | None = None  # the ComfyUI server that reported it (preflight)
    code: str = "invalid"  # a stable kind for programs: invalid, unknown_parameter, required, too_large, ...

    def at(self, **where: Any) -> Problem:
        """The same problem with more of its location filled in (fields already set are kept)."""
        return replace(self, **{k: v for k, v in where.items() if getattr(self, k) is None and v is not None})

    @property
    def location(self) -> str:
        parts = [p for p in (self.server, self.file, f"row {self.row}" if self.row is not None else None) if p]
        where = " ".join(parts)
        if self.column is not None:
            where += f" column '{self.column}'" if where else f"column '{self.column}'"
        return where

    def __str__(self) -> str:
        text = self.message
        if self.parameter is not None:
            if self.code == "unknown_parameter":
                text = f"unknown parameter '{self.parameter}': {text}"
            else:
                target = f" ({self.target})" if self.target else ""
                text = f"parameter '{self.parameter}'{target}: {text}"
        elif self.field is not None:
            text = f"field '{self.field}': {text}"
        return f"{self.location}: {text}" if self.location else text

    def as_dict(self) -> dict[str, Any]:
        """The fields a program reads (the API's `problems` items), with the rendered text as `message` and
        the bare reason as `reason`."""
        return {"message": str(self), "reason": self.message, "row": self.row, "column": self.column,
                "parameter": self.parameter, "target": self.target, "node": self.node or _node(self.target),
                "field": self.field, "file": self.file, "server": self.server, "code": self.code}


def _node(target: str | None) -> str | None:
    return target.rsplit(".", 1)[0] if target and "." in target else None


def clip(text: Any, limit: int = 60) -> str:
    """A user's text for a message, cut to `limit` characters with "...", so no message grows with the input."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sort_key(problem: Problem) -> tuple[int, int]:
    """Problems of the request first, then row by row (a stable sort keeps each row's own order)."""
    return (0, 0) if problem.row is None else (1, problem.row)


class ComfyBatchError(Exception):
    """Base class: `str(exc)` is a complete sentence fit for a user."""


class ConfigError(ComfyBatchError):
    pass


class InputError(ComfyBatchError):
    """`summary` is one sentence; `problems` are the typed details (plain strings given here become Problems
    with only a message). `str(exc)` is the summary and one "- problem" line per problem."""

    def __init__(self, message: str, problems: list[Problem] | list[str] | list[Problem | str] | None = None):
        self.summary = message
        self.problems: list[Problem] = [p if isinstance(p, Problem) else Problem(str(p)) for p in problems or []]
        if self.problems:
            message = message + "\n" + "\n".join(f"- {p}" for p in self.problems)
        super().__init__(message)


class WorkflowError(InputError):
    pass


class NotFound(ComfyBatchError):
    pass


class Forbidden(ComfyBatchError):
    """The acting user may not do this: a member acting on someone else's batch, or on servers."""


class SignInFailed(ComfyBatchError):
    """Sign-in refused. `retry_after` is the lockout delay in seconds (0: none). Never names the password."""

    def __init__(self, message: str, retry_after: float = 0.0):
        super().__init__(message)
        self.retry_after = retry_after


class ComfyError(ComfyBatchError):
    retryable = False

    def __init__(self, message: str, server: str = ""):
        super().__init__(message)
        self.server = server


class ServerUnavailable(ComfyError):
    """`maybe_delivered` is True when the request may have reached the server (e.g. a read timeout)."""

    retryable = True

    def __init__(self, message: str, server: str = "", maybe_delivered: bool = False):
        super().__init__(message, server)
        self.maybe_delivered = maybe_delivered


class PromptRejected(ComfyError):
    """HTTP 400 from /prompt; keeps ComfyUI's `error` and `node_errors` bodies."""

    def __init__(self, body: dict[str, Any], server: str = ""):
        self.error = body.get("error") if isinstance(body.get("error"), dict) else {"message": str(body.get("error"))}
        self.node_errors = body.get("node_errors") or {}
        super().__init__(describe_rejection(body), server)


class ExecutionFailed(ComfyError):
    retryable = True

    def __init__(self, data: dict[str, Any], server: str = ""):
        self.node_id = str(data.get("node_id", ""))
        self.node_type = str(data.get("node_type", ""))
        self.exception_type = str(data.get("exception_type", ""))
        self.exception_message = str(data.get("exception_message", "")).strip()
        super().__init__(
            f"ComfyUI failed while running node {self.node_id} ({self.node_type}): "
            f"{self.exception_type}: {self.exception_message}", server)


class Interrupted(ComfyError):
    retryable = True


def describe_rejection(body: dict[str, Any]) -> str:
    """Render ComfyUI's 400 body as one sentence per problem, naming node id, class, input and reason."""
    error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
    parts: list[str] = []
    for node_id, info in sorted((body.get("node_errors") or {}).items(), key=lambda kv: str(kv[0])):
        class_type = info.get("class_type", "?")
        for err in info.get("errors", []):
            extra = err.get("extra_info") or {}
            input_name = extra.get("input_name") or ""
            where = f"node {node_id} ({class_type})" + (f" input '{input_name}'" if input_name else "")
            reason = err.get("message", "invalid")
            details = err.get("details")
            if details and details != input_name:
                reason = f"{reason}: {details}"
            parts.append(f"{where}: {reason}")
    if not parts:
        msg = error.get("message") or "prompt rejected"
        details = error.get("details")
        parts.append(f"{msg} ({details})" if details else msg)
    return "ComfyUI rejected the prompt: " + "; ".join(parts)


class StorageError(ComfyBatchError):
    """The object store failed. `code` says why for programs (unreachable, no_bucket, no_object, denied,
    no_credentials, rejected); `maybe_delivered`: an upload may have reached the store (a read timeout)."""

    def __init__(self, message: str, code: str = "rejected", maybe_delivered: bool = False):
        super().__init__(message)
        self.code = code
        self.maybe_delivered = maybe_delivered


class StorageUnavailable(StorageError):
    pass


class StorageRejected(StorageError):
    pass
