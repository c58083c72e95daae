"""`streamlit run app.py` as a real subprocess for browser, API and benchmark runs: free port, settings in a
temporary folder, ready when `/_stcore/health` answers `ok`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from core.config import SETTINGS, Settings
from tests.comfyui_harness.server import free_port
from tests.support import ROOT, make_settings


@dataclass
class AppServer:
    url: str
    settings: Settings
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def api(self) -> str:
        return self.url + "/api/v1"

    def stop(self) -> int:
        """SIGTERM, as a service manager would; Streamlit ends by re-raising it, so -15 is a clean exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as the environment variable the app reads."""
    env = {}
    for s in SETTINGS:
        value: Any = getattr(settings, s.attr)
        env[s.env] = ",".join(value) if isinstance(value, tuple) else "" if value is None else str(value)
    return env


def start_app(home: Path, urls: list[str], extra_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None,
              **overrides: Any) -> AppServer:
    home.mkdir(parents=True, exist_ok=True)
    settings = make_settings(home, urls, **overrides)
    env = {**os.environ, **settings_env(settings), **(extra_env or {})}
    port = free_port()
    log = home / "streamlit.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port",
             str(port), "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false", *extra_args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = AppServer(f"http://127.0.0.1:{port}", settings, proc, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if requests.get(server.url + "/_stcore/health", timeout=1).text == "ok":
                return server
        except requests.RequestException:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"streamlit did not answer on {server.url}:\n{log.read_text()}")
