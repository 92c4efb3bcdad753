"""The bare repositories: `LAB_DATA_DIR/git/<name>.git`, one per instance.

`ensure_repo()` creates a repository on first use and (re)writes its configuration and
hooks every time, so a moved virtualenv or a changed `LAB_PUSH_MAX_MB` takes effect at
the next push.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from django.conf import settings

from instances.selectors import can_see

DEPLOY_BRANCHES = ("main", "master")
HOOKS = ("pre-receive", "post-receive")
# Who pushed: set by the SSH server and the HTTP view for the git subprocess (and thereby
# its hooks); the hooks trust nothing else.
PUSHER_ENV = "LAB_PUSHER_ID"


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


def ensure_repo(instance) -> Path:
    """Create the bare repository if needed; set its configuration and hooks. Idempotent."""
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
        "http.receivepack": "true",  # the HTTP view authenticates; http-backend must not refuse
        "http.uploadpack": "true",
        "core.logAllRefUpdates": "true",  # a reflog: force-pushed-over commits stay recoverable
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


def git_env(pusher_id: int | None) -> dict[str, str]:
    """The environment of a git subprocess (and thereby of its hooks): the manager's own,
    so that the hooks reach the same database, Redis and data dir, plus who pushes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(DJANGO_SETTINGS_MODULE="manager.settings", LAB_DATA_DIR=str(settings.DATA_DIR),
               PYTHONUNBUFFERED="1")
    db = settings.DATABASES["default"]
    default_sqlite = Path(settings.DATA_DIR) / "manager.sqlite3"
    if "DATABASE_URL" not in env and db["ENGINE"].endswith("sqlite3") and Path(db["NAME"]) != default_sqlite:
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"  # e.g. the test database
    env.pop(PUSHER_ENV, None)
    if pusher_id is not None:
        env[PUSHER_ENV] = str(pusher_id)
    return env
