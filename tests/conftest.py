"""Fixtures: a real ComfyUI on loopback (installed on first use), fresh settings/database per test, and an
in-process scheduler. Thin named fixtures over a few factories, as in datasette's suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings
from core.scheduler import Scheduler
from core.store import Store
from tests.comfyui_harness import server as harness
from tests.support import CHROMIUM, CHROMIUM_ARGS, S3Server, make_settings


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


REAL_PARTS = {"comfy", "comfy_factory", "sd15_checkpoint", "comfy_installed"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that needs a real ComfyUI (directly or through another fixture: an app server, a browser) is
    `slow`; `pytest -m "not slow"` is the fast tier: the engine's decisions, intake and pages without servers."""
    for item in items:
        if REAL_PARTS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Real headless Chromium (Debian's, through Playwright), one per test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def offline_engine(tmp_path: Path) -> Iterator[tuple[Settings, Store]]:
    """Settings with no ComfyUI server (nothing is preflighted) and their store: intake and front-door tests."""
    settings = make_settings(tmp_path, [])
    s = Store(settings.db_path)
    yield settings, s
    s.close()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A real S3-compatible server (moto's) on a free 127.0.0.1 port with a fresh bucket. boto3 is kept off
    every other address: no instance-metadata lookups, no proxy for loopback, explicit endpoint and dummy
    credentials in the settings the test builds from `s3.settings()`."""
    from core import storage

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = S3Server().start()
    server.create_bucket()
    yield server
    server.stop()
    storage.close_clients()
