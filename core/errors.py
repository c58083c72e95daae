"""The exception tree of ComfyBatch. Every failure a user can meet is one of these, with a sentence
that names what is wrong and where.

    ComfyBatchError
    ├── ConfigError          a setting is malformed (raised at start-up; fix the setting)
    ├── InputError           user input is invalid: CSV rows, parameters, uploads. Carries `problems`,
    │   │                    one line each (file, row, column/parameter, reason). Nothing was enqueued.
    │   └── WorkflowError    a workflow template cannot be used (missing, not JSON, UI format, broken links)
    ├── NotFound             an id (batch, task, image, workflow) that does not exist
    └── ComfyError           talking to a ComfyUI server failed
        ├── ServerUnavailable  connection refused / timeout / 5xx: a retry, on this or another server, can help
        ├── PromptRejected     HTTP 400 from POST /prompt: the graph is invalid; never retried
        ├── ExecutionFailed    `execution_error` while running: may be transient (OOM), retried up to max attempts
        └── Interrupted        the prompt was interrupted on the server
"""

from __future__ import annotations

from typing import Any


class ComfyBatchError(Exception):
    """Base class: `str(exc)` is a complete sentence fit for a user."""


class ConfigError(ComfyBatchError):
    pass


class InputError(ComfyBatchError):
    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"- {p}" for p in self.problems)
        super().__init__(message)
        self.summary = message.split("\n", 1)[0]


class WorkflowError(InputError):
    pass


class NotFound(ComfyBatchError):
    pass


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
