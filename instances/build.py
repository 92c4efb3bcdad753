"""From a pushed commit to a checked project tree (backend-neutral): export the commit's
tree (bounded, nothing outside it), check that it is an oTree project and adjust its
requirements for PostgreSQL. Each backend then builds a release from the tree
(`Runtime.build_release`) and reads its settings (`Runtime.introspect`).

Nothing secret goes into a build: no build args, no environment of the instance.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path

from instances.git.repos import deploy_limit_bytes
from instances.otree_project import MAX_TREE_FILES, REQ_NAME, BuildFailed, requirement_names

__all__ = ["BuildFailed", "check_project", "commit_info", "export_tree", "git", "new_context"]


def git(repo: Path, *args: str, input: bytes | None = None, timeout: float = 60) -> bytes:
    proc = subprocess.run(["git", "--git-dir", str(repo), *args], input=input, capture_output=True,
                          timeout=timeout, env={"PATH": "/usr/bin:/bin:/usr/local/bin", "GIT_CONFIG_NOSYSTEM": "1",
                                                "HOME": "/nonexistent"})
    if proc.returncode != 0:
        raise BuildFailed(f"git {args[0]}: {proc.stderr.decode(errors='replace').strip()[:300]}")
    return proc.stdout


def commit_info(repo: Path, commit: str) -> dict:
    out = git(repo, "log", "-1", "--format=%H%n%an <%ae>%n%s", commit).decode(errors="replace").split("\n")
    return {"commit": out[0], "author": out[1] if len(out) > 1 else "", "message": out[2] if len(out) > 2 else ""}


def export_tree(repo: Path, commit: str, dest: Path, *, limit: int | None = None, timeout: float = 300) -> None:
    """`git archive` of the commit streamed into `dest` (no .git, no paths outside `dest`):
    at most `limit` bytes of files (LAB_DEPLOY_MAX_MB) and MAX_TREE_FILES files, counted
    while it streams, so the archive is never held in memory (pre-receive refuses such
    pushes first; this is the bound that holds for anything already stored)."""
    limit = deploy_limit_bytes() if limit is None else limit
    proc = subprocess.Popen(["git", "--git-dir", str(repo), "archive", "--format=tar", commit],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_GIT_ENV)
    killed = threading.Event()
    timer = threading.Timer(timeout, lambda: (killed.set(), proc.kill()))
    timer.start()
    root = dest.resolve()
    total = files = 0
    complete, problem = False, None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                member = _safe_member(member, root)
                if member is None:
                    continue
                total += member.size if member.isfile() else 0
                files += 1
                if total > limit:
                    raise BuildFailed(f"the project's files add up to more than {limit // 2**20} MB, the most "
                                      "this lab deploys (LAB_DEPLOY_MAX_MB)")
                if files > MAX_TREE_FILES:
                    raise BuildFailed(f"the project has more than {MAX_TREE_FILES} files")
                tar.extract(member, dest, **_extract_filter())
        complete = True
    except (tarfile.TarError, OSError) as exc:  # e.g. a symlink pointing outside the project
        problem = exc
    finally:
        timer.cancel()
        if not complete and proc.poll() is None:
            proc.kill()  # stopped early: git need not write the rest
        _, err = proc.communicate(timeout=60)  # (what is left in the pipe: at most its buffer)
    if killed.is_set():
        raise BuildFailed(f"exporting the commit took longer than {timeout:g} s")
    if proc.returncode != 0:
        raise BuildFailed(f"git archive: {err.decode(errors='replace').strip()[:300] or 'failed'}")
    if problem is not None:
        raise BuildFailed(f"the commit's files cannot be unpacked: {problem}")


_GIT_ENV = {"PATH": "/usr/bin:/bin:/usr/local/bin", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def _extract_filter() -> dict:
    """Python >= 3.11.4 has tarfile's "data" filter; _safe_member makes the same checks for
    older ones (Debian 12's 3.11.2)."""
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def _safe_member(member: tarfile.TarInfo, root: Path) -> tarfile.TarInfo | None:
    """What tarfile's "data" filter allows: regular files, directories and links that stay
    inside `root`; no devices (skipped: never part of a project); no set-uid bits."""
    target = (root / member.name).resolve()
    if not target.is_relative_to(root):
        raise BuildFailed(f"the commit's files cannot be unpacked: {member.name} points outside the project")
    if member.issym() or member.islnk():
        base = target.parent if member.issym() else root
        if os.path.isabs(member.linkname) or not (base / member.linkname).resolve().is_relative_to(root):
            raise BuildFailed(f"the commit's files cannot be unpacked: {member.name} links outside the project")
    elif not (member.isfile() or member.isdir()):
        return None
    member.mode &= 0o755
    return member


# --- checks ------------------------------------------------------------------------------

def check_project(ctx: Path) -> list[str]:
    """Raise BuildFailed with a specific message when `ctx` is not a deployable oTree
    project; returns notes for the log (e.g. requirements adjusted)."""
    notes = []
    if not (ctx / "settings.py").is_file():
        raise BuildFailed("this is not an oTree project: there is no settings.py at the top of the repository "
                          "(push the folder that contains settings.py, requirements.txt and your apps)")
    req = ctx / "requirements.txt"
    if not req.is_file():
        raise BuildFailed("this is not an oTree project: there is no requirements.txt at the top of the repository "
                          "(it needs at least a line such as `otree>=5`)")
    text = req.read_text(errors="replace")
    names = requirement_names(text)
    if not any(name == "otree" for name, _ in names):
        raise BuildFailed("this is not an oTree project: requirements.txt does not name otree "
                          "(add a line such as `otree>=5`)")
    source = (ctx / "settings.py").read_bytes()
    try:
        compile(source, "settings.py", "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f"line {exc.lineno}" if exc.lineno else "somewhere"
        code = (exc.text or "").strip()
        raise BuildFailed(f"settings.py has a syntax error on {where}: {exc.msg}" + (f" ({code})" if code else "")) from None
    except ValueError as exc:  # e.g. NUL bytes
        raise BuildFailed(f"settings.py cannot be read as Python: {exc}") from None
    # The app runs on PostgreSQL: psycopg2 from source needs a compiler and libpq headers
    # that the slim base image lacks; the binary wheel provides the same module.
    lines, changed = [], False
    for line in text.splitlines():
        entries = requirement_names(line)
        if entries and entries[0][0] == "psycopg2":
            spec = REQ_NAME.match(entries[0][1]).group(3)
            lines.append(f"psycopg2-binary{spec}")
            changed = True
        else:
            lines.append(line)
    if not any(name in ("psycopg2", "psycopg2-binary") for name, _ in names):
        lines.append("psycopg2-binary")
        changed = True
        notes.append("requirements.txt: added psycopg2-binary (the app runs on PostgreSQL)")
    elif changed:
        notes.append("requirements.txt: psycopg2 installed as psycopg2-binary (same module, no compiler needed)")
    if changed:
        req.write_text("\n".join(lines) + "\n")
    return notes


def new_context() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="lab-build-")
