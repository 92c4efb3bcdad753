"""/api/v1/instances: oTree instances, with the same access rules as the pages
(owner and lab managers; others get 404, as if the instance did not exist)."""

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from ninja import File, Path, Query, Router, Schema, Status, UploadedFile
from ninja.errors import HttpError
from pydantic import Field

from instances import export, releases, schedule, services, sessions, sleep
from instances.models import Backup, Instance, Release
from instances.views import send_data_zip
from manager.audit.services import record
from instances.selectors import get_visible_backup, get_visible_instance, visible_instances, with_live_release
from manager.accounts.models import User
from manager.api.auth import managers_only
from manager.api.errors import responses
from manager.api.schemas import MAX_ID, SINGLE_LINE, TEXT, InputSchema, Whole, column, rules, text

router = Router(tags=["instances"])


class GitOut(Schema):
    ssh_url: str
    https_url: str


class OTreeOut(Schema):
    admin_username: str
    auth_level: str = Field(description='"STUDY", "DEMO" or "" (none)', **rules(enum=Instance.AuthLevel.values))
    production: bool


class InstanceOut(Schema):
    name: str
    owner: str
    status: str = Field(description="provisioning, ready_for_code, deploying, running, stopped, sleeping (its app "
                        "stopped while idle; the next request wakes it), failed, deleting",
                        **rules(enum=Instance.Status.values))
    status_reason: str
    url: str
    git: GitOut
    otree: OTreeOut
    release: dict | None = Field(None, description="{commit, status} of the live release, or null")
    rooms: list[dict] = Field(default_factory=list, description="[{name, participant_labels, lobby_url}]")
    env: dict[str, str] = Field(description="config vars")
    memory_mb: int
    cpus: float
    runtime: str = Field(description="the backend that runs it: docker, process or swarm; \"\" while it is set up")
    node: str | None = Field(description="the id of the swarm node it runs on (runtime swarm), as last recorded "
                             "by the manager; null for runtimes without nodes (docker, process) and before it "
                             "is placed")
    backup_interval_minutes: int | None = Field(description="its own backup schedule: minutes between scheduled "
                                                "backups (0 = off); null = the lab's LAB_BACKUP_INTERVAL")
    backup_keep_daily: int | None = Field(description="scheduled backups kept, one per day; null = the lab's "
                                          "LAB_BACKUP_KEEP_DAILY")
    backup_keep_weekly: int | None = Field(description="scheduled backups kept, one per ISO week; null = the lab's "
                                           "LAB_BACKUP_KEEP_WEEKLY")
    backup_schedule: dict = Field(description="the schedule in effect: {interval_seconds (0 = off), keep_daily, "
                                  "keep_weekly}")
    sleep_after_minutes: int | None = Field(description="minutes without a request after which it sleeps; 0 = "
                                            "never; null = the lab's LAB_SLEEP_AFTER_MINUTES")
    sleep_after: int = Field(description="the minutes in effect (0 = it never sleeps)")
    slept_at: str | None = Field(description="ISO time it last fell asleep, or null")
    sleep_reason: str = Field(description="why it last fell asleep")
    woke_at: str | None = Field(description="ISO time it last woke, or null")
    wake_reason: str = Field(description='what last woke it ("a request to its URL", "a bot run (#3)", ...)')


# services.validate_name's rules: NAME_RE (a lowercase letter first, a letter or digit
# last) without "--", as one pattern; tests/manager/test_api_schema.py checks they agree.
NAME_PATTERN = r"^[a-z](-?[a-z0-9])+$"


def _case_blind(word: str) -> str:
    """'LD_' -> '[Ll][Dd]_' (JSON Schema patterns have no flags)."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


# Config var names the services refuse, compared ignoring case: set by the manager, or
# changing how programs are loaded or Python starts.
_REFUSED_PREFIXES = [*services.RESERVED_CONFIG_PREFIXES, *services.LOADER_CONFIG_PREFIXES]
_REFUSED_NAMES = sorted({*services.RESERVED_CONFIG_KEYS, *services.LOADER_CONFIG_KEYS})
REFUSED_CONFIG_NAMES = (f"^({'|'.join(_case_blind(p) for p in _REFUSED_PREFIXES)})"
                        f"|^({'|'.join(_case_blind(k) for k in _REFUSED_NAMES)})$")
CONFIG_NAME = rf"^[A-Za-z_][A-Za-z0-9_]{{0,{services.MAX_CONFIG_NAME - 1}}}$"


class InstanceIn(InputSchema):
    name: str = Field(
        description=f"{services.NAME_LENGTH[0]}-{services.NAME_LENGTH[1]} characters: lowercase letters, digits "
        "and single hyphens, starting with a letter, ending with a letter or digit; not a reserved name. "
        "A name that is taken is 409. With subdomain routing, a name whose address is the manager's own is 422.",
        **rules(pattern=NAME_PATTERN, min_length=services.NAME_LENGTH[0], max_length=services.NAME_LENGTH[1],
                not_={"enum": sorted(services.RESERVED_NAMES)}))
    owner: str = Field(description="username of the active account that owns it (422 when there is none)",
                       **text(max_length=column(User, "username"), single_line=True))


class InstancePatch(InputSchema):
    auth_level: str | None = Field(None, description='"STUDY", "DEMO" or "" (none)',
                                   **rules(enum=[*Instance.AuthLevel.values, None]))
    production: bool | None = None
    env: dict[str, str] | None = Field(
        None, description="config vars (replaces all of them): names exactly as given (letters, digits and _, "
        "not starting with a digit); not the ones the manager sets (OTREE_*, DATABASE_URL, REDIS_URL, PORT, "
        "PATH, HOME, TMPDIR) nor those that change how programs are loaded or Python starts (LD_*, PYTHON*, "
        f"GCONV_PATH, GLIBC_TUNABLES, LOCPATH), in any case; at most {services.MAX_CONFIG_BYTES} bytes "
        "together as the app's environment (NAME=value and a NUL byte each, UTF-8).",
        **rules(max_properties=services.MAX_CONFIG_VARS,
                property_names={"pattern": CONFIG_NAME, "not": {"pattern": REFUSED_CONFIG_NAMES}},
                additional_properties={"pattern": TEXT,
                                       "maxLength": services.MAX_CONFIG_VALUE}))
    memory_mb: Whole | None = Field(None, description="MiB; lab managers only (403 for others)",
                                  **rules(minimum=services.MEMORY_RANGE[0], maximum=services.MEMORY_RANGE[1]))
    # At most two decimals, said in words and checked by the services: as `multipleOf: 0.01`
    # validators that divide in floating point would refuse 0.29 (0.29 / 0.01 = 28.999…).
    cpus: float | None = Field(None, description="CPUs, taking at most two decimals (0.29 or 2; 0.295 is "
                               "422, never rounded); lab managers only (403 for others)",
                               **rules(minimum=float(services.CPU_RANGE[0]), maximum=float(services.CPU_RANGE[1])))
    backup_interval_minutes: Whole | None = Field(
        None, description="minutes between scheduled backups (0 = off), null = the lab's default; lab managers only "
        "(403 for others); nothing restarts", **rules(minimum=0, maximum=schedule.INTERVAL_MAX_MINUTES))
    backup_keep_daily: Whole | None = Field(
        None, description="scheduled backups kept, the newest of each of this many most recent days; null = the lab's "
        "default; lab managers only (403 for others)", **rules(minimum=0, maximum=schedule.KEEP_MAX))
    backup_keep_weekly: Whole | None = Field(
        None, description="scheduled backups kept, the newest of each of this many most recent ISO weeks; null = the "
        "lab's default; lab managers only (403 for others)", **rules(minimum=0, maximum=schedule.KEEP_MAX))
    sleep_after_minutes: Whole | None = Field(
        None, description="minutes without a request after which it sleeps (its app stops until the next request "
        "wakes it); 0 = never; null = the lab's LAB_SLEEP_AFTER_MINUTES; lab managers only (403 for others); "
        "nothing restarts", **rules(minimum=0, maximum=sleep.SLEEP_AFTER_MAX))


_PASSWORD_LOW, _PASSWORD_HIGH = services.ADMIN_PASSWORD_LENGTH


class PasswordIn(InputSchema):
    password: str | None = Field(
        None, description=f"{_PASSWORD_LOW} to {_PASSWORD_HIGH} characters on one line; omit it (or send null or "
        '"") to generate a strong one',
        **rules(max_length=_PASSWORD_HIGH,
                pattern=f"^({SINGLE_LINE.strip('^$').rstrip('*')}{{{_PASSWORD_LOW},{_PASSWORD_HIGH}}})?$"))


class MoveIn(InputSchema):
    node: str = Field(description="the id of the swarm node to move it to (GET /api/v1/nodes lists them). A node "
                      "that does not exist is 422; one that is not ready, not active (paused or drained) or the "
                      "instance's own node is 409.",
                      **text(max_length=services.NODE_ID_MAX, min_length=1, single_line=True))


class PasswordOut(Schema):
    admin_username: str
    password: str = Field(description="shown once")


class JobOut(Schema):
    job: str = Field(description="background job id; its end is announced on the realtime socket")
    detail: str


class BackupOut(Schema):
    id: int
    kind: str
    status: str
    size: int
    filename: str
    created_at: str
    data_size: int = Field(description="bytes of oTree's data export stored beside the dump (a reset's and a "
                           "delete's backup); 0 when there is none")
    data_url: str | None = Field(description="where to download that data export (a zip of oTree's CSVs) with "
                                 "this API; null when there is none")
    data_problem: str = Field(description="why the data export could not be stored beside this backup; \"\" "
                              "when it was, or when none was attempted")


FORCE = Query(False, description="true: do it even while an oTree session is live (without it, a live session "
              "makes this 409 naming the session and its active participants)")
LIVE_409 = ("409 while an oTree session of the instance is live (participants active in the last "
            "LAB_SESSION_LIVE_MINUTES): the detail names the session(s) and how many participants are active; the same "
            "call with `?force=true` does it anyway.")


class SessionOut(Schema):
    code: str
    config: str = Field(description="the session config's name")
    participants: int
    started: int = Field(description="participants who opened their link")
    finished: int | None = Field(description="participants past the last page; null when not known yet")
    last_activity: str | None = Field(description="ISO time of the last page started or completed, or null")
    live: bool


def _rooms(instance: Instance, live) -> list[dict]:
    if live is None:
        return []
    lobby = f"{settings.LAB_PUBLIC_URL}/lobby/{instance.name}/"
    return [{"name": r.get("name"), "display_name": r.get("display_name", ""),
             "participant_labels": r.get("participant_labels") or [], "lobby_url": lobby} for r in live.rooms or []]


def serialize(instance: Instance) -> dict:
    live = instance.live_release
    effective = schedule.schedule_of(instance)
    return {
        "name": instance.name, "owner": instance.owner.username, "status": instance.status,
        "status_reason": instance.status_reason, "url": instance.url,
        "git": {"ssh_url": instance.ssh_url, "https_url": instance.https_url},
        "otree": {"admin_username": instance.admin_username, "auth_level": instance.auth_level,
                  "production": instance.production},
        "release": {"commit": live.commit, "status": live.status, "number": live.number} if live else None,
        "rooms": _rooms(instance, live), "env": instance.config_vars, "memory_mb": instance.memory_mb,
        "cpus": float(instance.cpus), "runtime": instance.runtime, "node": instance.node or None,
        **{field: getattr(instance, field) for field in schedule.FIELDS},
        "backup_schedule": {"interval_seconds": effective.interval, "keep_daily": effective.keep_daily,
                            "keep_weekly": effective.keep_weekly},
        "sleep_after_minutes": instance.sleep_after_minutes, "sleep_after": sleep.sleep_after(instance),
        "slept_at": instance.slept_at.isoformat() if instance.slept_at else None, "sleep_reason": instance.sleep_reason,
        "woke_at": instance.woke_at.isoformat() if instance.woke_at else None, "wake_reason": instance.wake_reason,
    }


@router.get("", summary="Instances you may see", response=responses({200: list[InstanceOut]}))
def list_instances(request: HttpRequest):
    """Lab managers see every instance; experimenters their own."""
    instances = with_live_release(visible_instances(request.auth).order_by("name"))
    return [serialize(i) for i in instances]  # live_release: prefetched, not a query per row


@router.post("", summary="Create an instance", response=responses({201: InstanceOut}, 400, 403, 409, 422),
             auth=managers_only("create instances"))
def create_instance(request: HttpRequest, payload: InstanceIn, response: HttpResponse):
    """Create an instance for an experimenter; its database and Redis start in the background
    (status `provisioning`, then `ready_for_code`). A taken name is 409."""
    instance = services.create_instance(request.auth, name=payload.name, owner=payload.owner, request=request)
    response["Location"] = f"/api/v1/instances/{instance.name}"
    return Status(201, serialize(instance))


@router.get("/{name}", summary="One instance", response=responses({200: InstanceOut}, 404))
def get_instance(request: HttpRequest, name: str):
    return serialize(get_visible_instance(request.auth, name))


@router.patch("/{name}", summary="Change settings",
              response=responses({200: InstanceOut}, 400, 403, 404, 409, 422, 429))
def update_instance(request: HttpRequest, name: str, payload: InstancePatch, force: bool = FORCE):
    """Change `auth_level`, `production`, `env` (owner, lab managers) and `memory_mb`, `cpus`
    (lab managers). The app restarts with the new settings (applied as a deploy is: if it does
    not come up with them, the previous ones come back); the database is untouched. A change
    that restarts the app counts against the restart budget (429 over it). The backup
    schedule (`backup_interval_minutes`, `backup_keep_daily`, `backup_keep_weekly`; null =
    the lab's default) is lab managers' too, and restarts nothing; so is `sleep_after_minutes`
    (minutes without a request after which the instance sleeps; 0 = never; null = the lab's
    LAB_SLEEP_AFTER_MINUTES). 409 while an oTree session
    is live (participants active in the last LAB_SESSION_LIVE_MINUTES) and the change restarts
    the app: the detail names the session(s) and how many participants are active; the same
    call with `?force=true` does it anyway."""
    instance = get_visible_instance(request.auth, name)
    values = payload.dict(exclude_unset=True)
    own_schedule = schedule.clean(request.auth, **{k: values.pop(k) for k in schedule.FIELDS if k in values})
    sleep_after = {"minutes": sleep.clean_sleep_after(request.auth, values.pop("sleep_after_minutes"))} \
        if "sleep_after_minutes" in values else None
    if values or not (own_schedule or sleep_after):
        services.update_settings(request.auth, instance, request=request, force=force, **values)
    schedule.update(request.auth, instance, request=request, **own_schedule)  # checked above: cannot fail now
    if sleep_after is not None:
        sleep.set_sleep_after(request.auth, instance, request=request, **sleep_after)
    return serialize(instance)


@router.post("/{name}/restart", summary="Restart", response=responses({202: JobOut}, 404, 409, 422, 429),
             description=LIVE_409)
def restart_instance(request: HttpRequest, name: str, force: bool = FORCE):
    instance = get_visible_instance(request.auth, name)
    job = services.restart(request.auth, instance, request=request, force=force)
    return Status(202, {"job": str(job.id), "detail": f"restarting {name}"})


@router.post("/{name}/reset-database", summary="Back up, then reset the database",
             response=responses({202: JobOut}, 403, 404, 409, 422, 429))
def reset_database(request: HttpRequest, name: str, force: bool = FORCE):
    """A backup (`pg_dump -Fc`) is written first; if it fails, nothing is reset. The backup
    is listed by `GET /api/v1/instances/{name}/backups` when the job ends. 409 while an oTree session is live
    (participants active in the last LAB_SESSION_LIVE_MINUTES): the detail names the session(s) and how
    many participants are active; the same call with `?force=true` does it anyway."""
    instance = get_visible_instance(request.auth, name)
    job = services.reset_database(request.auth, instance, request=request, force=force)
    return Status(202, {"job": str(job.id), "detail": f"backing up and resetting the database of {name}"})


@router.post("/{name}/move", summary="Move to another swarm node (lab managers)",
             response=responses({202: JobOut}, 403, 404, 409, 422))
def move_instance(request: HttpRequest, name: str, payload: MoveIn):
    """A background job moves the instance (runtime `swarm`; others are 409) to the node:
    its app stops, its database is backed up (the backup stays among its backups, kind
    `move`), restored on the node and the app starts there; then the old node's copy goes.
    The instance is down meanwhile (typically 10-30 s; longer for a large database).
    Nothing in the database is lost; what oTree keeps in Redis (live page state) is not
    moved. Should the move fail, the instance runs on its old node again and the job says
    why. Lab managers only (403 for its owner)."""
    instance = get_visible_instance(request.auth, name)
    job = services.move_instance(request.auth, instance, payload.node, request=request)
    return Status(202, {"job": str(job.id), "detail": f"{job.label}: it is down until its app runs there"})


@router.post("/{name}/admin-password", summary="Set or generate the oTree admin password",
             response=responses({200: PasswordOut}, 404, 409, 422, 429))
def admin_password(request: HttpRequest, name: str, payload: PasswordIn | None = None, force: bool = FORCE):
    """The app restarts with it once a release runs: that counts against the restart budget
    (429 over it). 409 while an oTree session is live
    (participants active in the last LAB_SESSION_LIVE_MINUTES): the detail names the session(s) and how
    many participants are active; the same call with `?force=true` does it anyway."""
    instance = get_visible_instance(request.auth, name)
    password = services.set_admin_password(request.auth, instance, payload.password if payload else None,
                                           request=request, force=force)
    return {"admin_username": instance.admin_username, "password": password}


@router.get("/{name}/backups", summary="Backups of the database", response=responses({200: list[BackupOut]}, 404))
def list_backups(request: HttpRequest, name: str):
    """A reset's and a delete's backup carry oTree's data export beside the dump
    (`data_size`, `data_url`), or say why it could not be stored (`data_problem`)."""
    instance = get_visible_instance(request.auth, name)
    return [_backup_out(b) for b in instance.backups.all()]


def _backup_out(b) -> dict:
    base = f"{settings.LAB_PUBLIC_URL}/api/v1/instances/{b.instance_name}/backups"
    return {"id": b.id, "kind": b.kind, "status": b.status, "size": b.size, "filename": b.filename,
            "created_at": b.created_at.isoformat(), "data_size": b.data_size if b.data_filename else 0,
            "data_url": f"{base}/{b.id}/data.zip" if b.data_filename and b.status == Backup.Status.DONE else None,
            "data_problem": b.data_problem}


@router.get("/{name}/backups/{backup_id}/data.zip", summary="The data export stored beside a backup",
            response=responses({200: str}, 404, 422))
def backup_data(request: HttpRequest, name: str, backup_id: int = Path(..., ge=1, le=MAX_ID)):
    """The zip of oTree's CSVs stored beside a reset's or a delete's backup (see `GET
    .../data.zip` for its contents); 404 when the backup has none."""
    instance = get_visible_instance(request.auth, name)
    backup = instance.backups.filter(pk=backup_id, status=Backup.Status.DONE).first()
    path = backup.data_path if backup is not None else None
    if path is None or not path.exists():
        raise HttpError(404, f"{name} has no backup #{backup_id} with a data export.")
    record(request.auth, "instance.backup_download", instance, f"downloaded the data export {backup.data_filename}",
           request)
    return send_data_zip(path.open("rb"), backup.data_filename)


@router.get("/{name}/data.zip", summary="Download the experiment's data (oTree's exports, one zip)",
            response=responses({200: str}, 404, 409, 429))
def instance_data(request: HttpRequest, name: str):
    """oTree's own exports, made now through the instance's app: `all_apps_wide.csv`, one
    `<app>.csv` per app, `<app>_custom.csv` where the app has a `custom_export`,
    `PageTimes.csv`, `ChatMessages.csv` and `manifest.json` (instance, live release,
    time, oTree version, files, notes). 409 with the reason when the app is not running or
    does not answer, or the data exceed LAB_EXPORT_MAX_MB; 429 over the download budget
    (LAB_THROTTLE_EXPORT; every attempt counts)."""
    instance = get_visible_instance(request.auth, name)
    try:
        if instance.asleep:  # its app (and database) must answer the export
            sleep.wake_quietly(name, f"{request.auth.username} downloaded its data", actor=request.auth,
                               request=request)
        handle, filename = export.download(request.auth, instance, request=request)
    except export.ExportFailed as exc:
        raise HttpError(409, f"Could not export the data of {name}: {exc}") from None
    return send_data_zip(handle, filename)


class RestoreIn(InputSchema):
    backup: Whole = Field(description="the id of the backup (GET /api/v1/instances/{name}/backups lists an instance's; "
                        "a backup the caller may not see, or none, is 404)", ge=1, le=MAX_ID)


@router.post("/{name}/restore", summary="Restore a backup into the instance",
             response=responses({202: JobOut}, 403, 404, 409, 422, 429))
def restore_backup(request: HttpRequest, name: str, payload: RestoreIn, force: bool = Query(
        False, description="go ahead even while an oTree session is live (409 otherwise)")):
    """A background job restores the backup: its content is checked first (in the instance's
    own sandbox), then a fresh backup of the data there now is taken (kind `before_restore`;
    no backup, no restore), then the database is replaced and the app restarts. The data
    written since the chosen backup are replaced (they stay in that fresh backup). A failure
    leaves the instance as it was; the job says why. A backup of the wrong kind for the
    instance (an SQLite file for PostgreSQL or the other way round, a git history, a failed
    backup, a missing file) is 422 with the reason. While an oTree session is live: 409 (see
    `force`). Counts against the reset budget (429). The owner's backups (a deleted instance's included) and, for lab managers, any backup."""
    instance = get_visible_instance(request.auth, name)
    backup = get_visible_backup(request.auth, payload.backup)
    job = services.restore_backup(request.auth, instance, backup, request=request, force=force)
    return Status(202, {"job": str(job.id), "detail": f"restoring {backup.filename} into {name}: a fresh backup "
                        "first, then the app restarts"})


@router.post("/{name}/backups", summary="Upload a backup file", response=responses({201: BackupOut}, 404, 413, 422, 429))
def upload_backup(request: HttpRequest, name: str, file: UploadedFile = File(None, description=(
        "a `pg_dump -Fc` archive (PostgreSQL instances) or an SQLite database file (SQLite instances)"))):
    """Multipart, field `file`: a backup made elsewhere, kept among the instance's backups
    (kind `upload`) to be restored with `POST /api/v1/instances/{name}/restore`. At most
    LAB_BACKUP_UPLOAD_MAX_MB (413 over it, nothing kept); a file that is not a backup for
    this instance's database is 422. Counts against the backup budget (429)."""
    instance = get_visible_instance(request.auth, name)
    refused = getattr(request, "upload_refused", "")
    if refused:
        raise HttpError(413, refused)
    row = services.upload_backup(request.auth, instance, file, request=request)
    return Status(201, _backup_out(row))



class ReleaseOut(Schema):
    id: int = Field(description="the release number within the instance")
    commit: str
    branch: str
    author: str
    message: str
    pushed_by: str | None
    status: str = Field(description="queued, building, starting, live, failed, superseded, rolled_back, ready "
                        "(built and health-checked; waits for a live oTree session to end)",
                        **rules(enum=Release.Status.values))
    status_reason: str
    created_at: str
    duration_seconds: float | None
    rollback_of: int | None


class ReleaseDetailOut(ReleaseOut):
    log: str
    session_configs: list[dict]
    rooms: list[dict]


def _release(r, with_log=False) -> dict:
    data = {"id": r.number, "commit": r.commit, "branch": r.branch, "author": r.author, "message": r.message,
            "pushed_by": r.pushed_by.username if r.pushed_by else None, "status": r.status,
            "status_reason": r.status_reason, "created_at": r.created_at.isoformat(),
            "duration_seconds": r.duration.total_seconds() if r.duration else None,
            "rollback_of": r.rollback_of.number if r.rollback_of else None}
    if with_log:
        data.update(log=r.log, session_configs=r.session_configs, rooms=r.rooms)
    return data


@router.get("/{name}/releases", summary="Deploy history", response=responses({200: list[ReleaseOut]}, 404))
def list_releases(request: HttpRequest, name: str):
    instance = get_visible_instance(request.auth, name)
    return [_release(r) for r in instance.releases.select_related("pushed_by", "rollback_of")]


@router.post("/{name}/releases/{number}/switch", summary="Switch now to a release that is ready to switch",
             response=responses({202: JobOut}, 403, 404, 409))
def switch_release(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    """A push during a live oTree session waits as `ready` (built and health-checked); this
    switches to it at once, live session or not (the app restarts with it). 409 when the
    release is not ready to switch."""
    instance = get_visible_instance(request.auth, name)
    release = instance.releases.filter(number=number).first()
    if release is None:
        raise HttpError(404, f"{name} has no release #{number}.")
    job = releases.switch_now(request.auth, release)
    return Status(202, {"job": str(job.id), "detail": f"switching {name} to #{number}"})


@router.get("/{name}/sessions", summary="The oTree sessions, and whether one is live",
            response=responses({200: list[SessionOut]}, 404))
def list_sessions(request: HttpRequest, name: str, response: HttpResponse):
    """Read through the app's REST API (at most a few seconds old). A session is live while a
    participant who has not finished started or completed a page in the last
    LAB_SESSION_LIVE_MINUTES. When the app does not answer, the last read is returned with
    the header `X-Sessions-Stale` saying why (and `live` false everywhere: the manager knows of
    no live session then); `X-Sessions-Checked-At` is the time of the read."""
    instance = get_visible_instance(request.auth, name)
    sessions.fresh(instance)
    if instance.sessions_problem:
        response["X-Sessions-Stale"] = instance.sessions_problem.encode("ascii", "replace").decode()
    if instance.sessions_checked_at:
        response["X-Sessions-Checked-At"] = instance.sessions_checked_at.isoformat()
    stale = bool(instance.sessions_problem)
    return [{**sessions.public(s), "live": bool(s.get("live")) and not stale}
            for s in instance.otree_sessions or [] if isinstance(s, dict)]


@router.get("/{name}/releases/{number}", summary="One release with its build log",
            response=responses({200: ReleaseDetailOut}, 404))
def get_release(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    instance = get_visible_instance(request.auth, name)
    release = instance.releases.select_related("pushed_by", "rollback_of").filter(number=number).first()
    if release is None:
        raise HttpError(404, f"{name} has no release #{number}.")
    return _release(release, with_log=True)


@router.delete("/{name}", summary="Delete (a final backup is kept)",
               response=responses({202: JobOut}, 403, 404, 409, 422), description=LIVE_409)
def delete_instance(request: HttpRequest, name: str, force: bool = FORCE):
    instance = get_visible_instance(request.auth, name)
    if not request.auth.is_superuser:
        raise HttpError(403, "Only lab managers may delete instances.")
    job = services.delete_instance(request.auth, instance, request=request, force=force)
    return Status(202, {"job": str(job.id), "detail": f"deleting {name}; a final backup is kept"})

