"""What the repositories' hooks do (run as `manage.py git_hook <hook>` by git itself,
inside the manager's process tree, with the pusher's id in LAB_PUSHER_ID).

pre-receive   refuses the push unless the pusher may push to the instance (the SSH server
              and the HTTP view check first; this is the last word, and a refused push
              leaves nothing behind: git drops the quarantined objects).
post-receive  records a push to `main`/`master` as a release (instances.releases) and
              streams its build to the pusher until it is live or failed; other branches
              are only stored.

Everything printed here reaches the pusher's terminal (git shows it as `remote: ...`):
never print secrets or tracebacks.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from django.conf import settings
from django.db.models.functions import Substr

from instances.git.repos import DEPLOY_BRANCHES, PUSHER_ENV, refusal
from instances.models import Instance, Release
from manager.accounts.models import User

logger = logging.getLogger(__name__)
ZERO = "0" * 40
POLL_INTERVAL = 0.1
FINAL_OK = {Release.Status.LIVE}
FINAL_BAD = {Release.Status.FAILED, Release.Status.SUPERSEDED, Release.Status.ROLLED_BACK}


class Refused(Exception):
    """The push is refused; the text is shown to the pusher."""


def say(text: str = "", out=None) -> None:
    out = out or sys.stdout
    out.write(text + "\n")
    out.flush()


def instance_of_repo(git_dir: Path) -> Instance | None:
    name = git_dir.resolve().name.removesuffix(".git")
    return Instance.objects.select_related("owner").filter(name=name).first()


def pusher(raw: str | None = None) -> User | None:
    """The active user whose id the SSH server or HTTP view gave git (default: from the
    environment, as a hook process gets it)."""
    raw = os.environ.get(PUSHER_ENV, "") if raw is None else raw
    if not raw.isdigit():
        return None
    return User.objects.filter(pk=int(raw), is_active=True).first()


def check_push(instance: Instance | None, user: User | None) -> None:
    if instance is None:
        raise Refused("This repository belongs to no instance.")
    refused = refusal(user, instance, push=True)
    if refused:
        raise Refused(refused)


def parse_updates(lines) -> list[tuple[str, str, str]]:
    updates = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3:
            updates.append((parts[0], parts[1], parts[2]))
    return updates


def pre_receive(git_dir: Path, stdin, out, *, pusher_id: str | None = None) -> int:
    try:
        check_push(instance_of_repo(git_dir), pusher(pusher_id))
    except Refused as exc:
        say(f"error: {exc}", out)
        return 1
    return 0


def post_receive(git_dir: Path, stdin, out, *, pusher_id: str | None = None, poll: float = POLL_INTERVAL,
                 timeout: float | None = None) -> int:
    instance = instance_of_repo(git_dir)
    user = pusher(pusher_id)
    try:
        check_push(instance, user)  # checked before the refs moved; a deleted account deploys nothing
    except Refused as exc:
        say(f"error: {exc}", out)
        return 1
    deploy = None
    for old, new, ref in parse_updates(stdin):
        if not ref.startswith("refs/heads/"):
            say(f"{ref} stored.", out)
            continue
        branch = ref.removeprefix("refs/heads/")
        if new == ZERO:
            say(f"Branch {branch} deleted; nothing deployed.", out)
        elif branch in DEPLOY_BRANCHES and deploy is None:
            deploy = (branch, new)
        elif branch in DEPLOY_BRANCHES:
            say(f"Branch {branch} stored; this push deploys {deploy[0]} only.", out)
        else:
            say(f"Branch {branch} stored; only main or master deploy.", out)
    if deploy is None:
        return 0
    branch, commit = deploy
    try:
        from instances.releases import record_push
    except ImportError:
        say("Deploy failed: the build pipeline (instances.releases) is not installed on this manager; "
            "the code is stored.", out)
        return 1
    try:  # record_push reads the commit's author and subject from the repository
        release = record_push(instance, commit=commit, branch=branch, pushed_by=user)
    except Exception as exc:  # the pusher sees a short reason; details go to the manager's log
        logger.exception("recording the push of %s to %s failed", commit, instance.name)
        _log_to_file(git_dir, f"record_push({instance.name}, {commit}) failed: {exc!r}")
        say(f"Deploy failed: the push could not be recorded ({exc.__class__.__name__}); the code is stored.", out)
        return 1
    say(f"Deploying {commit[:8]} of {branch} to {instance.name} as release #{release.number} ...", out)
    if timeout is None:
        timeout = getattr(settings, "LAB_BUILD_TIMEOUT", 900) + 60
    return follow(release, out, poll=poll, timeout=timeout)


def follow(release: Release, out, *, poll: float = POLL_INTERVAL, timeout: float = 960) -> int:
    """Print the release's log as it grows, then its outcome. Only new text is read."""
    deadline = time.monotonic() + timeout
    shown = 0  # characters of the log printed (or held as an incomplete line)
    pending = ""
    last = ""  # the last log line printed
    status = None
    while True:
        row = (Release.objects.filter(pk=release.pk)
               .annotate(tail=Substr("log", shown + 1)).values("status", "status_reason", "tail").first())
        if row is None:
            say("Deploy failed: the release was deleted.", out)
            return 1
        tail = row["tail"] or ""
        shown += len(tail)
        pending += tail
        *lines, pending = pending.split("\n")
        for line in lines:
            say(line, out)
            last = line
        if row["status"] != status and row["status"] not in FINAL_OK | FINAL_BAD:
            status = row["status"]
            say(f"[release #{release.number}: {Release.Status(status).label}]", out)
        if row["status"] in FINAL_OK | FINAL_BAD:
            if pending:
                say(pending, out)
                last = pending
            if row["status"] in FINAL_OK:
                instance = Instance.objects.get(pk=release.instance_id)
                final, code = f"Deployed: {instance.url or instance.name}", 0
            else:
                final, code = f"Deploy failed: {row['status_reason'] or Release.Status(row['status']).label}", 1
            if last.strip() != final:  # the build may have logged the same words last
                say(final, out)
            return code
        if time.monotonic() > deadline:
            if pending:
                say(pending, out)
            say(f"Still not live after {timeout:.0f} s; the deploy goes on: follow it on the instance page "
                f"({settings.LAB_PUBLIC_URL}/instances/{release.instance.name}/).", out)
            return 1
        time.sleep(poll)


def _log_to_file(git_dir: Path, text: str) -> None:
    try:
        logs = Path(settings.DATA_DIR) / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / "git-hooks.log", "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {git_dir.name}: {text}\n")
    except OSError:
        pass


HOOKS = {"pre-receive": pre_receive, "post-receive": post_receive}


def run(hook: str, git_dir: Path | None = None, *, stdin=None, out=None, pusher_id: str | None = None) -> int:
    """Run `hook` for the repository `git_dir`; by default as git runs a hook process
    (GIT_DIR, stdin, stdout and the pusher from the environment)."""
    git_dir = git_dir or Path(os.environ.get("GIT_DIR", ".")).resolve()
    if hook not in HOOKS:
        say(f"unknown hook {hook}", sys.stderr)
        return 2
    return HOOKS[hook](git_dir, stdin if stdin is not None else sys.stdin, out or sys.stdout, pusher_id=pusher_id)
