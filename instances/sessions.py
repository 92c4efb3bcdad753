"""The oTree sessions of an instance, as its app's REST API tells them, and the guard that
keeps restarts, resets, settings changes, rollbacks and release switches from disturbing
a live one.

`refresh(instance)` reads (with the instance's REST key, through instances.otree_api):

- `GET /api/sessions`: the sessions (not the demo ones): code, config, label, participants;
- `GET /api/export_page_times` (streamed, parsed as it arrives, size-limited): when each
  participant last started or completed a page;
- `GET /api/export_wide?session_code=X` only for a session whose activity changed since the
  last read (at most WIDE_PER_READ per read, the most recent first): who started
  (`participant.visited`) and who finished (`_index_in_pages > _max_page_index`).

A session is **live** while one of its participants who has not finished was active (the
start or a page completed) in the last LAB_SESSION_LIVE_MINUTES. The read is stored in
`Instance.otree_sessions` (with `sessions_checked_at`); when the app does not answer, the
last read is kept, `sessions_problem` says why, and the manager knows of no live session
(nothing waits forever for an app that is down).

Everything the app answers is untrusted: codes, names and numbers are checked and cut to
size; a session list, an export or a row that is not what oTree writes is ignored.
"""

from __future__ import annotations

import csv
import logging
import re
from datetime import datetime, timedelta, timezone as dt_timezone

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from instances import otree_api, state
from instances.models import Instance
from manager.accounts.services import Conflict
from manager.texts import storable

log = logging.getLogger(__name__)

CACHE_SECONDS = 12  # a read this recent is used as it is before a guarded action
READ_TIMEOUT = 5  # seconds per request of a read (the app answers these in milliseconds)
PAGE_TIMES_LIMIT = 64 * 2**20  # bytes of the page-times export read (parsed as it streams)
WIDE_LIMIT = 16 * 2**20  # bytes of one session's wide export
WIDE_PER_READ = 4  # wide exports per read at most (sessions whose activity changed)
MAX_SESSIONS = 100  # sessions stored (the newest; live ones always)
MAX_PARTICIPANTS = 100_000  # per session, as oTree reports it (more is not a real session)
CODE_RE = re.compile(r"^[a-z0-9]{1,40}$")
PUBLIC_KEYS = ("code", "config", "label", "participants", "started", "finished", "active", "last_activity", "live")


def live_minutes() -> float:
    return settings.LAB_SESSION_LIVE_MINUTES


# --- reading ------------------------------------------------------------------------------

def _text(value, limit: int) -> str:
    return storable(value if isinstance(value, str) else "")[:limit]


def _whole(value, high: int = 2**31) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 <= number <= high else None


def _iso(epoch: int | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=dt_timezone.utc).isoformat()


def _listed(instance, base: str) -> list[dict]:
    """The app's sessions (GET /api/sessions), checked: [{code, config, label, participants, created}]."""
    data = otree_api.get_json(instance, "/api/sessions", base_url=base, timeout=READ_TIMEOUT)
    if not isinstance(data, list):
        raise otree_api.OTreeUnavailable("the oTree app's session list is not a list")
    sessions = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("code"), str) or not CODE_RE.match(item["code"]):
            continue
        sessions.append({"code": item["code"], "config": _text(item.get("config_name"), 100),
                         "label": _text(item.get("label"), 200),
                         "participants": _whole(item.get("num_participants"), MAX_PARTICIPANTS) or 0,
                         "created": _whole(item.get("created_at")) or 0})
    return sessions


class _PageTimes:
    """A sink for the page-times CSV: per (session, participant id) the latest epoch seen,
    and per session how many rows (a page completed in the same second as the last one
    still changes it)."""

    def __init__(self, codes: set[str]):
        self.codes = codes
        self.pending = b""
        self.header: dict[str, int] | None = None
        self.last: dict[tuple[str, int], int] = {}
        self.rows: dict[str, int] = {}

    def __call__(self, chunk: bytes) -> None:
        lines = (self.pending + chunk).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            self._line(line)

    def close(self) -> None:
        if self.pending:
            self._line(self.pending)
            self.pending = b""

    def _line(self, raw: bytes) -> None:
        if len(raw) > 4096:
            return  # no row oTree writes is this long
        try:
            row = next(csv.reader([raw.decode("utf-8", errors="replace").rstrip("\r")]))
        except (csv.Error, StopIteration):
            return
        if self.header is None:
            self.header = {name: i for i, name in enumerate(row)}
            return
        h = self.header
        try:
            code = row[h["session_code"]]
            pid = _whole(row[h["participant_id_in_session"]], MAX_PARTICIPANTS)
            epoch = _whole(row[h["epoch_time_completed"]])
        except (KeyError, IndexError):
            return
        if code in self.codes and pid is not None and epoch is not None:
            self.rows[code] = self.rows.get(code, 0) + 1
            key = (code, pid)
            if epoch > self.last.get(key, -1):
                self.last[key] = epoch


def _page_times(instance, base: str, codes: set[str]) -> _PageTimes:
    sink = _PageTimes(codes)
    otree_api.stream(instance, "/api/export_page_times", sink=sink, limit=PAGE_TIMES_LIMIT, base_url=base,
                     timeout=READ_TIMEOUT)
    sink.close()
    return sink


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes")


def _wide(instance, base: str, code: str) -> tuple[int, list[int]] | None:
    """(started, ids of the finished participants) from the session's wide export; None when
    it cannot be read or is not what oTree writes."""
    try:
        data = otree_api.get_bytes(instance, "/api/export_wide", params={"session_code": code}, limit=WIDE_LIMIT,
                                   base_url=base, timeout=READ_TIMEOUT)
    except otree_api.OTreeUnavailable as exc:
        log.info("wide export of %s session %s not read: %s", instance.name, code, exc)
        return None
    rows = csv.reader(data.decode("utf-8", errors="replace").splitlines())
    header = next(rows, None) or []
    col = {name: i for i, name in enumerate(header)}
    needed = ("participant.id_in_session", "participant.visited", "participant._index_in_pages",
              "participant._max_page_index")
    if not all(name in col for name in needed):
        return None
    started, finished = 0, []
    for row in rows:
        try:
            pid = _whole(row[col["participant.id_in_session"]], MAX_PARTICIPANTS)
            index = _whole(row[col["participant._index_in_pages"]])
            pages = _whole(row[col["participant._max_page_index"]])
            visited = _flag(row[col["participant.visited"]])
        except IndexError:
            continue
        if pid is None:
            continue
        started += visited
        if visited and index is not None and pages is not None and index > pages:
            finished.append(pid)
    return started, sorted(finished)[:MAX_PARTICIPANTS]


def read(instance, previous: list[dict] | None = None, now: datetime | None = None) -> list[dict]:
    """The sessions as the app tells them now (OTreeUnavailable when it does not answer)."""
    now = now or timezone.now()
    before = {s.get("code"): s for s in (previous or []) if isinstance(s, dict)}
    base = otree_api.app_url(instance)
    listed = _listed(instance, base)
    times = _page_times(instance, base, {s["code"] for s in listed}) if listed else _PageTimes(set())
    last, rows = times.last, times.rows
    window = now.timestamp() - live_minutes() * 60
    by_session: dict[str, dict[int, int]] = {}
    for (code, pid), epoch in last.items():
        by_session.setdefault(code, {})[pid] = epoch
    # The wide export only where the activity changed since the last read, newest first.
    changed = [s for s in listed if by_session.get(s["code"]) and (
        before.get(s["code"], {}).get("rows") != rows.get(s["code"])
        or "finished_ids" not in before.get(s["code"], {}))]
    changed.sort(key=lambda s: -max(by_session[s["code"]].values()))
    wide = {s["code"]: _wide(instance, base, s["code"]) for s in changed[:WIDE_PER_READ]}
    sessions = []
    for s in listed:
        seen = by_session.get(s["code"], {})
        old = before.get(s["code"], {})
        last_epoch = max(seen.values()) if seen else None
        found = wide.get(s["code"])
        if found is not None:
            started, finished_ids = found
        elif "finished_ids" in old and old.get("rows") == rows.get(s["code"]):
            started, finished_ids = old.get("started", len(seen)), old["finished_ids"]
        else:  # not read (yet): who was seen started; who finished is not known
            started, finished_ids = len(seen), None
        done = set(finished_ids or [])
        active = sum(1 for pid, epoch in seen.items() if epoch >= window and pid not in done)
        entry = {**s, "started": max(started, len(seen)), "finished": len(done) if finished_ids is not None else None,
                 "active": active, "last_activity": _iso(last_epoch), "last_epoch": last_epoch,
                 "rows": rows.get(s["code"], 0),
                 "live": active > 0}
        if finished_ids is not None:
            entry["finished_ids"] = finished_ids
        sessions.append(entry)
    sessions.sort(key=lambda s: (not s["live"], -(s["last_epoch"] or s["created"] or 0)))
    return sessions[:MAX_SESSIONS]


def public(session: dict) -> dict:
    """A stored session as the pages and the API show it."""
    return {key: session.get(key) for key in PUBLIC_KEYS}


def refresh(instance: Instance) -> bool:
    """Read the sessions and store them (the instance row is reloaded); tells its open
    pages when they changed. False when the app did not answer: the last read stays,
    marked stale with why."""
    now = timezone.now()
    try:
        sessions = read(instance, instance.otree_sessions, now)
    except otree_api.OTreeUnavailable as exc:
        problem = storable(str(exc))[:300]
        Instance.objects.filter(pk=instance.pk).update(sessions_checked_at=now, sessions_problem=problem)
        changed = instance.sessions_problem != problem
        instance.sessions_checked_at, instance.sessions_problem = now, problem
        if changed:
            _tell(instance)
        return False
    changed = sessions != instance.otree_sessions or instance.sessions_problem
    fields = {"sessions_checked_at": now, "sessions_problem": ""}
    if sessions != instance.otree_sessions:
        fields["otree_sessions"] = sessions
    Instance.objects.filter(pk=instance.pk).update(**fields)
    for key, value in fields.items():
        setattr(instance, key, value)
    if changed:
        _tell(instance)
    return True


def _tell(instance: Instance) -> None:
    try:
        state.push_event(instance.pk, instance.owner_id, sessions_event(instance))
    except Exception:  # noqa: BLE001 - a page misses an update; the next read sends it again
        log.warning("telling the pages of %s about its sessions", instance.name, exc_info=True)


def sessions_event(instance: Instance) -> dict:
    live = instance.live_sessions
    return {"type": "sessions", "name": instance.name, "live": len(live),
            "active": sum(s.get("active") or 0 for s in live), "problem": instance.sessions_problem}


def fresh(instance: Instance) -> Instance:
    """The instance with its sessions read at most CACHE_SECONDS ago (read now otherwise)."""
    checked = instance.sessions_checked_at
    if checked is None or checked < timezone.now() - timedelta(seconds=CACHE_SECONDS):
        refresh(instance)
    return instance


def refresh_running() -> dict:
    """The minute sweep: the sessions of every running instance read again (those read
    longest ago first: a sweep cut short by its time limit goes on with the others next).
    A sleeping instance is not read (nor woken: it fell asleep with no live session)."""
    from celery.exceptions import SoftTimeLimitExceeded

    read_ok = failed = 0
    for instance in (Instance.objects.filter(status=Instance.Status.RUNNING, delete_requested=False, asleep=False)
                     .order_by(F("sessions_checked_at").asc(nulls_first=True))):
        try:
            ok = refresh(instance)
        except SoftTimeLimitExceeded:
            raise
        except Exception:  # noqa: BLE001 - one instance never stops the sweep of the others
            log.warning("reading the sessions of %s", instance.name, exc_info=True)
            ok = False
        read_ok += ok
        failed += not ok
    return {"sessions_read": read_ok, "sessions_unknown": failed}


# --- the guard ----------------------------------------------------------------------------

def describe(live: list[dict]) -> str:
    """'session abcd1234 (hello_game) is live with 2 active participants' (and others)."""
    parts = []
    for s in live[:5]:
        active = s.get("active") or 0
        parts.append(f"session {s.get('code')} ({s.get('config') or 'unknown config'}) is live with {active} active "
                     f"participant{'s' if active != 1 else ''}")
    if len(live) > 5:
        parts.append(f"{len(live) - 5} more sessions are live")
    return "; ".join(parts)


class SessionLive(Conflict):
    """An action would disturb a live oTree session (API 409; pages ask for a confirmation
    that sends force)."""

    needs_confirmation = True

    def __init__(self, instance: Instance, action: str, live: list[dict]):
        self.instance_name = instance.name
        self.action = action
        self.sessions = [public(s) for s in live]
        self.summary = describe(live)
        self.page_text = f"{instance.name}: {self.summary}. {action[:1].upper()}{action[1:]} would disturb it."
        super().__init__(f"{self.page_text} Add ?force=true to do it anyway.")


def require_idle(instance: Instance, action: str, force: bool = False) -> str:
    """SessionLive when a session of the instance is live now (read fresh, see CACHE_SECONDS),
    unless `force`. An app that does not answer has no live session the manager can know of:
    nothing is refused then. Returns a note for the audit log ('' or, when forced while the
    last read saw a live session, ' (forced while session … was live …)')."""
    if force:
        live = instance.live_sessions
        return f" (forced while {describe(live)})" if live else ""
    fresh(instance)
    live = instance.live_sessions
    if live:
        raise SessionLive(instance, action, live)
    return ""


def idle_now(instance: Instance) -> list[dict]:
    """The live sessions read now (no cache; [] when the app does not answer): for the
    moment of a switch."""
    refresh(instance)
    return instance.live_sessions
