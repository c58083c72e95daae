"""Logging set-up: stderr plus a rotating file under the log folder. Never logs secrets or tokens."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RotatingFile(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler that keeps count of the size it wrote: the standard one formats every record twice
    and seeks to the end of the file to decide on rotation, which cost a fleet's scheduler (two lines per
    task, hundreds of tasks a second) about a tenth of its CPU. The count is in characters, so a file with
    Chinese prompts in it rotates a little past maxBytes."""

    size: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record) + self.terminator
            if self.stream is None:
                self.stream = self._open()
            if self.size is None:
                self.size = self.stream.seek(0, 2)
            if self.maxBytes > 0 and self.size and self.size + len(msg) >= self.maxBytes:
                self.doRollover()
                self.size = 0
            self.stream.write(msg)
            self.flush()
            self.size += len(msg)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def setup_logging(log_dir: Path, level: int = logging.INFO, stderr: bool = True) -> None:
    root = logging.getLogger("core")
    if getattr(root, "_comfybatch_configured", False):
        return
    root.setLevel(level)
    if stderr:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = RotatingFile(
            log_dir / "comfybatch.log", maxBytes=5_000_000, backupCount=5, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(file_handler)
    except OSError as exc:
        root.warning("cannot write logs under %s: %s", log_dir, exc)
    root._comfybatch_configured = True  # type: ignore[attr-defined]
