"""What a project's settings.py may claim: the manager's checks of the introspection output.

`otree_project.INTROSPECT` imports the experimenter's settings.py and prints its session configs,
rooms and language as one JSON line. That output is the tenant's: settings.py runs first,
in the same process, and can print a forged line, or gigabytes. So nothing in it is taken
as it is: `project_facts()` reads a bounded amount (MAX_OUTPUT), and every field is checked
here for type, length and count. What does not fit is dropped with a warning for the
build log (the release goes on: oTree itself would serve the rest of the project); only
output that is not the expected JSON at all fails the release.

Room names become URL path segments (`/lobby/<instance>/<room>/`, oTree's `/room/<name>/`):
a name with `/` or `\\`, a control character, or `.`/`..` cannot be one and is skipped (such
a room cannot work in oTree either). Participant labels are bounded per room and in total
(the lobby's seat lists and kiosk launchers are built from them).
"""

from __future__ import annotations

import json
import re
import unicodedata

MAX_OUTPUT = 4 * 1024 * 1024  # characters of settings-reader output looked at
MAX_CONFIGS = 200
MAX_ROOMS = 100
MAX_ROOM_LABELS = 1000  # participant labels per room the lobby takes
MAX_LABELS = 5000  # ... and in all rooms together
MAX_NAME = 100
MAX_DISPLAY = 200
MAX_LABEL = 100  # oTree's participant label field
MAX_APPS = 50
MAX_PARTICIPANTS = 10_000
MAX_WARNINGS = 50
LANGUAGE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8}){0,3}$")


class BadOutput(ValueError):
    """The settings reader's output is not what it prints; the message says why."""


def _controls(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") for ch in text)


def _shown(value, n: int = 60) -> str:
    """A value as a warning may quote it (bounded, one line)."""
    text = repr(value) if not isinstance(value, str) else value
    text = "".join(ch if not _controls(ch) else "?" for ch in text)
    return text if len(text) <= n else text[: n - 1] + "…"


def room_name_problem(name) -> str | None:
    """Why `name` cannot be a room's name (None when it can)."""
    if not isinstance(name, str) or not name.strip():
        return "a room needs a name"
    if len(name) > MAX_NAME:
        return f"a room name may have at most {MAX_NAME} characters"
    if "/" in name or "\\" in name:
        return "a room name cannot contain / or \\ (oTree serves a room at /room/<name>/)"
    if name in (".", "..") or name != name.strip():
        return "a room name cannot be . or .., nor start or end with a space"
    if _controls(name):
        return "a room name cannot contain control characters"
    return None


def label_problem(label) -> str | None:
    if not isinstance(label, str) or not label:
        return "empty"
    if len(label) > MAX_LABEL:
        return f"longer than {MAX_LABEL} characters"
    if _controls(label):
        return "contains a control character"
    return None


def _text(value, n: int) -> str:
    return value[:n] if isinstance(value, str) and not _controls(value) else ""


def _config(raw, warn) -> dict | None:
    if not isinstance(raw, dict):
        warn("a session config that is not a dict was skipped")
        return None
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or "/" in name or _controls(name):
        warn(f"session config {_shown(name)} skipped: its name must be 1 to {MAX_NAME} characters, "
             "without / or control characters")
        return None
    participants = raw.get("num_demo_participants")
    if isinstance(participants, bool) or not isinstance(participants, int) or not 0 < participants <= MAX_PARTICIPANTS:
        participants = None
    apps = raw.get("app_sequence")
    apps = [a[:80] for a in apps[:MAX_APPS] if isinstance(a, str) and not _controls(a)] if isinstance(apps, list) else []
    return {"name": name, "display_name": _text(raw.get("display_name"), MAX_DISPLAY) or name,
            "num_demo_participants": participants, "app_sequence": apps}


def _room(raw, warn, budget: list[int]) -> dict | None:
    if not isinstance(raw, dict):
        warn("a room that is not a dict was skipped")
        return None
    name = raw.get("name")
    problem = room_name_problem(name)
    if problem:
        warn(f"room {_shown(name)} skipped: {problem}; rename it in settings.py")
        return None
    labels, bad, seen = [], 0, set()
    raw_labels = raw.get("participant_labels")
    raw_labels = raw_labels if isinstance(raw_labels, list) else []
    count = raw.get("label_count")
    count = count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else len(raw_labels)
    room_limit = min(MAX_ROOM_LABELS, budget[0])
    for label in raw_labels[: MAX_ROOM_LABELS + 1]:
        if label_problem(label):
            bad += 1
        elif label not in seen and len(labels) < room_limit:
            seen.add(label)
            labels.append(label)
    budget[0] -= len(labels)
    if bad:
        warn(f"room {name}: {bad} participant label(s) skipped (empty, longer than {MAX_LABEL} characters "
             "or with control characters)")
    if max(count, len(raw_labels)) > len(labels) + bad and len(labels) == room_limit:
        limit_text = (f"{MAX_ROOM_LABELS} per room" if room_limit == MAX_ROOM_LABELS
                      else f"{MAX_LABELS} in all rooms together")
        warn(f"room {name}: the lobby takes the first {len(labels)} of its participant labels "
             f"(at most {limit_text}); oTree itself still accepts all of them")
    problem_text = _text(raw.get("problem"), MAX_DISPLAY)
    return {"name": name, "display_name": _text(raw.get("display_name"), MAX_DISPLAY) or name,
            "participant_labels": labels, "problem": problem_text}


def project_facts(out) -> dict:
    """The checked facts from the settings reader's output: {session_configs, rooms,
    language_code, warnings}. `out`: text, bytes, or an iterable of byte/text chunks (a
    log stream), of which at most MAX_OUTPUT characters are read. Raises BadOutput when
    the output holds no result; `error` (the import's exception) comes back as
    {"error": text}."""
    text = _bounded(out)
    found = error = None
    for line in text.splitlines():  # the last result counts: settings.py prints first
        if line.startswith("@@JSON@@"):
            found = line[len("@@JSON@@"):]
        elif line.startswith("@@ERROR@@") and error is None:
            error = line[len("@@ERROR@@"):][:400]
    if found is None:
        if error is not None:
            return {"error": "".join(ch if not _controls(ch) else " " for ch in error)}
        if len(text) >= MAX_OUTPUT:
            raise BadOutput(f"settings.py printed more than {MAX_OUTPUT // 2**20} MB while it was read; "
                            "print less when it is imported")
        raise BadOutput("the settings reader printed no result")
    try:
        data = json.loads(found)
    except ValueError:
        raise BadOutput("the settings reader's result is not valid JSON (does settings.py print at import?)") from None
    if not isinstance(data, dict):
        raise BadOutput("the settings reader's result is not an object")
    warnings: list[str] = []

    def warn(message: str) -> None:
        if len(warnings) < MAX_WARNINGS:
            warnings.append(message[:300])

    configs_raw = data.get("session_configs") if isinstance(data.get("session_configs"), list) else []
    rooms_raw = data.get("rooms") if isinstance(data.get("rooms"), list) else []
    if len(configs_raw) > MAX_CONFIGS:
        warn(f"only the first {MAX_CONFIGS} session configs are used")
    if len(rooms_raw) > MAX_ROOMS:
        warn(f"only the first {MAX_ROOMS} rooms are used")
    configs, names = [], set()
    for raw in configs_raw[:MAX_CONFIGS]:
        config = _config(raw, warn)
        if config is not None and config["name"] in names:
            warn(f"session config {config['name']} is defined twice; the first one is used")
        elif config is not None:
            names.add(config["name"])
            configs.append(config)
    rooms, room_names, budget = [], set(), [MAX_LABELS]
    for raw in rooms_raw[:MAX_ROOMS]:
        room = _room(raw, warn, budget)
        if room is not None and room["name"] in room_names:
            warn(f"room {room['name']} is defined twice; the first one is used")
        elif room is not None:
            room_names.add(room["name"])
            rooms.append(room)
    language = data.get("language_code")
    if not isinstance(language, str) or not LANGUAGE.match(language):
        if language:
            warn(f"LANGUAGE_CODE {_shown(language, 20)} is not a language code; the lobby uses English")
        language = ""
    return {"session_configs": configs, "rooms": rooms, "language_code": language, "warnings": warnings}


def _bounded(out) -> str:
    if isinstance(out, bytes):
        return out[:MAX_OUTPUT].decode(errors="replace")
    if isinstance(out, str):
        return out[:MAX_OUTPUT]
    parts, size = [], 0
    for chunk in out:
        if isinstance(chunk, bytes):
            chunk = chunk.decode(errors="replace")
        parts.append(chunk[: MAX_OUTPUT - size])
        size += len(parts[-1])
        if size >= MAX_OUTPUT:
            break
    return "".join(parts)


def usable_rooms(rooms) -> list[dict]:
    """The rooms of a release as pages may use them (a release recorded before these
    checks existed may hold anything): rooms with a usable name, once each, their valid
    labels within the caps."""
    usable, names, budget = [], set(), MAX_LABELS
    for room in rooms if isinstance(rooms, list) else []:
        if not isinstance(room, dict) or room_name_problem(room.get("name")) or room["name"] in names:
            continue
        names.add(room["name"])
        raw = room.get("participant_labels")
        labels = list(dict.fromkeys(label for label in (raw if isinstance(raw, list) else [])
                                    if label_problem(label) is None))[: min(MAX_ROOM_LABELS, budget)]
        budget -= len(labels)
        display = room.get("display_name")
        usable.append({**room, "participant_labels": labels,
                       "display_name": display if isinstance(display, str) and display else room["name"]})
    return usable
