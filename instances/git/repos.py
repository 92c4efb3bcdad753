"""The bare repositories: `LAB_DATA_DIR/git/<name>.git`, one per instance.

`prepare_repo()` creates a repository on first use and (re)writes its configuration and
hooks every time, so a moved virtualenv or a changed `LAB_PUSH_MAX_MB` takes effect at
the next push. Each repository is stamped with the id of the instance it was made for
(git config `lab.instance`): `archive.ensure_repo()`, which every push and fetch passes,
archives one made for another instance of the same name (deleted before) first, never
served, then calls `prepare_repo()`.

Who pushes: the SSH server and the HTTP view register a one-time push token (random, in
the cache, `PUSH_TOKEN_TTL`) for the git process they start, and hand git only the token
(`LAB_PUSH_TOKEN`). The hooks trade it for the pusher, once per hook, for this repository
only; a user id in the environment or in a hook request means nothing.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.cache import cache

from instances.selectors import can_see

DEPLOY_BRANCHES = ("main", "master")
HOOKS = ("pre-receive", "post-receive")
# The push token of a git subprocess (and thereby of its hooks): set by the SSH server and
# the HTTP view; the hooks trade it for the pusher (claim_push).
PUSH_TOKEN_ENV = "LAB_PUSH_TOKEN"
PUSH_TOKEN_TTL = 3600  # seconds; revoked as soon as the git process ends
STAMP = "lab.instance"  # git config: the id of the instance the repository was made for


def git_root() -> Path:
    return Path(settings.DATA_DIR) / "git"


def hook_socket_path() -> Path:
    """Where the git service (hookservice) listens for the repositories' hooks."""
    return Path(settings.DATA_DIR) / "run" / "git-hooks.sock"


def repo_path(instance) -> Path:
    """Where the bare repository of `instance` (an Instance or its name) lives."""
    name = getattr(instance, "name", instance)
    return git_root() / f"{name}.git"


def refusal(user, instance, *, push: bool) -> str | None:
    """Why `user` (None: unknown) may not push to (`push`) or fetch from `instance`; None
    if they may. The SSH server, the HTTP view and the pre-receive hook all ask this."""
    if user is None or not can_see(user, instance):
        verb = "push to" if push else "fetch from"
        return f"You may not {verb} {instance.name}: only its owner and lab managers may."
    if push and instance.delete_requested:
        return f"{instance.name} is being deleted; nothing was stored."
    return None


def push_limit_bytes() -> int:
    return settings.LAB_PUSH_MAX_MB * 1024 * 1024


def blob_limit_bytes() -> int:
    return settings.LAB_PUSH_MAX_BLOB_MB * 1024 * 1024


def deploy_limit_bytes() -> int:
    """The most a deployed tree's files may add up to (pre-receive and the build's export)."""
    return settings.LAB_DEPLOY_MAX_MB * 1024 * 1024


def too_large_message() -> str:
    return (f"Push refused: it is larger than this lab's limit of {settings.LAB_PUSH_MAX_MB} MB "
            "(LAB_PUSH_MAX_MB). Remove large files (data, videos, virtualenvs) from the history, "
            "or ask the lab manager to raise the limit. Nothing was stored.\n")


def _hook_script(hook: str) -> str:
    """The hook hands its work to the running git service (hook_client.py, no Django to
    start), or runs `manage.py git_hook` itself when the service is not running."""
    base = Path(settings.BASE_DIR)
    args = [sys.executable, "-I", "-S", str(base / "instances" / "git" / "hook_client.py"), hook, str(hook_socket_path()),
            str(base / "manage.py")]
    return (
        "#!/bin/sh\n"
        "# Installed by the oTree Lab Manager (instances/git/repos.py); rewritten at every push.\n"
        f"exec {shlex.join(args)}\n"
    )


def _git(path: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=path, check=True, capture_output=True, timeout=30)


def prepare_repo(instance) -> Path:
    """Create the bare repository of `instance` (an Instance) if needed; set its
    configuration and hooks. Idempotent. Serve through `archive.ensure_repo()`, which
    archives a repository made for another instance of the same name first."""
    path = repo_path(instance)
    root = git_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (path / "HEAD").exists():
        subprocess.run(["git", "init", "--bare", "--quiet", "--initial-branch=main", str(path)],
                       check=True, capture_output=True, timeout=30)
    config = {
        "receive.denyNonFastForwards": "false",  # a force push deploys what was pushed
        "receive.denyDeletes": "false",
        "receive.maxInputSize": str(push_limit_bytes()),
        "receive.fsckObjects": "true",  # the build checks the code out: no malformed trees
        # Blobs above this are hashed as they stream, never inflated whole into git's memory
        # (pre-receive refuses them anyway: LAB_PUSH_MAX_BLOB_MB).
        "core.bigFileThreshold": str(min(blob_limit_bytes(), 512 * 1024 * 1024)),
        "http.receivepack": "true",  # the HTTP view authenticates; http-backend must not refuse
        "http.uploadpack": "true",
        "core.logAllRefUpdates": "true",  # a reflog: force-pushed-over commits stay recoverable
        STAMP: str(instance.pk),
    }
    current = subprocess.run(["git", "config", "--local", "--list"], cwd=path, capture_output=True, text=True,
                             timeout=30).stdout.lower().splitlines()
    for key, value in config.items():
        if f"{key.lower()}={value}" not in current:
            _git(path, "config", key, value)
    hooks = path / "hooks"
    hooks.mkdir(exist_ok=True)
    for hook in HOOKS:
        target = hooks / hook
        script = _hook_script(hook)
        if not target.exists() or target.read_text() != script:
            tmp = hooks / f".{hook}.tmp"
            tmp.write_text(script)
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
    return path


def stamp_of(path: Path) -> str:
    """The `lab.instance` stamp of the repository at `path` ("" when it has none)."""
    result = subprocess.run(["git", "config", "--local", "--get", STAMP], cwd=path, capture_output=True, text=True,
                            timeout=30)
    return result.stdout.strip()


def made_for_another(path: Path, instance) -> bool:
    """Whether the existing repository at `path` was made for another instance than
    `instance`: its stamp names another, or (unstamped: made by an earlier version of the
    manager) it is older than the instance — a repository is only ever created for an
    instance that exists, so one that predates it was left by a deleted namesake."""
    stamp = stamp_of(path)
    if stamp:
        return stamp != str(instance.pk)
    times = [p.stat().st_mtime for p in (path / "description", path / "HEAD", path / "config", path / "objects")
             if p.exists()]
    return bool(times) and min(times) < instance.created_at.timestamp() - 2


def git_env(push_token: str | None = None) -> dict[str, str]:
    """The environment of a git subprocess (and thereby of its hooks): the manager's own,
    so that the hooks reach the same database, Redis and data dir, plus the push's token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(DJANGO_SETTINGS_MODULE="manager.settings", LAB_DATA_DIR=str(settings.DATA_DIR),
               PYTHONUNBUFFERED="1")
    db = settings.DATABASES["default"]
    default_sqlite = Path(settings.DATA_DIR) / "manager.sqlite3"
    if "DATABASE_URL" not in env and db["ENGINE"].endswith("sqlite3") and Path(db["NAME"]) != default_sqlite:
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"  # e.g. the test database
    env.pop(PUSH_TOKEN_ENV, None)
    env.pop("LAB_PUSHER_ID", None)  # the previous version's (trusted) pusher id: meaningless now
    if push_token is not None:
        env[PUSH_TOKEN_ENV] = push_token
    return env


# --- push tokens ---------------------------------------------------------------------------

def _token_key(token: str) -> str:
    return "git-push:" + hashlib.sha256(token.encode()).hexdigest()


def register_push(user, instance) -> str:
    """A new one-time token naming `user` as the pusher to `instance`, for one git process."""
    token = secrets.token_urlsafe(32)
    cache.set(_token_key(token), {"user": user.pk, "instance": instance.name, "at": time.time()}, PUSH_TOKEN_TTL)
    return token


def revoke_push(token: str | None) -> None:
    """The git process ended: its token is worth nothing from now on."""
    if token:
        key = _token_key(token)
        cache.delete_many([key, *(f"{key}:{hook}" for hook in HOOKS)])


def claim_push(token: str, hook: str, repository: str) -> int | None:
    """The id of the user who pushes with `token`, for `hook` of the repository of the
    instance named `repository`; None when the token is unknown, expired, revoked, meant
    for another repository, or already used by this hook (each hook runs once per push)."""
    if not token or len(token) > 128 or hook not in HOOKS:
        return None
    key = _token_key(token)
    entry = cache.get(key)
    if not isinstance(entry, dict) or entry.get("instance") != repository:
        return None
    if not cache.add(f"{key}:{hook}", 1, PUSH_TOKEN_TTL):
        return None
    user = entry.get("user")
    return user if isinstance(user, int) else None
