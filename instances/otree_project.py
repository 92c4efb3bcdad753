"""What the manager knows about an oTree project, whatever runs it (backend-neutral; no
backend's concepts here): how its app starts and on which port, the files never part of
a release, the settings reader run inside a built release and the reading of its output,
the reading of pip's failures, and `BuildFailed`.

Each backend (instances/runtime/) builds and starts releases its own way from these.
"""

from __future__ import annotations

import re

from instances import facts

APP_PORT = 8000  # the port the app listens on where it runs alone (a container); a backend may pick another
SERVER = ("otree", "prodserver")  # oTree 5/6: `otree prodserver [ADDR:]PORT` (without ADDR: 0.0.0.0)
MAX_TREE_FILES = 100_000  # files in a deployed tree (an oTree project has hundreds)


def start_argv(bind: str) -> list[str]:
    """The command that starts the project's app: `bind` is "PORT" or "ADDR:PORT"; the
    program is looked up in the release's environment (PATH, or the backend's venv)."""
    return [*SERVER, bind]


class BuildFailed(Exception):
    """The user's project cannot be built; the message says why (shown to the pusher)."""


# Never part of a release, at any depth (a backend's copy of the tree leaves them out).
IGNORED = (".git", "__pycache__", "*.pyc", "db.sqlite3", "venv", ".venv", "__temp*", "Dockerfile.otree-lab",
           ".dockerignore")

REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def requirement_names(text: str) -> list[tuple[str, str]]:
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


# --- pip's failures ------------------------------------------------------------------------

PIP_KILLED = re.compile(r"exit code: -9\b|signal: 9 \(SIGKILL\)")  # a setup.py or compiler killed (memory limit)
PIP_NOT_FOUND = re.compile(r"No matching distribution found for ([^\s]+)")
PIP_NO_VERSION = re.compile(r"Could not find a version that satisfies the requirement ([^\s]+) \(from versions: ([^)]*)\)")
# uv's words for the same failures
UV_NOT_FOUND = re.compile(r"Because ([A-Za-z0-9][A-Za-z0-9._-]*) was not found in the package registry")
UV_NO_VERSION = re.compile(r"Because there is no version of ([^\s]+?) and")


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
    m = UV_NOT_FOUND.search(log_text)
    if m:
        return f"package {m.group(1)} not found on PyPI"
    m = UV_NO_VERSION.search(log_text)
    if m:
        name = REQ_NAME.match(m.group(1)).group(1) if REQ_NAME.match(m.group(1)) else m.group(1)
        return f"no version of {name} matches {m.group(1)}"
    if "No solution found when resolving dependencies" in log_text:
        return "the packages in requirements.txt have conflicting dependencies (see the log)"
    if "ResolutionImpossible" in log_text or "conflicting dependencies" in log_text:
        return "the packages in requirements.txt have conflicting dependencies (see the log)"
    return None


# --- the settings reader -------------------------------------------------------------------

# Run with the release's Python inside the release (argv[1]: the project's folder; default
# /app); prints @@JSON@@ and the facts, or @@ERROR@@ and why settings.py cannot be imported.
INTROSPECT = r'''
import json, os, sys
ROOT = os.path.realpath(sys.argv[1]) if len(sys.argv) > 1 else "/app"  # the project (default: /app)
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


def parse_introspection(out) -> dict:
    """What INTROSPECT printed (text, bytes, or a stream of chunks, of which a bounded
    amount is read): the project's checked facts {session_configs, rooms, language_code,
    warnings} (instances.facts: settings.py runs first and may print anything), or
    BuildFailed with the reason."""
    try:
        found = facts.project_facts(out)
    except facts.BadOutput as exc:
        raise BuildFailed(f"reading settings.py failed: {exc}") from None
    if "error" in found:
        raise BuildFailed(f"settings.py cannot be imported: {found['error']}")
    return found

