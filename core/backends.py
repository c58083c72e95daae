"""Local backends: ComfyUI processes that ComfyBatch starts, watches and stops itself (one per GPU, or one on CPU).

What runs (`plan`, from the settings; InputError naming the setting when they are wrong):
- COMFYBATCH_BACKEND_DIR, a ComfyUI folder: its main.py through scripts/comfyui_launch.py under the folder's own
  Python (COMFYBATCH_BACKEND_PYTHON, else a `venv/` or `.venv/` in or beside the folder, else python3);
- or COMFYBATCH_BACKEND_COMMAND, any command that starts ComfyUI;
- or, with neither and no COMFYUI_URL, the demo (COMFYBATCH_DEMO=auto): the ComfyUI and the random-weight SD1.5
  checkpoint that scripts/setup.sh installed under .cache/comfyui/, on CPU.
One backend per entry of COMFYBATCH_BACKEND_GPUS (CUDA_VISIBLE_DEVICES=<gpu>), or one with `--cpu`; backend i
listens on 127.0.0.1 at the i-th port of COMFYBATCH_BACKEND_PORTS; COMFYBATCH_BACKEND_ARGS are appended.

`Supervisor` runs them. It owns child processes, not tasks, so it is the one thread outside core/scheduler.py:
- each child has its own process group and PR_SET_PDEATHSIG=SIGKILL, set to die with the thread that started
  it, so a `kill -9` of ComfyBatch does not leave it running. All starts and stops happen on that thread;
- before a start, a stale backend of ours on the port (its state file names a live process whose ComfyBatch is
  gone) is killed; a port held by another program, or by a live ComfyBatch, is waited on with a message;
- starting -> running once /system_stats answers; asked again every 5 s, one that stays silent for
  COMFYBATCH_BACKEND_HANG_SECONDS while its process lives (hung) is killed; when it dies, its in-flight tasks
  are requeued at once
  (`Store.release_in_flight`, the scheduler's rule for a server that lost its prompts) and it is restarted after
  a backoff of 1 s doubling to 60 s (back to 1 s after a minute of running);
- stdout and stderr go to logs/backends/<name>.log; past LOG_CAP bytes it is copied to <name>.log.1 and
  truncated in place (the child writes with O_APPEND): disk stays under about 2 x LOG_CAP, nothing in memory;
- its state (pid, port, state, restarts, last exit, message, owner pid) goes to logs/backends/<name>.json,
  which `read_status` reads for the Servers page from any process;
- `stop()`: SIGTERM to each process group, SIGKILL after the grace period; tasks still on it are requeued.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.comfy import probe
from core.config import PROJECT_DIR, Settings
from core.errors import InputError, Problem
from core.store import Store

log = logging.getLogger(__name__)

LAUNCHER = PROJECT_DIR / "scripts" / "comfyui_launch.py"
DEMO_DIR = PROJECT_DIR / ".cache" / "comfyui"
DEMO_CHECKPOINT = "random_sd15.safetensors"
DEMO_WORKFLOW = "demo_noise_sd15"
LOG_CAP = 5 * 1024 * 1024
TAIL_BYTES = 16 * 1024
BACKOFF_FIRST, BACKOFF_MAX, STABLE_AFTER = 1.0, 60.0, 60.0
READY_TIMEOUT = 300.0  # seconds a backend may take to answer /system_stats before it is restarted
HANG_PROBE_EVERY, HANG_PROBE_TIMEOUT = 5.0, 3.0  # a running backend is asked this often, given this long
MAX_BACKENDS = 64
STEP = 0.5


@dataclass(frozen=True)
class BackendSpec:
    name: str  # "cpu" or "gpu<N>": names its log and state files
    device: str  # "cpu" or a CUDA device index
    port: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Plan:
    mode: str  # "off", "configured" or "demo"
    specs: tuple[BackendSpec, ...] = ()
    note: str = ""  # for the pages: why nothing runs, or what the demo is


def demo_wanted(settings: Settings) -> bool:
    """The demo is for a machine with no ComfyUI of its own: nothing configured, demo not turned off."""
    return (settings.demo == "auto" and not settings.comfyui_urls and not settings.backend_dir
            and not settings.backend_command)


def demo_ready() -> bool:
    return (DEMO_DIR / "READY").is_file() and (DEMO_DIR / "ComfyUI" / "models" / "checkpoints" /
                                               DEMO_CHECKPOINT).is_file()


def plan(settings: Settings) -> Plan:
    """The backends the settings ask for. InputError (one Problem per wrong setting, `field` = its name)."""
    problems: list[Problem] = []
    mode = "configured"
    note = ""
    base: list[str] = []
    if settings.backend_dir and settings.backend_command:
        problems.append(Problem("set COMFYBATCH_BACKEND_DIR or COMFYBATCH_BACKEND_COMMAND, not both",
                                field="COMFYBATCH_BACKEND_COMMAND"))
    elif settings.backend_dir:
        folder = Path(settings.backend_dir).expanduser().resolve()
        if not (folder / "main.py").is_file():
            problems.append(Problem(f"{folder} is not a ComfyUI folder (it has no main.py); name the folder that "
                                    "holds ComfyUI's main.py", field="COMFYBATCH_BACKEND_DIR"))
        python = _python_for(settings, folder, problems)
        base = [python, str(LAUNCHER), str(folder)]
    elif settings.backend_command:
        try:
            base = shlex.split(settings.backend_command)
        except ValueError as exc:
            problems.append(Problem(f"cannot split the command: {exc}", field="COMFYBATCH_BACKEND_COMMAND"))
        if base and shutil.which(base[0]) is None:
            problems.append(Problem(f"program {base[0]!r} not found (not a file, or not on PATH)",
                                    field="COMFYBATCH_BACKEND_COMMAND"))
        elif not base and not problems:
            problems.append(Problem("the command is empty", field="COMFYBATCH_BACKEND_COMMAND"))
    elif demo_wanted(settings):
        if not demo_ready():
            return Plan("off", note="No ComfyUI is configured and the demo ComfyUI is not installed: run "
                                    "scripts/setup.sh (it installs it), set COMFYUI_URL, or add a server below.")
        mode = "demo"
        note = (f"Demo: ComfyBatch runs the ComfyUI that scripts/setup.sh installed, on CPU, with a random-weight "
                f"SD1.5 checkpoint ({DEMO_CHECKPOINT}): its images are coloured noise. Set COMFYUI_URL (or "
                "COMFYBATCH_BACKEND_DIR) to use real models.")
        base = [str(DEMO_DIR / "venv" / "bin" / "python"), str(LAUNCHER), str(DEMO_DIR / "ComfyUI")]
    else:
        return Plan("off")
    devices = ("cpu",) if mode == "demo" else _devices(settings.backend_gpus, problems)
    ports = _ports(settings.backend_ports, problems)
    try:
        extra = shlex.split(settings.backend_args)
    except ValueError as exc:
        problems.append(Problem(f"cannot split the arguments: {exc}", field="COMFYBATCH_BACKEND_ARGS"))
        extra = []
    if ports and len(devices) > len(ports):
        problems.append(Problem(f"{len(devices)} backends need {len(devices)} ports; the range has {len(ports)}",
                                field="COMFYBATCH_BACKEND_PORTS"))
    if problems:
        raise InputError("local ComfyUI backends cannot start; fix these settings", problems)
    specs = []
    for device, port in zip(devices, ports, strict=False):
        cpu = device == "cpu"
        argv = [*base, "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
                *(["--cpu"] if cpu else []), *extra]
        env = (("CUDA_VISIBLE_DEVICES", "" if cpu else device), ("PYTHONUNBUFFERED", "1"))
        specs.append(BackendSpec("cpu" if cpu else f"gpu{device}", device, port, tuple(argv), env))
    return Plan(mode, tuple(specs), note)


def _python_for(settings: Settings, folder: Path, problems: list[Problem]) -> str:
    if settings.backend_python:
        found = shutil.which(str(Path(settings.backend_python).expanduser()))
        if found is None:
            problems.append(Problem(f"Python {settings.backend_python!r} not found",
                                    field="COMFYBATCH_BACKEND_PYTHON"))
        return found or settings.backend_python
    for candidate in (folder / "venv", folder / ".venv", folder.parent / "venv", folder.parent / ".venv"):
        if (candidate / "bin" / "python").is_file():
            return str(candidate / "bin" / "python")
    return shutil.which("python3") or "python3"


def _devices(raw: str, problems: list[Problem]) -> tuple[str, ...]:
    text = raw.strip().lower()
    if text == "auto":
        return detect_gpus() or ("cpu",)
    if text == "cpu":
        return ("cpu",)
    items = [i.strip() for i in text.split(",") if i.strip()]
    if not items or not all(i.isdigit() and len(i) <= 3 for i in items) or len(set(items)) != len(items):
        problems.append(Problem(f"expected auto, cpu, or GPU numbers such as 0,1,2,3; got {raw!r}",
                                field="COMFYBATCH_BACKEND_GPUS"))
        return ()
    if len(items) > MAX_BACKENDS:
        problems.append(Problem(f"at most {MAX_BACKENDS} GPUs", field="COMFYBATCH_BACKEND_GPUS"))
        return ()
    return tuple(str(int(i)) for i in items)


def _ports(raw: str, problems: list[Problem]) -> range:
    first, sep, last = raw.strip().partition("-")
    try:
        lo, hi = int(first), int(last if sep else first)
    except ValueError:
        lo, hi = 0, -1
    if not 1024 <= lo <= hi <= 65535:
        problems.append(Problem(f"expected a port range such as 8188-8199 (ports 1024 to 65535); got {raw!r}",
                                field="COMFYBATCH_BACKEND_PORTS"))
        return range(0)
    return range(lo, min(hi, lo + MAX_BACKENDS - 1) + 1)


@functools.lru_cache(maxsize=1)
def detect_gpus() -> tuple[str, ...]:
    """CUDA device indices `nvidia-smi -L` lists (none without the tool or a driver)."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU ")))


# -- the supervisor -------------------------------------------------------------------------------------------
@dataclass
class Backend:
    spec: BackendSpec
    proc: subprocess.Popen[bytes] | None = None
    state: str = "starting"  # starting, running, backoff, waiting (port held), stopped
    restarts: int = 0
    last_exit: int | None = None
    message: str = ""
    next_start: float = 0.0
    backoff: float = BACKOFF_FIRST
    started_at: float = 0.0
    answered_at: float = 0.0  # the latest /system_stats answer while running (monotonic)
    probed_at: float = 0.0
    written: dict[str, Any] = field(default_factory=dict)


class Supervisor:
    """Starts the planned backends, restarts them when they die, stops them. `start()` returns at once;
    `step(now)` is one round (a test may call it without the thread)."""

    def __init__(self, settings: Settings, store: Store, backends_plan: Plan, grace: float = 10.0):
        self.settings = settings
        self.store = store
        self.plan = backends_plan
        self.grace = grace
        self.folder = settings.log_dir / "backends"
        self.backends = [Backend(spec) for spec in backends_plan.specs]
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self.run, name="comfybatch-backends", daemon=True)
        self._thread.start()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    self.step()
                except Exception:  # never let the thread die while it owns children
                    log.exception("local backends: supervisor step failed")
                self.stop_event.wait(STEP)
        finally:
            self._shutdown()  # on this thread: the children's PDEATHSIG is tied to it

    def stop(self) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(self.grace + 15)
        else:
            self._shutdown()

    def step(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for b in self.backends:
            if b.proc is not None:
                self._watch(b, now)
            if b.proc is None and now >= b.next_start:
                self._spawn(b, now)
            self._cap_log(b)
            self._write_state(b)

    def _watch(self, b: Backend, now: float) -> None:
        assert b.proc is not None
        code, hung = b.proc.poll(), False
        if code is None and b.state == "starting":
            if probe(b.spec.url, "comfybatch-supervisor", 1.0)["up"]:
                b.state, b.message, b.started_at = "running", "", now
                b.answered_at = b.probed_at = now
                log.info("local backend %s is up at %s (pid %s)", b.spec.name, b.spec.url, b.proc.pid)
            elif now - b.started_at > READY_TIMEOUT:
                log.warning("local backend %s did not answer within %.0f s; restarting", b.spec.name, READY_TIMEOUT)
                _kill_group(b.proc.pid, signal.SIGKILL)
                code = b.proc.wait(10)
        elif code is None and b.state == "running":
            if now - b.started_at > STABLE_AFTER:
                b.backoff = BACKOFF_FIRST
            code = self._kill_if_hung(b, now)
            hung = code is not None
        if code is None:
            return
        why = (f"did not answer for {self.settings.backend_hang_seconds:g} s while running: killed" if hung
               else f"exited with code {code}")
        b.proc, b.last_exit = None, code
        b.state, b.next_start = "backoff", now + b.backoff
        b.message = f"{why}; restarting in {b.backoff:g} s (see its log)"
        b.backoff = min(b.backoff * 2, BACKOFF_MAX)
        n = self.store.release_in_flight(b.spec.url, f"local backend {b.spec.name} {why}", self.settings.max_attempts)
        log.warning("local backend %s %s; %d task(s) requeued; restarting", b.spec.name, why, n)

    def _kill_if_hung(self, b: Backend, now: float) -> int | None:
        """Ask a running backend for /system_stats every HANG_PROBE_EVERY s; one whose process is alive but that
        has not answered for COMFYBATCH_BACKEND_HANG_SECONDS (a deadlock, a wedged driver) is killed. Returns its
        exit code then, else None. (ComfyUI answers while it runs a prompt: the server is
        asynchronous and prompts run on a thread of their own.)"""
        assert b.proc is not None
        if now - b.probed_at < HANG_PROBE_EVERY:
            return None
        b.probed_at = now
        if probe(b.spec.url, "comfybatch-supervisor", HANG_PROBE_TIMEOUT)["up"]:
            b.answered_at = now
            return None
        if now - b.answered_at <= self.settings.backend_hang_seconds:
            return None
        log.warning("local backend %s has not answered for %.0f s; killing it (pid %s)", b.spec.name,
                    now - b.answered_at, b.proc.pid)
        _kill_group(b.proc.pid, signal.SIGKILL)
        return b.proc.wait(10)

    def _spawn(self, b: Backend, now: float) -> None:
        blocker = self._clear_stale(b)
        if blocker is None and not _port_free(b.spec.port):
            blocker = (f"port {b.spec.port} is in use by another program; free it or change "
                       "COMFYBATCH_BACKEND_PORTS")
        if blocker:
            if blocker != b.message:
                log.warning("local backend %s waits: %s", b.spec.name, blocker)
            b.state, b.message, b.next_start = "waiting", blocker, now + 5.0
            return
        log_path = self.folder / f"{b.spec.name}.log"
        with open(log_path, "ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {shlex.join(b.spec.argv)}\n".encode())
            out.flush()
            try:
                b.proc = subprocess.Popen(
                    b.spec.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, **dict(b.spec.env)}, start_new_session=True,
                    preexec_fn=_die_with_parent(os.getpid()))
            except OSError as exc:
                b.state, b.message, b.next_start = "backoff", f"cannot start: {exc}", now + b.backoff
                b.backoff = min(b.backoff * 2, BACKOFF_MAX)
                log.error("local backend %s cannot start: %s", b.spec.name, exc)
                return
        if b.last_exit is not None or b.restarts or b.state == "backoff":
            b.restarts += 1
        b.state, b.started_at = "starting", now
        b.message = "" if b.last_exit is None else f"restarted after exit code {b.last_exit}"
        log.info("local backend %s starting (pid %s, port %s)", b.spec.name, b.proc.pid, b.spec.port)

    def _clear_stale(self, b: Backend) -> str | None:
        """Kill a backend of ours left on this port by a ComfyBatch that is gone; say who holds it otherwise."""
        old = _read_json(self.folder / f"{b.spec.name}.json")
        pid, owner = old.get("pid"), old.get("owner_pid")
        if not isinstance(pid, int) or old.get("port") != b.spec.port or _start_time(pid) != old.get("pid_start"):
            return None
        if isinstance(owner, int) and owner != os.getpid() and _start_time(owner) == old.get("owner_start"):
            return f"port {b.spec.port} is run by ComfyBatch process {owner} (a second app or worker --backends)"
        log.warning("local backend %s: killing stale process %s left on port %s", b.spec.name, pid, b.spec.port)
        _kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while _start_time(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        _kill_group(pid, signal.SIGKILL)
        return None

    def _cap_log(self, b: Backend) -> None:
        path = self.folder / f"{b.spec.name}.log"
        with contextlib.suppress(OSError):
            if path.stat().st_size > LOG_CAP:
                shutil.copyfile(path, path.with_name(path.name + ".1"))
                os.truncate(path, 0)

    def _write_state(self, b: Backend) -> None:
        pid = b.proc.pid if b.proc is not None else None
        state = {"name": b.spec.name, "device": b.spec.device, "port": b.spec.port, "url": b.spec.url,
                 "state": b.state, "pid": pid, "pid_start": _start_time(pid) if pid else None,
                 "restarts": b.restarts, "last_exit": b.last_exit, "message": b.message, "mode": self.plan.mode,
                 "owner_pid": os.getpid(), "owner_start": _start_time(os.getpid())}
        if state != b.written:
            tmp = self.folder / f".{b.spec.name}.json.tmp"
            tmp.write_text(json.dumps(state), encoding="utf-8")
            os.replace(tmp, self.folder / f"{b.spec.name}.json")
            b.written = state

    def _shutdown(self) -> None:
        running = [b for b in self.backends if b.proc is not None and b.proc.poll() is None]
        for b in running:
            assert b.proc is not None
            _kill_group(b.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for b in running:
            assert b.proc is not None
            try:
                b.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("local backend %s ignored SIGTERM for %.0f s; killing it", b.spec.name, self.grace)
            _kill_group(b.proc.pid, signal.SIGKILL)
            b.proc.wait(10)
        for b in self.backends:
            b.last_exit = b.proc.returncode if b.proc is not None else b.last_exit
            b.proc, b.state, b.message = None, "stopped", "stopped with ComfyBatch"
            with contextlib.suppress(OSError):
                self._write_state(b)
            self.store.release_in_flight(b.spec.url, f"local backend {b.spec.name} stopped with ComfyBatch",
                                         self.settings.max_attempts, spend_attempt=False)


def read_status(settings: Settings, tail_lines: int = 40) -> list[dict[str, Any]]:
    """Each local backend's last state (from any ComfyBatch process) and the tail of its log."""
    folder = settings.log_dir / "backends"
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        state = _read_json(path)
        if not state.get("name"):
            continue
        owner = state.get("owner_pid")
        if state.get("state") != "stopped" and not (isinstance(owner, int)
                                                    and _start_time(owner) == state.get("owner_start")):
            state.update(state="stopped", pid=None, message="its ComfyBatch process is gone")
        state["log"] = tail(folder / f"{state['name']}.log", tail_lines)
        out.append(state)
    return out


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a file, reading at most TAIL_BYTES of it."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


# -- process helpers --------------------------------------------------------------------------------------------
def _die_with_parent(parent: int) -> Any:
    """A preexec_fn: the child gets SIGKILL when the thread that started it ends (Linux PR_SET_PDEATHSIG), and
    exits at once if that parent is already gone. Elsewhere it does nothing (stop() and stale-port cleanup stay)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork

    def child() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return child


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _start_time(pid: int | None) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat), to tell it from a later process with its pid."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
