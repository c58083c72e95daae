"""Fixtures: a real ComfyUI on loopback (installed on first use), fresh settings/database per test, and an
in-process scheduler. Thin named fixtures over a few factories, as in datasette's suite."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config import Settings
from core.scheduler import Scheduler
from core.store import Store
from tests.comfyui_harness import server as harness

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def comfy_installed() -> None:
    harness.ensure_installed()


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy_installed: None) -> Path:
    return harness.ensure_checkpoint()


@pytest.fixture(scope="session")
def comfy_factory(comfy_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    started: list[harness.ComfyServer] = []

    def start() -> harness.ComfyServer:
        server = harness.ComfyServer(tmp_path_factory.mktemp("comfyui")).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def comfy(comfy_factory, sd15_checkpoint: Path) -> harness.ComfyServer:
    """The shared real ComfyUI server of the session."""
    return comfy_factory()


def make_settings(tmp_path: Path, urls: list[str], **overrides) -> Settings:
    wf = tmp_path / "workflows"
    wf.mkdir(exist_ok=True)
    for src in [*sorted((ROOT / "workflows").glob("*")), *sorted((ROOT / "tests" / "workflows").glob("*"))]:
        # The test servers hold a random-weight SD1.5 checkpoint under its own name: point the shipped
        # SD1.5 templates at it, as a team points templates at the model files its servers have.
        (wf / src.name).write_text(src.read_text(encoding="utf-8").replace(
            "v1-5-pruned-emaonly.safetensors", "random_sd15.safetensors"), encoding="utf-8")
    values = dict(comfyui_urls=tuple(urls), db_path=tmp_path / "tasks.db", output_dir=tmp_path / "generated_images",
                  workflows_dir=wf, log_dir=tmp_path / "logs", lease_seconds=3.0, connect_timeout=3.0,
                  read_timeout=30.0)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path, comfy: harness.ComfyServer) -> Settings:
    return make_settings(tmp_path, [comfy.url])


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    s = Store(settings.db_path)
    yield s
    s.close()


@pytest.fixture
def scheduler_factory(store: Store) -> Iterator:
    running: list[Scheduler] = []

    def start(settings: Settings) -> Scheduler:
        sched = Scheduler(settings, store)
        sched.start()
        running.append(sched)
        return sched

    yield start
    for sched in running:
        sched.stop()


@pytest.fixture
def scheduler(scheduler_factory, settings: Settings) -> Scheduler:
    return scheduler_factory(settings)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.1, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")
