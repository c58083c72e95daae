"""Helpers shared by test modules (test modules never import each other): settings in a temporary folder,
waiting on a condition, the environment of a CLI or worker subprocess, and running the CLI."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("COMFYBATCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def make_settings(tmp_path: Path, urls: list[str], **overrides: Any) -> Settings:
    wf = tmp_path / "workflows"
    wf.mkdir(exist_ok=True)
    for src in [*sorted((ROOT / "workflows").glob("*")), *sorted((ROOT / "tests" / "workflows").glob("*"))]:
        # The test servers hold a random-weight SD1.5 checkpoint under its own name: point the shipped
        # SD1.5 templates at it, as a team points templates at the model files its servers have.
        (wf / src.name).write_text(src.read_text(encoding="utf-8").replace(
            "v1-5-pruned-emaonly.safetensors", "random_sd15.safetensors"), encoding="utf-8")
    values: dict[str, Any] = dict(
        comfyui_urls=tuple(urls), db_path=tmp_path / "tasks.db", output_dir=tmp_path / "generated_images",
        workflows_dir=wf, log_dir=tmp_path / "logs", lease_seconds=3.0, connect_timeout=3.0, read_timeout=30.0)
    values.update(overrides)
    return Settings(**values)


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1,
               message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment of a `python -m core ...` subprocess that uses these settings."""
    return {**os.environ, "COMFYUI_URL": ",".join(settings.comfyui_urls), "COMFYBATCH_DB": str(settings.db_path),
            "COMFYBATCH_OUTPUT_DIR": str(settings.output_dir), "COMFYBATCH_WORKFLOWS_DIR": str(settings.workflows_dir),
            "COMFYBATCH_LOG_DIR": str(settings.log_dir), "COMFYBATCH_LEASE_SECONDS": "2", "PYTHONPATH": str(ROOT)}


def cli_env(tmp_path: Path, urls: list[str], **overrides: Any) -> dict[str, str]:
    """worker_env for fresh settings under tmp_path, with WORK naming the folder the CLI runs in."""
    return {**worker_env(make_settings(tmp_path, urls, **overrides)), "WORK": str(tmp_path)}


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "core", *args], env=env, cwd=env["WORK"], capture_output=True,
                          text=True, timeout=timeout)


def png(color: tuple[int, ...] | int, size: tuple[int, int] = (32, 16), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def submit_rows(settings: Settings, store: Any, workflow: str, rows: list[dict[str, Any]], **fields: Any) -> Any:
    """Submit rows through the front door, as the API's JSON intake and the Generate page do."""
    from core import service

    sub = service.Submission(workflow, [service.Row(r) for r in rows], **fields)
    return service.submit(settings, store, sub)


def submit_csv(settings: Settings, store: Any, data: bytes, filename: str, workflow: str, **fields: Any) -> Any:
    """Submit a CSV file's bytes through the front door, as the CLI does."""
    from core import service

    return service.submit(settings, store, service.csv_submission(settings, data, filename, workflow, **fields))


def settle(page: Any) -> None:
    """Wait on a Playwright page like Streamlit's own e2e suite: connected, and the script done."""
    page.wait_for_selector("[data-testid=stApp][data-test-connection-state=CONNECTED]", timeout=30_000)
    page.wait_for_selector("[data-test-script-state=notRunning]", timeout=30_000)
