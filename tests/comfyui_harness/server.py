"""Start and stop real ComfyUI processes for tests and benchmarks (installed by install.sh)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("COMFYBATCH_TEST_COMFYUI_DIR", ROOT / ".cache" / "comfyui"))
PYTHON = CACHE / "venv" / "bin" / "python"
COMFY_DIR = CACHE / "ComfyUI"
CHECKPOINT = COMFY_DIR / "models" / "checkpoints" / "random_sd15.safetensors"


def ensure_installed() -> None:
    if not (CACHE / "READY").is_file():
        subprocess.run(["bash", str(ROOT / "tests" / "comfyui_harness" / "install.sh")], check=True)


def ensure_checkpoint() -> Path:
    """Generate the random-weight SD1.5 checkpoint once (cached beside the ComfyUI install)."""
    if not CHECKPOINT.is_file():
        CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(PYTHON), str(ROOT / "tests" / "comfyui_harness" / "make_sd15.py"), str(COMFY_DIR),
                        str(CHECKPOINT)], check=True)
    return CHECKPOINT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ComfyServer:
    """One real ComfyUI on 127.0.0.1 with its own input/output/temp/user folders under `home`."""

    def __init__(self, home: Path, port: int | None = None):
        self.home = home
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in ("input", "output", "temp", "user"):
            (home / sub).mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 120.0) -> ComfyServer:
        log = open(self.home / "comfyui.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [str(PYTHON), str(ROOT / "tests" / "comfyui_harness" / "launch.py"), str(COMFY_DIR), "--cpu",
             "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
             "--output-directory", str(self.home / "output"), "--input-directory", str(self.home / "input"),
             "--temp-directory", str(self.home / "temp"), "--user-directory", str(self.home / "user")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; see {self.home / 'comfyui.log'}")
            try:
                if requests.get(self.url + "/system_stats", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer on {self.url} within {timeout}s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.kill()
        self.start()


if __name__ == "__main__":  # python tests/comfyui_harness/server.py [PORT]: run one for manual use
    ensure_installed()
    server = ComfyServer(ROOT / ".cache" / "manual-server", int(sys.argv[1]) if len(sys.argv) > 1 else None).start()
    print(server.url, flush=True)
    try:
        signal.pause()
    finally:
        server.stop()
