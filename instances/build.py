"""From a pushed commit to an app image: export the tree, check that it is an oTree
project, install its requirements (Docker: pip in a locked-down build container whose
result is a cached dependencies image, see runtime.docker), build the release image on
it with a Dockerfile that only copies the project (no RUN: nothing of the tenant's runs
in the image builder; output streamed into the release's log) and read the project's
session configs and rooms out of the built image.

Nothing secret goes into a build: no build args, no environment of the instance. The
image is labelled with the manager, the instance and the release number, so old ones are
pruned by label.
"""

from __future__ import annotations

import hashlib
import io
import os
import json
import re
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from instances.runtime.docker import LABEL_COMPONENT, LABEL_INSTANCE, LABEL_MANAGER

RELEASE_IMAGE_PORT = 8000
COMMAND = ["otree", "prodserver", str(RELEASE_IMAGE_PORT)]  # oTree 5/6: binds 0.0.0.0:<port>


class BuildFailed(Exception):
    """The user's project cannot be built; the message says why (shown to the pusher)."""


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
    from instances.git.hooks import MAX_TREE_FILES
    from instances.git.repos import deploy_limit_bytes

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

REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def _requirement_names(text: str) -> list[tuple[str, str]]:
    """(normalized name, the whole line) of each requirement line."""
    found = []
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].strip()
        if not stripped or stripped.startswith("-"):
            continue
        m = REQ_NAME.match(stripped)
        if m:
            found.append((re.sub(r"[-_.]+", "-", m.group(1)).lower(), stripped))
    return found


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
    names = _requirement_names(text)
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
        entries = _requirement_names(line)
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


APP_USER = "10001:10001"  # the app and its build run unprivileged (the runtime sets it on every container)

# --- Docker: the dependencies image (pip in a locked-down container, see runtime.docker) ------

# Ours, not the tenant's: run in the build container as APP_USER, in /app (requirements.txt
# is the only file there, as it was in the former pip step of the Dockerfile). The venv
# sees the base image's packages (pip, setuptools: what the former system-wide install
# offered; the venv's own come first) through a .pth file instead of getting copies:
# ensurepip would cost seconds at every install.
DEPS_SCRIPT = """set -e
export HOME=/tmp PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off PIP_NO_INPUT=1
python -m venv --without-pip /opt/venv
purelib='import sysconfig; print(sysconfig.get_path("purelib"))'
python -c "$purelib" > "$(/opt/venv/bin/python -c "$purelib")/_base_image_packages.pth"
exec /opt/venv/bin/python -m pip install -r /app/requirements.txt
"""
DEPS_ENV: dict[str, str] = {}  # nothing of the instance's, nothing secret
PIP_KILLED = re.compile(r"exit code: -9\b")  # a setup.py or compiler killed (by the memory limit)


DEPS_RECIPE = "2"  # changes when deps_changes() does: older dependencies images are not reused


def deps_key(base_image_id: str, requirements: bytes) -> str:
    """The cache key of a dependencies image: the base image, our recipe and the exact
    requirements.txt (identical requirements share one image, across instances)."""
    digest = hashlib.sha256()
    for part in (DEPS_RECIPE.encode(), DEPS_SCRIPT.encode(), base_image_id.encode(), requirements):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def deps_tag(manager_id: str, key: str) -> str:
    # "--": no instance's release repository can be named so (names never start with "-").
    return f"otree-lab-{manager_id}--deps:{key[:24]}"


def deps_archive(requirements: bytes) -> bytes:
    """What the build container gets before it starts: /opt/venv and /app for APP_USER,
    /app/requirements.txt (read-only for it)."""
    uid = int(APP_USER.split(":")[0])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, owner, data in (("opt/venv", uid, None), ("app", uid, None), ("app/requirements.txt", 0, requirements)):
            info = tarfile.TarInfo(path)
            info.uid = info.gid = owner
            info.mtime = int(time.time())
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = 0o644, len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def deps_changes(runtime, key: str, base_env: list[str]) -> list[str]:
    """What the committed dependencies image says besides its files: labels (no instance:
    it may serve several), and the app's environment, directory, port and command (set
    here once, not as uncached steps of every release build on it)."""
    from instances.runtime.docker import LABEL_DEPS

    labels = {LABEL_MANAGER: runtime.manager_id, LABEL_INSTANCE: "", LABEL_COMPONENT: "deps", LABEL_DEPS: key}
    path = next((e.split("=", 1)[1] for e in base_env if e.startswith("PATH=")), "/usr/local/bin:/usr/bin:/bin")
    env = {"PATH": f"/opt/venv/bin:{path}", "VIRTUAL_ENV": "/opt/venv", "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return [
        f"LABEL {' '.join(f'{k}={json.dumps(v)}' for k, v in labels.items())}",
        f"ENV {' '.join(f'{k}={json.dumps(v)}' for k, v in env.items())}",
        "WORKDIR /app",
        f"EXPOSE {RELEASE_IMAGE_PORT}",
        f"CMD {json.dumps(COMMAND)}",
    ]


def dockerfile(labels: dict[str, str], base: str) -> str:
    """The release image: the dependencies image (environment, directory, port and
    command included) plus the project's files. No RUN step: nothing of the tenant's
    runs in the builder. The LABEL step is the same for each build of an instance on the
    same dependencies (cached), so a code-only push costs one COPY. No USER: the runtime
    runs its containers as APP_USER."""
    label_line = " ".join(f"{key}={json.dumps(value)}" for key, value in sorted(labels.items()))
    return "\n".join([
        f"FROM {base}",
        f"LABEL {label_line}",
        # oTree opens db.sqlite3 in its working directory at import (even on PostgreSQL),
        # so the project directory belongs to the app's user (/app itself already does).
        f"COPY --chown={APP_USER} . /app",
        "",
    ])


# Never part of a release, at any depth (the process runtime's copy; the image's .dockerignore).
IGNORED = (".git", "__pycache__", "*.pyc", "db.sqlite3", "venv", ".venv", "__temp*", "Dockerfile.otree-lab",
           ".dockerignore")
DOCKERIGNORE = "".join(f"**/{pattern}\n" for pattern in IGNORED)


def image_tag(manager_id: str, instance_name: str, number: int) -> str:
    return f"otree-lab-{manager_id}-{instance_name}:r{number}"


PIP_NOT_FOUND = re.compile(r"No matching distribution found for ([^\s]+)")
PIP_NO_VERSION = re.compile(r"Could not find a version that satisfies the requirement ([^\s]+) \(from versions: ([^)]*)\)")


def explain_pip(log_text: str) -> str | None:
    """A clear reason for the usual pip failures, else None."""
    m = PIP_NO_VERSION.search(log_text)
    if m:
        req, versions = m.group(1), m.group(2).strip()
        name = REQ_NAME.match(req).group(1) if REQ_NAME.match(req) else req
        if versions in ("", "none"):
            return f"package {name} not found on PyPI (requirements.txt: {req})"
        return f"no version of {name} matches {req} (available: {versions[-120:]})"
    m = PIP_NOT_FOUND.search(log_text)
    if m:
        return f"package {m.group(1)} not found on PyPI"
    if "ResolutionImpossible" in log_text or "conflicting dependencies" in log_text:
        return "the packages in requirements.txt have conflicting dependencies (see the log)"
    return None


def _tail(text: str, n: int = 4) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " / ".join(lines[-n:])[:400]


def build_image(runtime, ctx: Path, *, tag: str, base: str, labels: dict, out, timeout: float) -> str:
    """`docker build` of `ctx` (legacy builder) with our Dockerfile on `base` (the
    dependencies image); every line of output goes to `out(text)`. Returns the image id;
    raises BuildFailed with the reason."""
    (ctx / "Dockerfile.otree-lab").write_text(dockerfile(labels, base))
    (ctx / ".dockerignore").write_text(DOCKERIGNORE)
    api = runtime.api
    seen = []
    image_id = None
    deadline = time.monotonic() + timeout
    try:
        stream = api.build(path=str(ctx), dockerfile="Dockerfile.otree-lab", tag=tag, rm=True,
                           forcerm=True, pull=False, decode=True, timeout=timeout)
        for chunk in stream:
            if "stream" in chunk:
                text = chunk["stream"]
                seen.append(text)
                out(text)
                m = re.match(r"Successfully built ([0-9a-f]+)", text.strip())
                if m:
                    image_id = m.group(1)
            elif "error" in chunk:
                text = chunk.get("error") or ""
                seen.append(text + "\n")
                out(text + "\n")
                full = "".join(seen)
                raise BuildFailed(explain_pip(full) or f"the image build failed: {_tail(full)}")
            elif "status" in chunk:  # a base image layer download
                out(f"{chunk['status']} {chunk.get('progress', '')}\n".replace(" \n", "\n"))
            if time.monotonic() > deadline:
                raise BuildFailed(f"the build took longer than {timeout:g} s")
    except BuildFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - engine errors become the reason
        text = getattr(exc, "explanation", None) or str(exc)
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        if "Read timed out" in str(text):
            raise BuildFailed(f"the build took longer than {timeout:g} s") from None
        raise BuildFailed(f"the image build failed: {' '.join(str(text).split())[:300]}") from None
    if not image_id:
        raise BuildFailed(f"the image build did not finish: {_tail(''.join(seen))}")
    return image_id


# --- introspection -------------------------------------------------------------------------

INTROSPECT = r'''
import json, os, sys
ROOT = os.path.realpath(sys.argv[1]) if len(sys.argv) > 1 else "/app"  # the project (a docker image: /app)
sys.path.insert(0, ROOT); os.chdir(ROOT)
try:
    import settings
except BaseException as exc:
    import traceback
    print("@@ERROR@@" + "".join(traceback.format_exception_only(type(exc), exc)).strip()[-400:])
    raise SystemExit(0)
def text(v, n=200):
    return "" if v is None else str(v)[:n]
configs = []
for c in list(getattr(settings, "SESSION_CONFIGS", None) or [])[:201]:
    if isinstance(c, dict):
        configs.append({"name": text(c.get("name"), 101), "display_name": text(c.get("display_name") or c.get("name")),
                        "num_demo_participants": c.get("num_demo_participants") if isinstance(c.get("num_demo_participants"), int) else None,
                        "app_sequence": [text(a, 80) for a in (c.get("app_sequence") or [])][:50]})
rooms, budget = [], 5001  # the manager takes at most 1000 labels per room, 5000 in all (instances/facts.py)
for r in list(getattr(settings, "ROOMS", None) or [])[:101]:
    if not isinstance(r, dict):
        continue
    labels, problem = [], ""
    path = r.get("participant_label_file")
    if path:
        try:
            full = os.path.realpath(os.path.join(ROOT, str(path)))
            if not full.startswith(ROOT + os.sep):
                raise ValueError("outside the project")
            with open(full, encoding="utf-8-sig", errors="replace") as fh:
                while len(labels) < min(1001, max(budget, 0)):  # never the whole file in memory
                    line = fh.readline(4096)
                    if not line:
                        break
                    if not line.endswith("\n") and len(line) == 4096:  # an endless line: too long for a label
                        while line and not line.endswith("\n"):
                            line = fh.readline(4096)
                        labels.append("?" * 101)
                    elif line.strip():
                        labels.append(line.strip())
        except Exception as exc:
            problem = f"participant_label_file {path}: {exc}"[:200]
    budget -= min(len(labels), 1000)
    rooms.append({"name": text(r.get("name"), 101), "display_name": text(r.get("display_name") or r.get("name")),
                  "participant_labels": [text(l, 101) for l in labels], "problem": problem})
language = getattr(settings, "LANGUAGE_CODE", "") or ""
print("@@JSON@@" + json.dumps({"session_configs": configs, "rooms": rooms,
                               "language_code": language[:20] if isinstance(language, str) else ""}))
'''


def introspect(runtime, image: str, *, instance_name: str, timeout: float = 60) -> dict:
    """Import the project's settings.py inside the image (no network, no secrets) and
    return {session_configs, rooms, language_code}; BuildFailed when settings.py cannot be
    imported. (The Docker runtime's; `runtime.introspect()` calls it.)"""
    api = runtime.api
    # Labelled with the instance: one left by a killed worker goes with the instance's resources.
    labels = {LABEL_MANAGER: runtime.manager_id, LABEL_INSTANCE: instance_name, LABEL_COMPONENT: "introspect"}
    host_config = api.create_host_config(mem_limit="256m", memswap_limit="256m", pids_limit=64,
                                         cap_drop=["ALL"], security_opt=["no-new-privileges"], network_mode="none",
                                         read_only=True, tmpfs={"/tmp": "size=16m,mode=1777"},
                                         # What settings.py prints stays small on the engine's disk (two files
                                         # kept: a flood still shows as one, which parse_introspection refuses).
                                         log_config={"Type": "json-file",
                                                     "Config": {"max-size": "8m", "max-file": "2"}})
    container = api.create_container(image, command=["python", "-c", INTROSPECT], labels=labels, user=APP_USER,
                                     host_config=host_config, network_disabled=True,
                                     environment={"OTREE_PRODUCTION": "1"})
    try:
        api.start(container["Id"])
        try:
            api.wait(container["Id"], timeout=timeout)
        except Exception:  # noqa: BLE001 - requests' read timeout
            raise BuildFailed(f"reading settings.py inside the image took longer than {timeout:g} s") from None
        # Streamed: parse_introspection reads a bounded amount, never the whole log.
        return parse_introspection(api.logs(container["Id"], stdout=True, stderr=True, stream=True, follow=False))
    finally:
        try:
            api.remove_container(container["Id"], force=True, v=True)
        except Exception:  # noqa: BLE001
            pass


def parse_introspection(out) -> dict:
    """What INTROSPECT printed (text, bytes, or a stream of chunks, of which a bounded
    amount is read): the project's checked facts {session_configs, rooms, language_code,
    warnings} (instances.facts: settings.py runs first and may print anything), or
    BuildFailed with the reason."""
    from instances import facts

    try:
        found = facts.project_facts(out)
    except facts.BadOutput as exc:
        raise BuildFailed(f"reading settings.py failed: {exc}") from None
    if "error" in found:
        raise BuildFailed(f"settings.py cannot be imported: {found['error']}")
    return found


def release_labels(runtime, instance_name: str) -> dict:
    """The labels of every release image of an instance (the tag `:r<number>` names the
    release; a label per release would cost an uncached build step)."""
    return {LABEL_MANAGER: runtime.manager_id, LABEL_INSTANCE: instance_name, LABEL_COMPONENT: "release"}


def new_context() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="lab-build-")
