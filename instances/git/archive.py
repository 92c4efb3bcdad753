"""Retiring a repository: its whole history into a `git bundle` among the backups, then
the repository goes.

A repository must never outlive its instance: the next instance given the same name
(another experimenter's, perhaps) would serve the old history to `git clone`. So:

- deleting an instance archives its repository beside the final database backup
  (`reconciler._delete`);
- a repository found for a name that has no instance (left by an earlier version of the
  manager, or by a worker killed while deleting) is archived by the sweep
  (`sweep_orphans`) and when the name is created again (`services.create_instance`);
- `ensure_repo()`, which every push and fetch passes, archives a repository made for
  another instance (`repos.made_for_another`) before it serves anything.

The archive is a Backup row of kind `repository` whose file is a bundle of every ref plus,
as `refs/lab-reflog/<n>`, every commit the reflogs still name (work a force push
replaced): `git clone <file>.bundle` restores it. Lab managers download it from the
Backups page. A repository without any ref holds no history: it is removed, not archived.

Every step runs under the lock `repo:<name>` and checks again under it, so two pushes, a
sweep and a delete never archive a repository twice or archive a fresh one.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import subprocess
from datetime import datetime, timezone as dt_timezone
from pathlib import Path

from instances.backups import backup_dir
from instances.git.repos import git_root, made_for_another, prepare_repo, repo_path
from manager import locks

log = logging.getLogger(__name__)
GIT_TIMEOUT = 600  # a bundle of a large history takes a while
MAX_REFLOG_COMMITS = 10_000
RETIRED_PREFIX = ".retired-"


class ArchiveFailed(Exception):
    """The repository could not be archived; it was left as it was."""


def _git(path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["git", "--git-dir", str(path), *args], capture_output=True, text=True,
                            timeout=GIT_TIMEOUT, env={"PATH": "/usr/bin:/bin:/usr/local/bin", "GIT_CONFIG_NOSYSTEM": "1",
                                                      "HOME": "/nonexistent"})
    if check and result.returncode != 0:
        raise ArchiveFailed(f"git {args[0]} failed: {result.stderr.strip()[:300]}")
    return result


def _reflog_commits(path: Path, refs: list[str], tips: set[str]) -> list[str]:
    """Commits the reflogs name that no ref points to and that still exist, at most
    MAX_REFLOG_COMMITS."""
    named: list[str] = []
    seen = set(tips)
    for ref in refs:
        result = _git(path, "reflog", "show", "--format=%H", ref, "--", check=False)
        for sha in result.stdout.split():
            if sha not in seen and len(named) < MAX_REFLOG_COMMITS:
                seen.add(sha)
                named.append(sha)
    if not named:
        return []
    kinds = subprocess.run(["git", "--git-dir", str(path), "cat-file", "--batch-check=%(objectname) %(objecttype)"],
                           input="\n".join(named) + "\n", capture_output=True, text=True, timeout=GIT_TIMEOUT,
                           env={"PATH": "/usr/bin:/bin:/usr/local/bin", "GIT_CONFIG_NOSYSTEM": "1",
                                "HOME": "/nonexistent"}).stdout.split("\n")
    return [line.split()[0] for line in kinds if line.endswith(" commit")]


def bundle(path: Path, dest: Path) -> bool:
    """Write every ref and reflogged commit of the repository at `path` into the bundle
    `dest`; False (and no file) when the repository has no ref."""
    lines = _git(path, "for-each-ref", "--format=%(objectname) %(refname)").stdout.split("\n")
    refs = [line.split(" ", 1) for line in lines if line.strip()]
    if not refs:
        return False
    for n, sha in enumerate(_reflog_commits(path, [ref for _, ref in refs if not ref.startswith("refs/lab-reflog/")],
                                            {sha for sha, _ in refs})):
        _git(path, "update-ref", f"refs/lab-reflog/{n}", sha)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        _git(path, "bundle", "create", str(tmp), "--all")
        _git(path, "bundle", "verify", str(tmp))
        tmp.chmod(0o600)
        tmp.rename(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _remove(path: Path) -> None:
    """Take the repository out of service at once (a rename), then delete it."""
    retired = git_root() / f"{RETIRED_PREFIX}{path.name}-{secrets.token_hex(4)}"
    path.rename(retired)
    shutil.rmtree(retired, ignore_errors=True)


def _archive_locked(name: str, *, instance=None, owner=None):
    from instances.models import Backup

    path = repo_path(name)
    if not path.exists():
        return None
    stamp = datetime.now(dt_timezone.utc).strftime("%Y%m%d-%H%M%S")
    filename = f"{name}-{stamp}-repository-{secrets.token_hex(3)}.bundle"
    dest = backup_dir() / filename
    if not bundle(path, dest):
        log.info("repository of %s has no refs: removed, nothing to archive", name)
        _remove(path)
        return None
    row = Backup.objects.create(instance=instance, instance_name=name, owner=owner, kind=Backup.Kind.REPOSITORY,
                                filename=filename, size=dest.stat().st_size, status=Backup.Status.DONE)
    _remove(path)
    log.info("repository of %s archived as %s", name, filename)
    return row


def archive(name: str, *, instance=None, owner=None):
    """Archive and remove the repository of `name` (the instance being deleted, or a
    name without instance). Returns the Backup row, or None when there was no history."""
    if not repo_path(name).exists():
        return None
    with locks.lock(f"repo:{name}", wait=120):
        return _archive_locked(name, instance=instance, owner=owner)


def archive_orphan(name: str):
    """Archive the repository of `name` if no instance of that name exists (checked under
    the lock: an instance created meanwhile keeps it)."""
    from instances.models import Instance

    if not repo_path(name).exists():
        return None
    with locks.lock(f"repo:{name}", wait=120):
        if Instance.objects.filter(name=name).exists():
            return None
        return _archive_locked(name)


def ensure_repo(instance) -> Path:
    """The repository of `instance`, ready to serve (every push and fetch passes here): one
    made for another instance of the same name is archived first, then the repository is
    created if needed and its configuration and hooks (re)written (`repos.prepare_repo`)."""
    retire_leftover(instance)
    return prepare_repo(instance)


def retire_leftover(instance) -> None:
    """Before a repository of `instance` is served: archive the one at its path when it was
    made for another instance of the same name."""
    path = repo_path(instance)
    if not path.exists() or not made_for_another(path, instance):
        return
    with locks.lock(f"repo:{instance.name}", wait=120):
        if path.exists() and made_for_another(path, instance):
            log.warning("repository of %s was made for an earlier instance of that name: archiving it", instance.name)
            _archive_locked(instance.name)


def sweep_orphans(known: set[str]) -> list[str]:
    """Archive the repositories of names not in `known` (the instances' names, read
    before this call) and delete what a killed archive left half-removed."""
    root = git_root()
    if not root.exists():
        return []
    archived = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(RETIRED_PREFIX) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            continue
        name = path.name.removesuffix(".git")
        if not path.name.endswith(".git") or name in known or not path.is_dir():
            continue
        try:
            if archive_orphan(name) is not None:
                archived.append(name)
        except (ArchiveFailed, locks.Busy, OSError, subprocess.SubprocessError):
            log.warning("archiving the orphaned repository %s failed", name, exc_info=True)
    return archived
