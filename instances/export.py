"""The experiment's data: oTree's own exports of an instance, as one zip.

What oTree's admin offers on its Data page, read through the app's REST exports with the
instance's REST key (instances/otree_api.py: no redirects, time and size limits):

- `all_apps_wide.csv`  (`/api/export_wide`; without it there is no export),
- `<app>.csv` per app  (`/api/export_app?app=<app>`; the apps as `/api/apps` lists them),
- `<app>_custom.csv`   (`/api/export_app_custom?app=<app>`) where the app has a
  `custom_export` function (it answers 200; any other answer means none, noted),
- `PageTimes.csv`, `ChatMessages.csv` (always, when the app answers them: a chat export
  without messages is its header line),
- `manifest.json`: the instance, its live release (number and commit), the export's time
  (UTC), oTree's version (`/api/otree_version`), each file with its size and source, and
  notes (what is missing and why).

The app runs the experimenter's code, so its answers are untrusted: app names are used as
file names only when they match APP_NAME_RE (others are skipped with a note), at most
MAX_APPS apps are asked, the CSVs together may be at most LAB_EXPORT_MAX_MB, and the whole
export at most EXPORT_SECONDS. The zip is written to a temporary file beside its
destination as the bytes arrive (nothing is held in memory) and renamed into place only
when complete: a failed export leaves nothing behind.

Used by "Download data" (`download`: the instance page and
`GET /api/v1/instances/{name}/data.zip`) and by the backups of a reset and a delete
(`store_beside`, called by instances.reconciler.backup).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
import zipfile
from datetime import datetime, timezone as dt_timezone
from pathlib import Path

from django.conf import settings

from instances import otree_api
from instances.backups import backup_dir
from instances.otree_api import OTreeUnavailable
from manager import locks, throttle
from manager.audit.services import record
from manager.texts import storable

EXPORT_SECONDS = 300  # the whole export (every request together)
MAX_APPS = 200  # apps asked for their exports; more are noted, not asked
APP_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
FIXED_NAMES = ("all_apps_wide", "PageTimes", "ChatMessages", "manifest")
STALE_SECONDS = 3600  # a download's temporary file older than this is a crashed request's: removed
NOTE_MAX = 300  # characters of one note


class ExportFailed(Exception):
    """No export could be made; the message says why, for a user (API: 409)."""


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y%m%d-%H%M%S")


def _shown(name) -> str:
    """An untrusted app name as a note may quote it."""
    return repr(str(name)[:80]) + ("…" if len(str(name)) > 80 else "")


class _Zip:
    """The zip being written: entries streamed in from the app, within the byte budget and
    the deadline."""

    def __init__(self, instance, zf: zipfile.ZipFile, base: str, moment: datetime, max_bytes: int, deadline: float):
        self.instance, self.zf, self.base = instance, zf, base
        self.date_time = moment.timetuple()[:6]
        self.max_bytes, self.deadline = max_bytes, deadline
        self.used = 0
        self.files: list[dict] = []
        self.taken: set[str] = set()  # lower-cased: a name that differs only in case collides on unzip

    def _info(self, name: str) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name, date_time=self.date_time)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o600 << 16
        return info

    def fetch(self, name: str, path: str, params: dict | None = None) -> None:
        """Stream the app's answer to `path` into entry `name`. OTreeUnavailable as
        otree_api raises it (kind "status": the app answered another status, nothing was
        written; "too_large": over what is left of the budget)."""
        info = self._info(name)
        handle = None

        def sink(chunk: bytes) -> None:
            nonlocal handle
            if handle is None:
                handle = self.zf.open(info, "w", force_zip64=True)
            handle.write(chunk)

        try:
            size = otree_api.stream(self.instance, path, params=params, sink=sink,
                                    limit=self.max_bytes - self.used, base_url=self.base,
                                    total=EXPORT_SECONDS, deadline=self.deadline)
        finally:
            if handle is not None:
                handle.close()
        if handle is None:
            self.zf.writestr(info, b"")
        self.used += size
        self.taken.add(name.lower())
        self.files.append({"name": name, "bytes": size, "source": path + (f"?app={params['app']}" if params else "")})

    def write_json(self, name: str, data: dict) -> None:
        self.zf.writestr(self._info(name), json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _too_large(max_bytes: int) -> str:
    return (f"the data are larger than LAB_EXPORT_MAX_MB ({max_bytes // 10**6} MB); ask a lab manager to raise it, "
            "or export from oTree's admin (Data page)")


def _apps(instance, base: str, deadline: float, notes: list[str]) -> list[str]:
    """The app names to ask for their exports (usable as file names), in the app's order."""
    try:
        listed = otree_api.get_json(instance, "/api/apps", base_url=base, deadline=deadline)
    except OTreeUnavailable as exc:
        if exc.kind not in ("status", ""):
            raise
        notes.append(f"no per-app files: {exc}")
        return []
    if not isinstance(listed, dict):
        notes.append("no per-app files: /api/apps did not answer with a JSON object")
        return []
    names, reserved = [], {n.lower() for n in FIXED_NAMES}
    for name in listed:
        if not (isinstance(name, str) and APP_NAME_RE.fullmatch(name)):
            notes.append(f"app {_shown(name)} skipped: its name is not usable as a file name "
                         "(letters, digits and _ only, at most 64)")
        elif name.lower() in reserved:
            notes.append(f"app {_shown(name)} skipped: its file would take the name of one of oTree's own exports")
        elif len(names) >= MAX_APPS:
            notes.append(f"only the first {MAX_APPS} apps were exported ({len(listed)} are listed)")
            break
        else:
            names.append(name)
    return names


def _version(instance, base: str, deadline: float, notes: list[str]) -> str | None:
    try:
        answer = otree_api.get_json(instance, "/api/otree_version", base_url=base, deadline=deadline)
    except OTreeUnavailable as exc:
        if exc.kind not in ("status", ""):
            raise
        notes.append(f"oTree's version unknown: {exc}")
        return None
    version = answer.get("version") if isinstance(answer, dict) else None
    if not isinstance(version, str) or not re.fullmatch(r"[A-Za-z0-9.+_-]{1,40}", version):
        notes.append("oTree's version unknown: /api/otree_version did not name one")
        return None
    return version


def _not_running(instance) -> str:
    """Why the app did not answer, when its runtime says it is not running (a stopped
    container keeps its address): '' when it runs or the runtime does not say."""
    from instances.runtime import RuntimeError_, get_runtime
    from instances.runtime.base import Health

    try:
        app = get_runtime(instance).state(instance.name).app
    except RuntimeError_:
        return ""
    if app.health == Health.RUNNING:
        return ""
    how = {Health.MISSING: "there is none", Health.STARTING: "it is being started",
           Health.EXITED: f"it has stopped{f': {app.detail}' if app.detail else ''}"}.get(app.health, "")
    return f"the oTree app of {instance.name} is not running" + (f" ({how})" if how else "")


def _release(instance) -> dict | None:
    live = instance.live_release
    return {"number": live.number, "commit": live.commit} if live is not None else None


def write_data_zip(instance, dest_path, *, base_url: str = "", max_bytes: int | None = None,
                   seconds: float = EXPORT_SECONDS) -> dict:
    """Write the instance's data export to `dest_path` (atomically: a temporary file beside
    it, renamed when complete; mode 0600). Returns the manifest (also in the zip as
    manifest.json) with the zip's `zip_bytes`. ExportFailed with the reason when there is
    no export (the app does not run or answer, all_apps_wide fails, a limit is passed);
    then nothing is written. `base_url`: the app's address (default: the runtime's)."""
    dest = Path(dest_path)
    max_bytes = max_bytes if max_bytes is not None else settings.LAB_EXPORT_MAX_MB * 10**6
    deadline = time.monotonic() + seconds
    try:
        base = base_url or otree_api.app_url(instance)
    except OTreeUnavailable as exc:
        raise ExportFailed(str(exc)) from None
    moment = datetime.now(dt_timezone.utc)
    notes: list[str] = []
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w+b") as raw:
            with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
                out = _Zip(instance, zf, base, moment, max_bytes, deadline)
                try:
                    version = _version(instance, base, deadline, notes)
                    out.fetch("all_apps_wide.csv", "/api/export_wide")
                    for app in _apps(instance, base, deadline, notes):
                        _optional(out, f"{app}.csv", "/api/export_app", {"app": app}, notes)
                        _optional(out, f"{app}_custom.csv", "/api/export_app_custom", {"app": app}, notes,
                                  absent=f"{app}: no custom export")
                    _optional(out, "PageTimes.csv", "/api/export_page_times", None, notes)
                    _optional(out, "ChatMessages.csv", "/api/export_chat", None, notes)
                except OTreeUnavailable as exc:
                    if exc.kind == "too_large":
                        raise ExportFailed(_too_large(max_bytes)) from None
                    stopped = _not_running(instance) if exc.kind == "connection" and not base_url else ""
                    raise ExportFailed(stopped or str(exc)) from None
                manifest = {
                    "instance": instance.name,
                    "release": _release(instance),
                    "exported_at": moment.isoformat().replace("+00:00", "Z"),
                    "otree_version": version,
                    "files": out.files,
                    "notes": [storable(n[:NOTE_MAX]) for n in notes],
                    "limit_mb": max_bytes // 10**6,
                }
                out.write_json("manifest.json", manifest)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    manifest["zip_bytes"] = dest.stat().st_size
    return manifest


def _optional(out: _Zip, name: str, path: str, params: dict | None, notes: list[str], absent: str = "") -> None:
    """A file the export does without when the app answers it with another status (noted);
    a name taken already (two names differing only in case) is skipped (noted)."""
    if name.lower() in out.taken:
        notes.append(f"{name} skipped: a file of that name (ignoring case) is in the zip already")
        return
    try:
        out.fetch(name, path, params)
    except OTreeUnavailable as exc:
        if exc.kind != "status":
            raise
        notes.append(f"{absent} (the app answered HTTP {exc.status})" if absent else f"{name} missing: {exc}")


# --- "Download data" ------------------------------------------------------------------

def export_dir() -> Path:
    """Where downloads are written before they are sent (each is unlinked once open)."""
    path = settings.DATA_DIR / "exports"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)  # participants' data: readable by the manager's user only
    now = time.time()
    for stale in path.iterdir():  # a request killed between writing and opening its file
        try:
            if now - stale.stat().st_mtime > STALE_SECONDS:
                stale.unlink()
        except OSError:
            pass
    return path


def download_name(instance, moment: datetime | None = None) -> str:
    return f"{instance.name}-data-{_stamp(moment or datetime.now(dt_timezone.utc))}Z.zip"


def download(actor, instance, request=None):
    """The instance's data export for `actor` (the caller checked they may see it):
    (an open binary file of the zip, already unlinked, so it goes once closed; its download
    name). One export per instance at a time; every attempt counts against the `export`
    rate limit (throttle.Throttled). ExportFailed with the reason when no export can be made
    (API 409)."""
    if instance.delete_requested:
        raise ExportFailed(f"{instance.name} is being deleted")
    if instance.live_release is None:
        raise ExportFailed(f"{instance.name} has no live release: there is no oTree app whose data could be "
                           "exported (push your project first)")
    try:
        with locks.lock(f"export:{instance.pk}", wait=0):
            with throttle.take("export", actor, instance):
                pass  # counted whether or not the app answers: a slow app costs the manager too
            path = export_dir() / f"{uuid.uuid4().hex}.zip"
            try:
                manifest = write_data_zip(instance, path)
            except ExportFailed as exc:
                record(actor, "instance.data_download", instance,
                       f"could not download the data of {instance.name}: {exc}"[:500], request, ok=False)
                raise
            handle = path.open("rb")
            path.unlink()
    except locks.Busy:
        raise ExportFailed(f"a data download of {instance.name} is being prepared already; try again when it is "
                           "done") from None
    record(actor, "instance.data_download", instance, f"downloaded the data of {instance.name}", request,
           ok=True, bytes=manifest["zip_bytes"], files=len(manifest["files"]))
    return handle, download_name(instance)


# --- beside a backup (reset, delete) ----------------------------------------------------

def data_filename(dump_filename: str, suffix: str) -> str:
    """`ann-20261203-101500-final-ab12cd.dump` → `ann-20261203-101500-final-ab12cd-data.zip`."""
    stem = dump_filename[:-len(suffix)] if suffix and dump_filename.endswith(suffix) else dump_filename
    return f"{stem}-data.zip"


def store_beside(row, instance, suffix: str) -> None:
    """Write the data export beside backup `row`'s dump and record it on the row
    (data_filename, data_size), or record why it could not be (data_problem). Never raises
    for the app's sake: the dump is the authoritative copy. Nothing is tried for an
    instance without a live release (no app has ever run: there are no data of oTree's)."""
    from instances.models import Backup

    if instance.live_release is None:  # no oTree app has run yet: no data of it to export
        return
    name = data_filename(row.filename, suffix)
    try:
        manifest = write_data_zip(instance, backup_dir() / name)
    except (ExportFailed, OSError) as exc:
        problem = storable(str(exc))[:500]
        Backup.objects.filter(pk=row.pk).update(data_filename="", data_size=0, data_problem=problem)
        row.data_filename, row.data_size, row.data_problem = "", 0, problem
        return
    Backup.objects.filter(pk=row.pk).update(data_filename=name, data_size=manifest["zip_bytes"], data_problem="")
    row.data_filename, row.data_size, row.data_problem = name, manifest["zip_bytes"], ""


def data_sentence(row) -> str:
    """What a job's result says of the data export beside backup `row`."""
    if row.data_filename:
        return f"oTree's data export {row.data_filename} ({row.data_size} bytes) is stored beside it"
    if row.data_problem:
        return f"oTree's data export could not be stored ({row.data_problem}); the database backup has everything"
    return ""
