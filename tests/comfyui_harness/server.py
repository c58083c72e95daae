"""Start and stop real ComfyUI processes for tests and benchmarks (installed by scripts/install_comfyui.sh)."""

from __future__ import annotations

import os
import shutil
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
        subprocess.run(["bash", str(ROOT / "scripts" / "install_comfyui.sh")], check=True)


def ensure_checkpoint() -> Path:
    """Generate the random-weight SD1.5 checkpoint once (cached beside the ComfyUI install)."""
    if not CHECKPOINT.is_file():
        CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(PYTHON), str(ROOT / "scripts" / "make_sd15.py"), str(COMFY_DIR),
                        str(CHECKPOINT)], check=True)
    return CHECKPOINT


SECOND_CHECKPOINT = "random_sd15_b.safetensors"


def second_checkpoint_config(work: Path) -> Path:
    """An extra_model_paths.yaml (for --extra-model-paths-config) naming a folder under `work` that holds a
    second, distinct random-weight checkpoint: a copy of the test checkpoint whose last byte differs (the low
    bit of a float16 weight). The shared install's models folder is left alone."""
    folder = work / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / SECOND_CHECKPOINT
    if not copy.is_file():
        shutil.copyfile(ensure_checkpoint(), copy)
        with open(copy, "r+b") as f:
            f.seek(-1, 2)
            last = f.read(1)[0]
            f.seek(-1, 2)
            f.write(bytes([last ^ 1]))
    config = work / "extra_model_paths.yaml"
    config.write_text(f"extra:\n    base_path: {work / 'models'}\n    checkpoints: checkpoints\n", encoding="utf-8")
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ComfyServer:
    """One real ComfyUI on 127.0.0.1 with its own input/output/temp/user folders under `home`."""

    def __init__(self, home: Path, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.home = home
        self.extra_args = extra_args  # more main.py options, e.g. --extra-model-paths-config FILE
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in ("input", "output", "temp", "user"):
            (home / sub).mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 300.0) -> ComfyServer:  # generous: the shared machine is often loaded
        log = open(self.home / "comfyui.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [str(PYTHON), str(ROOT / "scripts" / "comfyui_launch.py"), str(COMFY_DIR), "--cpu",
             "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
             "--output-directory", str(self.home / "output"), "--input-directory", str(self.home / "input"),
             "--temp-directory", str(self.home / "temp"), "--user-directory", str(self.home / "user"),
             *self.extra_args],
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

    def model_loads(self) -> int:
        """Checkpoint loads from disk so far: ComfyUI logs `model_type ...` once for each."""
        return sum(1 for line in (self.home / "comfyui.log").read_text(errors="replace").splitlines()
                   if line.startswith("model_type "))

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
