"""Settings: the only module that reads environment variables or `.streamlit/secrets.toml`.

Precedence: environment variable, then a top-level key of the same name in `.streamlit/secrets.toml` (or the
file COMFYBATCH_SECRETS_FILE names), then the default written once in `SETTINGS`. An `[auth]` table there
turns on OIDC sign-in through Streamlit's st.login. The README's settings table is checked against `SETTINGS`
by a test, so a new knob is documented the day it is added.
"""

from __future__ import annotations

import os
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.errors import ConfigError

PROJECT_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Setting:
    env: str
    attr: str
    default: str
    kind: type
    help: str
    choices: tuple[str, ...] = ()


SETTINGS: tuple[Setting, ...] = (
    Setting("COMFYUI_URL", "comfyui_urls", "", tuple,
            "ComfyUI server URL, or a comma-separated list for several servers. Empty: add them on the Servers page."),
    Setting("COMFYBATCH_DB", "db_path", "tasks.db", Path, "SQLite database file (created on first use)."),
    Setting("COMFYBATCH_OUTPUT_DIR", "output_dir", "generated_images", Path,
            "Where result images are saved, one folder per batch."),
    Setting("COMFYBATCH_WORKFLOWS_DIR", "workflows_dir", "workflows", Path, "Folder of workflow templates."),
    Setting("COMFYBATCH_LOG_DIR", "log_dir", "logs", Path, "Folder of the rotating log file."),
    Setting("COMFYBATCH_LOG_LEVEL", "log_level", "INFO", str,
            "Level of the log file and the worker's stderr: `INFO` logs each scheduler's tasks finished once a "
            "minute, `DEBUG` also a line per task posted and per task finished (two lines per task: a fleet at 200 "
            "jobs/s would roll a capped log file over in minutes), `WARNING` only problems.",
            choices=("DEBUG", "INFO", "WARNING")),
    Setting("COMFYBATCH_IN_FLIGHT", "in_flight", "2", int,
            "Prompts kept queued or running on each ComfyUI server at once, at least (more for a server "
            "far away or with short jobs: the window follows its round trip and run time)."),
    Setting("COMFYBATCH_CONNECT_TIMEOUT", "connect_timeout", "10", float, "Seconds to connect to ComfyUI."),
    Setting("COMFYBATCH_READ_TIMEOUT", "read_timeout", "60", float, "Seconds to wait for a ComfyUI reply."),
    Setting("COMFYBATCH_MAX_ATTEMPTS", "max_attempts", "3", int,
            "Attempts per task before it is marked failed (HTTP 400 rejections are never retried)."),
    Setting("COMFYBATCH_POLICY", "policy", "fair", str,
            "Order of batches at equal priority: `fair` (batches take turns, one task each) or `fifo` (oldest "
            "batch first). Higher priority always goes first.", choices=("fair", "fifo")),
    Setting("COMFYBATCH_AFFINITY", "affinity", "true", bool,
            "`true`: a server prefers tasks loading the models (checkpoint, UNet, CLIP, VAE, LoRA) its last task "
            "loaded, to spare model reloads; `false`: the queue order alone."),
    Setting("COMFYBATCH_AFFINITY_PATIENCE", "affinity_patience", "16", int,
            "With affinity on, how many claims a batch may be passed over for another server's loaded model "
            "before it must go next (fairness wins then)."),
    Setting("COMFYBATCH_STALL_FLOOR", "stall_floor", "120", float,
            "Seconds: a task with no word from ComfyUI for max(5 x its workflow's p95 run time, this) is "
            "interrupted and requeued (an attempt spent)."),
    Setting("COMFYBATCH_STALL_CEILING", "stall_ceiling", "1800", float,
            "Seconds: the stall limit of a workflow with fewer than 5 finished tasks (no p95 to go by yet)."),
    Setting("COMFYBATCH_QUARANTINE_AFTER", "quarantine_after", "3", int,
            "A server whose last this many tasks failed (execution errors or stalls) is quarantined."),
    Setting("COMFYBATCH_QUARANTINE_SECONDS", "quarantine_seconds", "300", float,
            "How long a quarantined server gets no work (its queued work goes to the other servers)."),
    Setting("COMFYBATCH_LEASE_SECONDS", "lease_seconds", "15", float,
            "A scheduler that stops renewing its lease for this long is presumed dead and replaced."),
    Setting("COMFYBATCH_API_TOKENS", "api_tokens", "", list,
            "Comma-separated bearer tokens for the HTTP API and file downloads. Empty: no token needed."),
    # Sign-in (core.users, core.accounts). With neither a users file nor `[auth]` in secrets.toml: no sign-in.
    Setting("COMFYBATCH_USERS_FILE", "users_file", "", Path,
            "Local accounts file (TOML; `python -m core users add NAME --role ROLE` writes it). Set: the "
            "pages need a sign-in. Empty: no local accounts."),
    Setting("COMFYBATCH_ADMINS", "admins", "", list,
            "Comma-separated OIDC identities (e-mail, else the subject) who sign in as admin; everyone else who "
            "signs in through the identity provider is a member."),
    Setting("COMFYBATCH_SESSION_HOURS", "session_hours", "12", float,
            "Hours a local sign-in lasts (signing out ends it at once)."),
    Setting("COMFYBATCH_LOCKOUT_AFTER", "lockout_after", "5", int,
            "Failed sign-ins in a row for one user name before sign-in is refused for a delay."),
    Setting("COMFYBATCH_LOCKOUT_SECONDS", "lockout_seconds", "30", float,
            "The first lockout delay in seconds; it doubles with each further failure (at most an hour)."),
    Setting("COMFYBATCH_USER_MAX_QUEUED", "user_max_queued", "0", int,
            "Most tasks one person may have queued at once; a submission over it is refused. 0: no cap."),
    Setting("COMFYBATCH_PRIVATE_BATCHES", "private_batches", "false", bool,
            "true: a member sees only the batches they submitted (and their tasks, images and events); admins "
            "see all. false: everyone sees everyone's batches."),
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
            "Most tasks one submission may create (rows x count x the product of its lists), checked before anything "
            "is expanded."),
    Setting("COMFYBATCH_MAX_SWEEP_VALUES", "max_sweep_values", "100", int,
            "Most values in one list of a sweep (a parameter given several values; see core/sweeps.py)."),
    # Object storage (S3 and S3-compatible stores). An empty bucket turns the feature off.
    Setting("COMFYBATCH_S3_BUCKET", "s3_bucket", "", str,
            "Bucket that result images are uploaded to after they are saved locally. Empty: object storage off."),
    Setting("COMFYBATCH_S3_ENDPOINT_URL", "s3_endpoint_url", "", str,
            "S3-compatible endpoint, e.g. `https://oss-cn-hangzhou.aliyuncs.com` (Alibaba OSS), "
            "`https://cos.ap-shanghai.myqcloud.com` (Tencent COS), `http://minio:9000`, "
            "`https://<account>.r2.cloudflarestorage.com`. Empty: AWS S3."),
    Setting("COMFYBATCH_S3_REGION", "s3_region", "us-east-1", str,
            "Region of the bucket (`oss-cn-hangzhou`, `ap-shanghai`, `auto` for R2, ...)."),
    Setting("COMFYBATCH_S3_PREFIX", "s3_prefix", "comfybatch/{date}/batch-{batch}", str,
            "Folder of the object keys; `{batch}` is the batch id (5 digits), `{date}` the batch's creation date "
            "(UTC, YYYY-MM-DD). The key is this, `/`, then the local file name."),
    Setting("COMFYBATCH_S3_ACCESS_KEY_ID", "s3_access_key_id", "", str,
            "Access key id (never logged). Empty: boto3's own chain (AWS_* variables, ~/.aws, an instance role)."),
    Setting("COMFYBATCH_S3_SECRET_ACCESS_KEY", "s3_secret_access_key", "", str,
            "Secret access key (never logged); put it in the environment or `.streamlit/secrets.toml`."),
    Setting("COMFYBATCH_S3_ADDRESSING_STYLE", "s3_addressing_style", "auto", str,
            "`auto`, `virtual` (bucket in the host name: Alibaba OSS, Tencent COS) or `path` (MinIO).",
            choices=("auto", "virtual", "path")),
    Setting("COMFYBATCH_S3_LINKS", "s3_links", "presigned", str,
            "Links to stored images: `presigned` (signed, expiring URLs) or `public` (`COMFYBATCH_S3_PUBLIC_URL` "
            "+ key, for a public bucket or a CDN).", choices=("presigned", "public")),
    Setting("COMFYBATCH_S3_LINK_EXPIRY", "s3_link_expiry", "3600", int,
            "Seconds a presigned link stays valid (at most 604800, 7 days)."),
    Setting("COMFYBATCH_S3_PUBLIC_URL", "s3_public_url", "", str,
            "Base URL of public links, e.g. `https://my-bucket.oss-cn-hangzhou.aliyuncs.com` or a CDN; needed "
            "when `COMFYBATCH_S3_LINKS` is `public`."),
    Setting("COMFYBATCH_S3_DELETE_LOCAL", "s3_delete_local", "false", bool,
            "`true`: delete the local copy once its upload is verified (ETag = MD5, or the size); thumbnails stay."),
    # Local backends (core/backends.py): ComfyUI processes that ComfyBatch starts and supervises itself.
    Setting("COMFYBATCH_BACKEND_DIR", "backend_dir", "", str,
            "A ComfyUI folder (the one holding `main.py`) that ComfyBatch starts, one process per GPU, registers "
            "as servers, restarts if they die and stops on shutdown. Empty: none."),
    Setting("COMFYBATCH_BACKEND_COMMAND", "backend_command", "", str,
            "Instead of a folder, the command that starts ComfyUI (e.g. `/opt/comfy/venv/bin/python "
            "/opt/comfy/main.py`); `--listen 127.0.0.1 --port N` and the arguments below are appended."),
    Setting("COMFYBATCH_BACKEND_PYTHON", "backend_python", "", str,
            "The Python that runs the folder's `main.py`. Empty: a `venv/` or `.venv/` in or beside the folder, "
            "else `python3`."),
    Setting("COMFYBATCH_BACKEND_GPUS", "backend_gpus", "auto", str,
            "GPUs for local backends, one process each with `CUDA_VISIBLE_DEVICES` (e.g. `0,1,2,3`); `cpu`: one "
            "process with `--cpu`; `auto`: every GPU `nvidia-smi -L` lists, else `cpu`."),
    Setting("COMFYBATCH_BACKEND_PORTS", "backend_ports", "8188-8199", str,
            "Port range of local backends on 127.0.0.1: backend i listens on the i-th port."),
    Setting("COMFYBATCH_BACKEND_ARGS", "backend_args", "", str,
            "Extra ComfyUI arguments for every local backend (e.g. `--highvram --preview-method none`)."),
    Setting("COMFYBATCH_BACKEND_HANG_SECONDS", "backend_hang_seconds", "120", float,
            "A running local backend whose process is alive but which has not answered `/system_stats` for this "
            "long (asked every 5 s) is killed and restarted, its in-flight tasks requeued."),
    Setting("COMFYBATCH_DEMO", "demo", "auto", str,
            "`auto`: with no `COMFYUI_URL` and no local backend set, run the demo ComfyUI that `scripts/setup.sh` "
            "installed (CPU, a random-weight checkpoint: noise images); `off`: never.", choices=("auto", "off")),
    Setting("COMFYBATCH_COMPAT_WORKFLOW", "compat_workflow", "qwen_image_t2i", str,
            "Workflow the old tool's API (`/compat`) runs for a request without `input_image`."),
    Setting("COMFYBATCH_COMPAT_EDIT_WORKFLOW", "compat_edit_workflow", "qwen_edit_i2i", str,
            "Workflow the old tool's API (`/compat`) runs for a request with `input_image`."),
    Setting("COMFYBATCH_WEBHOOK_SECRET", "webhook_secret", "", str,
            "Key of the HMAC-SHA256 signature of webhook calls (header `X-ComfyBatch-Signature-256`; never "
            "logged). Empty: calls are sent unsigned."),
    Setting("COMFYBATCH_WEBHOOK_BACKOFF", "webhook_backoff", "10,30,60,120,300,600,900,1800,1800", list,
            "Seconds to wait before each retry of a failed webhook call, comma-separated (one entry per retry; "
            "the default retries 9 times over about 94 minutes)."),
)

MAX_LINK_EXPIRY = 604_800  # SigV4 presigned URLs are valid for at most 7 days
PREFIX_FIELDS = {"batch", "date"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Settings:
    comfyui_urls: tuple[str, ...] = ()
    db_path: Path = Path("tasks.db")
    output_dir: Path = Path("generated_images")
    workflows_dir: Path = Path("workflows")
    log_dir: Path = Path("logs")
    log_level: str = "INFO"
    in_flight: int = 2
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 3
    policy: str = "fair"
    affinity: bool = True
    affinity_patience: int = 16
    stall_floor: float = 120.0
    stall_ceiling: float = 1800.0
    quarantine_after: int = 3
    quarantine_seconds: float = 300.0
    lease_seconds: float = 15.0
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    users_file: Path | None = None
    admins: tuple[str, ...] = ()
    session_hours: float = 12.0
    lockout_after: int = 5
    lockout_seconds: float = 30.0
    user_max_queued: int = 0
    private_batches: bool = False
    oidc: bool = False  # `[auth]` is in .streamlit/secrets.toml: sign-in through st.login (not an env setting)
    link_secret: str = field(default="", repr=False)  # `[auth]` cookie_secret: signs image links with OIDC
    cors_origins: tuple[str, ...] = ()
    public_url: str = ""
    max_upload_mb: float = 200.0
    max_csv_mb: float = 20.0
    max_rows: int = 10_000
    max_count: int = 1000
    max_tasks: int = 20_000
    max_sweep_values: int = 100
    s3_bucket: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    s3_prefix: str = "comfybatch/{date}/batch-{batch}"
    s3_access_key_id: str = field(default="", repr=False)
    s3_secret_access_key: str = field(default="", repr=False)
    s3_addressing_style: str = "auto"
    s3_links: str = "presigned"
    s3_link_expiry: int = 3600
    s3_public_url: str = ""
    s3_delete_local: bool = False
    backend_dir: str = ""
    backend_command: str = ""
    backend_python: str = ""
    backend_gpus: str = "auto"
    backend_ports: str = "8188-8199"
    backend_args: str = ""
    backend_hang_seconds: float = 120.0
    demo: str = "auto"
    compat_workflow: str = "qwen_image_t2i"
    compat_edit_workflow: str = "qwen_edit_i2i"
    webhook_secret: str = field(default="", repr=False)
    webhook_backoff: tuple[str, ...] = ("10", "30", "60", "120", "300", "600", "900", "1800", "1800")

    def __post_init__(self) -> None:
        check_storage(self)
        self.webhook_delays  # noqa: B018 - checked at load: a bad schedule is a ConfigError, not a stuck delivery

    @property
    def storage_enabled(self) -> bool:
        """Object storage is on when a bucket is set."""
        return bool(self.s3_bucket)

    @property
    def sign_in(self) -> bool:
        """Whether the pages need a sign-in: local accounts or an OIDC provider is configured."""
        return self.users_file is not None or self.oidc

    @property
    def webhook_delays(self) -> tuple[float, ...]:
        """COMFYBATCH_WEBHOOK_BACKOFF as seconds (ConfigError when an entry is not a positive number)."""
        delays = []
        for item in self.webhook_backoff:
            try:
                value = float(item)
            except (TypeError, ValueError):
                value = -1.0
            if not 0 < value <= 86_400:
                raise ConfigError(f"COMFYBATCH_WEBHOOK_BACKOFF: {str(item)[:40]!r} is not a number of seconds "
                                  "greater than 0 and at most 86400")
            delays.append(value)
        if len(delays) > 50:
            raise ConfigError("COMFYBATCH_WEBHOOK_BACKOFF: at most 50 retries")
        return tuple(delays)

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
        # COMFYBATCH_SECRETS_FILE: the secrets file Streamlit was pointed at (`--secrets.files`), if not the usual.
        secrets = _read_secrets(secrets_path or Path(env.get("COMFYBATCH_SECRETS_FILE") or
                                                     base / ".streamlit" / "secrets.toml"))
        values: dict[str, Any] = {}
        for s in SETTINGS:
            raw = env.get(s.env)
            if raw is None:
                raw = secrets.get(s.env, s.default)
            values[s.attr] = _convert(s, raw, base)
        auth = secrets.get("auth")
        link_secret = str(auth.get("cookie_secret", "")) if isinstance(auth, dict) else ""
        return cls(**values, oidc=isinstance(auth, dict), link_secret=link_secret)

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


def check_storage(settings: Settings) -> None:
    """The object storage settings, checked together (ConfigError naming the setting). Never echoes a
    credential: an endpoint URL with user info in it is refused without being repeated."""
    for s in SETTINGS:
        if s.choices and getattr(settings, s.attr) not in s.choices:
            raise ConfigError(f"{s.env}: expected one of {', '.join(s.choices)}, got {getattr(settings, s.attr)!r}")
    if not 0 < settings.s3_link_expiry <= MAX_LINK_EXPIRY:
        raise ConfigError(f"COMFYBATCH_S3_LINK_EXPIRY: must be from 1 to {MAX_LINK_EXPIRY} seconds (7 days, the "
                          f"longest a presigned link can live), got {settings.s3_link_expiry!r}")
    for env, url in (("COMFYBATCH_S3_ENDPOINT_URL", settings.s3_endpoint_url),
                     ("COMFYBATCH_S3_PUBLIC_URL", settings.s3_public_url)):
        if not url:
            continue
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise ConfigError(f"{env}: the URL must not contain a user name or password; set "
                              "COMFYBATCH_S3_ACCESS_KEY_ID and COMFYBATCH_S3_SECRET_ACCESS_KEY instead")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{env}: {url!r} is not an http(s) URL")
    prefix = settings.s3_prefix
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(prefix) if name is not None}
    except ValueError:
        fields = {"{"}
    if fields - PREFIX_FIELDS:
        raise ConfigError(f"COMFYBATCH_S3_PREFIX: {prefix!r} may use only the placeholders {{batch}} and {{date}}")
    if ".." in prefix.split("/") or "\\" in prefix or len(prefix) > 500:
        raise ConfigError(f"COMFYBATCH_S3_PREFIX: {prefix!r} must be a plain folder path (no '..', no "
                          "backslashes, at most 500 characters)")
    if not settings.s3_bucket:
        return
    if bool(settings.s3_access_key_id) != bool(settings.s3_secret_access_key):
        raise ConfigError("COMFYBATCH_S3_ACCESS_KEY_ID and COMFYBATCH_S3_SECRET_ACCESS_KEY: set both, or neither "
                          "(boto3's own credential chain is used then)")
    if settings.s3_links == "public" and not settings.s3_public_url:
        raise ConfigError("COMFYBATCH_S3_PUBLIC_URL: required when COMFYBATCH_S3_LINKS is public (the base URL "
                          "the bucket's objects are served from, e.g. https://my-bucket.oss-cn-hangzhou.aliyuncs.com)")


def _convert(s: Setting, raw: Any, base: Path) -> Any:
    if s.kind is bool:
        text = str(raw).strip().lower()
        if text not in _TRUE + _FALSE:
            raise ConfigError(f"{s.env}: expected true or false, got {raw!r}")
        return text in _TRUE
    if s.kind is tuple:
        return parse_urls(raw)
    if s.kind is list:
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        return tuple(str(i).strip() for i in items if str(i).strip())
    if s.kind is str:
        text = str(raw).strip()
        # Only URLs lose a trailing slash: a secret key may well end in one.
        return text.rstrip("/") if s.attr.endswith("url") else text
    if s.kind is Path:
        if s.default == "" and not str(raw).strip():
            return None  # an optional file, not set
        p = Path(str(raw)).expanduser()
        return p if p.is_absolute() else base / p
    try:
        value = s.kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{s.env}: {raw!r} is not a valid {s.kind.__name__}") from None
    if value < 0 or (value == 0 and s.default != "0"):  # a default of 0 means "none": 0 is allowed there
        raise ConfigError(f"{s.env}: must be {'0 or more' if s.default == '0' else 'greater than 0'}, got {raw!r}")
    return value


def _read_secrets(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read secrets file: {exc}") from None
