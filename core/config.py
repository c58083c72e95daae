"""Settings: the only module that reads environment variables or `.streamlit/secrets.toml`.

Precedence: environment variable, then a top-level key of the same name in `.streamlit/secrets.toml`,
then the default written once in `SETTINGS`. The README's settings table is checked against `SETTINGS`
by a test, so a new knob is documented the day it is added.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError

PROJECT_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Setting:
    env: str
    attr: str
    default: str
    kind: type
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("COMFYUI_URL", "comfyui_urls", "", tuple,
            "ComfyUI server URL, or a comma-separated list for several servers. Empty: add them on the Servers page."),
    Setting("COMFYBATCH_DB", "db_path", "tasks.db", Path, "SQLite database file (created on first use)."),
    Setting("COMFYBATCH_OUTPUT_DIR", "output_dir", "generated_images", Path,
            "Where result images are saved, one folder per batch."),
    Setting("COMFYBATCH_WORKFLOWS_DIR", "workflows_dir", "workflows", Path, "Folder of workflow templates."),
    Setting("COMFYBATCH_LOG_DIR", "log_dir", "logs", Path, "Folder of the rotating log file."),
    Setting("COMFYBATCH_IN_FLIGHT", "in_flight", "2", int,
            "Prompts kept queued or running on each ComfyUI server at once."),
    Setting("COMFYBATCH_CONNECT_TIMEOUT", "connect_timeout", "10", float, "Seconds to connect to ComfyUI."),
    Setting("COMFYBATCH_READ_TIMEOUT", "read_timeout", "60", float, "Seconds to wait for a ComfyUI reply."),
    Setting("COMFYBATCH_MAX_ATTEMPTS", "max_attempts", "3", int,
            "Attempts per task before it is marked failed (HTTP 400 rejections are never retried)."),
    Setting("COMFYBATCH_LEASE_SECONDS", "lease_seconds", "15", float,
            "A scheduler that stops renewing its lease for this long is presumed dead and replaced."),
    Setting("COMFYBATCH_API_TOKENS", "api_tokens", "", list,
            "Comma-separated bearer tokens for the HTTP API and file downloads. Empty: no token needed."),
    Setting("COMFYBATCH_CORS_ORIGINS", "cors_origins", "", list,
            "Comma-separated origins allowed to call the HTTP API from a browser (`*` for any). Empty: none."),
    Setting("COMFYBATCH_PUBLIC_URL", "public_url", "", str,
            "Base URL used in API replies (e.g. behind a proxy). Empty: taken from each request."),
    Setting("COMFYBATCH_MAX_UPLOAD_MB", "max_upload_mb", "200", float,
            "Largest HTTP API request body (CSV and images) in megabytes."),
    Setting("COMFYBATCH_MAX_CSV_MB", "max_csv_mb", "20", float,
            "Largest CSV file in megabytes, from the CLI, the API and the Batch page alike (refused before reading)."),
    Setting("COMFYBATCH_MAX_ROWS", "max_rows", "10000", int,
            "Most rows in one submission (CSV rows or API rows)."),
    Setting("COMFYBATCH_MAX_COUNT", "max_count", "1000", int,
            "Largest `count` (copies of a row): the CLI's --count, the API's count, a CSV count column, the forms."),
    Setting("COMFYBATCH_MAX_TASKS", "max_tasks", "20000", int,
            "Most tasks one submission may create (rows x count), checked before anything is expanded."),
)


@dataclass(frozen=True)
class Settings:
    comfyui_urls: tuple[str, ...] = ()
    db_path: Path = Path("tasks.db")
    output_dir: Path = Path("generated_images")
    workflows_dir: Path = Path("workflows")
    log_dir: Path = Path("logs")
    in_flight: int = 2
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 3
    lease_seconds: float = 15.0
    api_tokens: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    public_url: str = ""
    max_upload_mb: float = 200.0
    max_csv_mb: float = 20.0
    max_rows: int = 10_000
    max_count: int = 1000
    max_tasks: int = 20_000

    @property
    def max_csv_bytes(self) -> int:
        return int(self.max_csv_mb * 1024 * 1024)

    @classmethod
    def load(cls, env: dict[str, str] | None = None, secrets_path: Path | None = None,
             base_dir: Path | None = None) -> Settings:
        """Read every setting: environment first, then secrets.toml, then the default.

        Relative paths are resolved against `base_dir` (default: the current directory).
        """
        env = dict(os.environ) if env is None else env
        base = Path.cwd() if base_dir is None else base_dir
        secrets = _read_secrets(secrets_path or base / ".streamlit" / "secrets.toml")
        values: dict[str, Any] = {}
        for s in SETTINGS:
            raw = env.get(s.env)
            if raw is None:
                raw = secrets.get(s.env, s.default)
            values[s.attr] = _convert(s, raw, base)
        return cls(**values)

    def with_overrides(self, **changes: Any) -> Settings:
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data.update(changes)
        return Settings(**data)


def parse_urls(raw: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Split a comma-separated (or listed) set of server URLs; accept `host:port` without a scheme."""
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
    urls = []
    for item in items:
        url = str(item).strip().rstrip("/")
        if not url:
            continue
        if "://" not in url:
            url = "http://" + url
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"COMFYUI_URL: {item!r} is not an http(s) URL")
        if url not in urls:
            urls.append(url)
    return tuple(urls)


def _convert(s: Setting, raw: Any, base: Path) -> Any:
    if s.kind is tuple:
        return parse_urls(raw)
    if s.kind is list:
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        return tuple(str(i).strip() for i in items if str(i).strip())
    if s.kind is str:
        return str(raw).strip().rstrip("/")
    if s.kind is Path:
        p = Path(str(raw)).expanduser()
        return p if p.is_absolute() else base / p
    try:
        value = s.kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{s.env}: {raw!r} is not a valid {s.kind.__name__}") from None
    if value <= 0:
        raise ConfigError(f"{s.env}: must be greater than 0, got {raw!r}")
    return value


def _read_secrets(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read secrets file: {exc}") from None
