"""Logging set-up: stderr plus a rotating file under the log folder. Never logs secrets or tokens."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
        file_handler = logging.handlers.RotatingFileHandler(
            log_dir / "comfybatch.log", maxBytes=5_000_000, backupCount=5, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(file_handler)
    except OSError as exc:
        root.warning("cannot write logs under %s: %s", log_dir, exc)
    root._comfybatch_configured = True  # type: ignore[attr-defined]
