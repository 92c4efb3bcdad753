"""What the repositories' hooks do (in the git service, `hookservice`, or as
`manage.py git_hook <hook>` run by git itself), for the push whose one-time token the SSH
server or the HTTP view gave git (`repos.claim_push`: the token, never a user id, names
the pusher).

pre-receive   refuses the push unless the pusher may push to the instance (the SSH server
              and the HTTP view check first; this is the last word), or when it brings a
              file (blob) larger than LAB_PUSH_MAX_BLOB_MB, or a main/master tree whose
              files add up to more than LAB_DEPLOY_MAX_MB (or hold more than
              MAX_TREE_FILES files). A refused push leaves nothing behind: git drops the
              quarantined objects.
post-receive  records a push to `main`/`master` as a release (instances.releases) and
              streams its build to the pusher until it is live or failed; other branches
              are only stored.

Everything printed here reaches the pusher's terminal (git shows it as `remote: ...`):
never print secrets or tracebacks.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.db.models.functions import Substr

from instances.git.repos import (DEPLOY_BRANCHES, PUSH_TOKEN_ENV, blob_limit_bytes, claim_push, deploy_limit_bytes,
                                 refusal)
from instances.models import Instance, Release
from instances.otree_project import MAX_TREE_FILES
from manager.accounts.models import User

logger = logging.getLogger(__name__)
ZERO = "0" * 40
POLL_INTERVAL = 0.1
FINAL_OK = {Release.Status.LIVE}
FINAL_BAD = {Release.Status.FAILED, Release.Status.SUPERSEDED, Release.Status.ROLLED_BACK}
# Built and health-checked, waiting for a live oTree session to end: the push succeeded.
FINAL_WAITING = {Release.Status.READY}
SIZE_CHECK_TIMEOUT = 300  # seconds for the size checks of one push
MiB = 1024 * 1024


class Refused(Exception):
    """The push is refused; the text is shown to the pusher."""


def say(text: str = "", out=None) -> None:
    out = out or sys.stdout
    out.write(text + "\n")
    out.flush()


def instance_of_repo(git_dir: Path) -> Instance | None:
    return Instance.objects.select_related("owner").filter(name=repository_name(git_dir)).first()


def pusher(token: str | None, hook: str, git_dir: Path) -> User | None:
    """The active user who pushes with `token` (default: from the environment, as a hook
    process gets it) to the repository `git_dir`; None for a token that is unknown,
    expired, used before by this hook, or meant for another repository."""
    token = os.environ.get(PUSH_TOKEN_ENV, "") if token is None else token
    user_id = claim_push(token, hook, repository_name(git_dir))
    if user_id is None:
        return None
    return User.objects.filter(pk=user_id, is_active=True).first()


def repository_name(git_dir: Path) -> str:
    return git_dir.resolve().name.removesuffix(".git")


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


def pre_receive(git_dir: Path, stdin, out, *, token: str | None = None, quarantine: str | None = None) -> int:
    try:
        check_push(instance_of_repo(git_dir), pusher(token, "pre-receive", git_dir))
        check_sizes(git_dir, parse_updates(stdin), quarantine_env(git_dir, quarantine))
    except Refused as exc:
        say(f"error: {exc}", out)
        return 1
    return 0


# --- sizes ---------------------------------------------------------------------------------------

def quarantine_env(git_dir: Path, quarantine: str | None = None) -> dict[str, str]:
    """The environment in which git sees the objects of the push being received: git keeps
    them in a quarantine folder (objects/tmp_objdir-incoming-*) until pre-receive accepts.
    `quarantine` comes from the hook's GIT_QUARANTINE_PATH (default: this process's)."""
    git_dir = git_dir.resolve()
    raw = os.environ.get("GIT_QUARANTINE_PATH", "") if quarantine is None else quarantine
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent",
           "GIT_DIR": str(git_dir)}
    if not raw:
        return env
    path = Path(raw).resolve()
    if path.parent != git_dir / "objects" or not path.name.startswith("tmp_objdir-incoming-") or not path.is_dir():
        raise Refused("the push's objects are not where git keeps them; nothing was stored")
    env.update(GIT_OBJECT_DIRECTORY=str(path), GIT_ALTERNATE_OBJECT_DIRECTORIES=str(git_dir / "objects"),
               GIT_QUARANTINE_PATH=str(path))
    return env


def _lines(args: list[str], env: dict, deadline: float, *, stdin=None, sep: bytes = b"\n"):
    """Stream the output records of `git args` (never all of it in memory)."""
    proc = subprocess.Popen(["git", *args], env=env, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        buffer = b""
        while True:
            if time.monotonic() > deadline:
                raise Refused("checking the push's sizes took too long; nothing was stored")
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            buffer += chunk
            *records, buffer = buffer.split(sep)
            yield from records
        if buffer:
            yield buffer
    finally:
        proc.kill()
        proc.wait()


def _mb(size: int) -> str:
    return f"{size / MiB:.1f} MB" if size < 10 * MiB else f"{size // MiB} MB"


def check_sizes(git_dir: Path, updates: list[tuple[str, str, str]], env: dict[str, str]) -> None:
    """Refuse a push that brings a blob over LAB_PUSH_MAX_BLOB_MB, or deploys a tree whose
    files add up to more than LAB_DEPLOY_MAX_MB: what a build would unpack, where a pack
    of zeros inflates ~1000:1."""
    deadline = time.monotonic() + SIZE_CHECK_TIMEOUT
    if env.get("GIT_QUARANTINE_PATH"):
        _check_new_blobs(updates, env, deadline)
    for _old, new, ref in updates:
        if new != ZERO and ref.removeprefix("refs/heads/") in DEPLOY_BRANCHES and ref.startswith("refs/heads/"):
            _check_tree(new, ref.removeprefix("refs/heads/"), env, deadline)


def _check_new_blobs(updates, env, deadline) -> None:
    """Every object the push brought (the quarantine alone, without the repository's)."""
    limit = blob_limit_bytes()
    own = {k: v for k, v in env.items() if k != "GIT_ALTERNATE_OBJECT_DIRECTORIES"}
    big: dict[str, int] = {}
    for record in _lines(["cat-file", "--batch-all-objects", "--unordered",
                          "--batch-check=%(objecttype) %(objectsize) %(objectname)"], own, deadline):
        kind, _, rest = record.decode(errors="replace").partition(" ")
        size, _, sha = rest.partition(" ")
        if kind == "blob" and size.isdigit() and int(size) > limit:
            big[sha] = int(size)
    if not big:
        return
    names = _paths_of(big, updates, env, deadline)
    files = ", ".join(f"{names.get(sha, sha[:12])} ({_mb(size)})" for sha, size in
                      sorted(big.items(), key=lambda item: -item[1])[:5])
    more = f" and {len(big) - 5} more" if len(big) > 5 else ""
    raise Refused(f"Push refused: a file may be at most {settings.LAB_PUSH_MAX_BLOB_MB} MB (LAB_PUSH_MAX_BLOB_MB); "
                  f"this push brings {files}{more}. Remove such files from your history (data, videos, "
                  "archives do not belong into the repository), or ask the lab manager to raise the limit. "
                  "Nothing was stored.")


def _paths_of(shas: dict[str, int], updates, env, deadline) -> dict[str, str]:
    """A path of each of `shas` in the pushed commits (for the message)."""
    tips = [new for _old, new, _ref in updates if new != ZERO]
    found: dict[str, str] = {}
    if not tips:
        return found
    try:
        for record in _lines(["rev-list", "--objects", *tips, "--not", "--all"], env, deadline):
            sha, _, path = record.decode(errors="replace").partition(" ")
            if sha in shas and path and sha not in found:
                found[sha] = path
                if len(found) == len(shas):
                    break
    except Refused:
        pass  # only the message's file names are missing
    return found


def _check_tree(commit: str, branch: str, env, deadline) -> None:
    limit = deploy_limit_bytes()
    total = files = 0
    for record in _lines(["ls-tree", "-r", "-l", "-z", "--full-tree", commit], env, deadline, sep=b"\0"):
        meta, _, _path = record.partition(b"\t")
        parts = meta.split()
        if len(parts) == 4 and parts[1] == b"blob" and parts[3].isdigit():
            total += int(parts[3])
            files += 1
        if total > limit:
            raise Refused(f"Push refused: the files of {branch} add up to more than {settings.LAB_DEPLOY_MAX_MB} MB, "
                          f"the most this lab deploys (LAB_DEPLOY_MAX_MB). Keep data and media out of the "
                          "repository, or ask the lab manager to raise the limit. Nothing was stored.")
        if files > MAX_TREE_FILES:
            raise Refused(f"Push refused: {branch} holds more than {MAX_TREE_FILES} files, more than an oTree "
                          "project needs (a virtualenv or node_modules committed by mistake?). Nothing was stored.")


def post_receive(git_dir: Path, stdin, out, *, token: str | None = None, quarantine: str | None = None,
                 poll: float = POLL_INTERVAL, timeout: float | None = None) -> int:
    instance = instance_of_repo(git_dir)
    user = pusher(token, "post-receive", git_dir)
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
        timeout = settings.LAB_BUILD_TIMEOUT + 60
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
        if row["status"] != status and row["status"] not in FINAL_OK | FINAL_BAD | FINAL_WAITING:
            status = row["status"]
            say(f"[release #{release.number}: {Release.Status(status).label}]", out)
        if row["status"] in FINAL_OK | FINAL_BAD | FINAL_WAITING:
            if pending:
                say(pending, out)
                last = pending
            if row["status"] in FINAL_OK:
                instance = Instance.objects.get(pk=release.instance_id)
                final, code = f"Deployed: {instance.url or instance.name}", 0
            elif row["status"] in FINAL_WAITING:  # the build logged the same words (releases._ready)
                reason = row["status_reason"] or "ready to switch"
                final, code = f"{reason[:1].upper()}{reason[1:]}", 0
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


def run(hook: str, git_dir: Path | None = None, *, stdin=None, out=None, token: str | None = None,
        quarantine: str | None = None) -> int:
    """Run `hook` for the repository `git_dir`; by default as git runs a hook process
    (GIT_DIR, stdin, stdout, the push token and the quarantine from the environment)."""
    git_dir = git_dir or Path(os.environ.get("GIT_DIR", ".")).resolve()
    if hook not in HOOKS:
        say(f"unknown hook {hook}", sys.stderr)
        return 2
    return HOOKS[hook](git_dir, stdin if stdin is not None else sys.stdin, out or sys.stdout, token=token,
                       quarantine=quarantine)
