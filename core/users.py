"""People and what they may do: the acting user (`Actor`), the two roles, the checks the front door makes, and
the local accounts file with its slow salted password hashes. No I/O except reading and writing that file.

Roles: `admin` (servers, drain, the whole queue's pause, everyone's batches) and `member` (submit; cancel, retry,
pause and re-prioritise their own batches). Who acts:
    a signed-in person      Actor(name, role) from a session (core.sessions) or an OIDC sign-in
    an API token's owner    Actor(owner, role) of the token (COMFYBATCH_API_TOKENS are admin tokens, "api")
    the command line        CLI = Actor("cli", "admin")
    nobody signed in        LOCAL = Actor("local", "admin"): no sign-in is configured (one person on localhost)

Passwords are hashed with Argon2id (argon2-cffi, the PHC winner: memory-hard, salted, the parameters kept in
the hash string so they can be raised later; bcrypt would cap passwords at 72 bytes). The accounts file is
TOML, one table per user:

    [users.alice]
    role = "admin"
    password_hash = "$argon2id$v=19$m=65536,t=3,p=4$..."

written by `python -m core users add NAME --role ROLE` (the password read from stdin or a prompt).
"""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from core import files
from core.errors import ConfigError, Forbidden, InputError, Problem

ADMIN, MEMBER = "admin", "member"
ROLES = (ADMIN, MEMBER)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}$")
MAX_PASSWORD = 1024  # characters: a bound on what is hashed
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """A hash of nothing anyone types, verified when the user name is unknown so that timing does not tell.
    Made on first use: hashing costs about 0.2 s of CPU, which every process (each CLI call, each worker)
    paid at import."""
    return _hasher.hash("no such user: this hash is only verified to spend the same time")


@dataclass(frozen=True)
class Actor:
    """Who is acting, and in which role. `name` is what batches record as their submitter."""

    name: str
    role: str = MEMBER

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


CLI = Actor("cli", ADMIN)
LOCAL = Actor("local", ADMIN)
API_ADMIN = Actor("api", ADMIN)  # the holder of a COMFYBATCH_API_TOKENS token


def require_admin(actor: Actor, what: str) -> None:
    if not actor.is_admin:
        raise Forbidden(f"{actor.name} may not {what}: only an admin may (your role is {actor.role})")


def may_act_on(actor: Actor, batch: dict[str, Any]) -> bool:
    """An admin acts on any batch; a member only on batches they submitted."""
    return actor.is_admin or batch.get("submitted_by") == actor.name


def require_owner(actor: Actor, batch: dict[str, Any], what: str) -> None:
    if may_act_on(actor, batch):
        return
    raise Forbidden(f"{actor.name} may not {what} batch {batch['id']}: it was submitted by "
                    f"{batch.get('submitted_by') or 'nobody recorded'}, and a member acts only on their own batches")


# -- passwords and the accounts file ----------------------------------------------------------------
def hash_password(password: str) -> str:
    check_password_input(password)
    return _hasher.hash(password)


def check_password_input(password: str) -> None:
    if not password:
        raise InputError("the password is empty", [Problem("required", field="password", code="required")])
    if len(password) > MAX_PASSWORD:
        raise InputError(f"the password is longer than {MAX_PASSWORD} characters",
                         [Problem("too long", field="password", code="too_large")])


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when `password` matches; with no hash (an unknown user), spends the same time and is False."""
    if len(password) > MAX_PASSWORD:
        return False
    try:
        return _hasher.verify(password_hash or _dummy_hash(), password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InputError("not a valid user name", [Problem(
            "use 1 to 100 letters, digits or . _ @ + - (starting with a letter or digit)", field="name",
            code="invalid")])
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise InputError(f"not a role: {str(role)[:40]!r}", [Problem(
            f"expected one of {', '.join(ROLES)}", field="role", code="invalid")])
    return role


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    password_hash: str = ""

    def __repr__(self) -> str:  # never the hash in a log line
        return f"Account(name={self.name!r}, role={self.role!r})"


def load_accounts(path: Path | None) -> dict[str, Account]:
    """The accounts of the users file (empty when no file is configured). ConfigError names the user and key
    that is wrong, never a hash."""
    if path is None or not str(path):
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the users file: {type(exc).__name__}") from None
    accounts = {}
    for name, entry in (data.get("users") or {}).items():
        if not isinstance(entry, dict) or entry.get("role") not in ROLES or not NAME_PATTERN.match(name):
            raise ConfigError(f"{path}: user {name[:100]!r} needs a valid name and role = \"admin\" or \"member\"")
        if not str(entry.get("password_hash", "")).startswith("$argon2"):
            raise ConfigError(f"{path}: user {name!r} needs password_hash = an Argon2 hash; make one with "
                              f"`python -m core users add {name} --role {entry['role']}`")
        accounts[name] = Account(name, entry["role"], entry["password_hash"])
    return accounts


def save_account(path: Path, name: str, role: str, password: str) -> Account:
    """Add or replace a user in the users file (written atomically); the password is hashed first."""
    check_name(name)
    check_role(role)
    account = Account(name, role, hash_password(password))
    accounts = load_accounts(path)
    accounts[name] = account
    lines = ["# ComfyBatch local accounts: written by `python -m core users add`; passwords are Argon2 hashes.", ""]
    for a in accounts.values():
        lines += [f'[users."{a.name}"]', f'role = "{a.role}"', f'password_hash = "{a.password_hash}"', ""]
    files.write_atomic(path, "\n".join(lines).encode("utf-8"))
    return account
