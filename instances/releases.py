"""Releases: a push (or a rollback) recorded first, then built, started beside the running
app, health-checked and switched to — or failed with the reason while the previous
release keeps serving.

- `record_push()` (called by git intake) writes the queued Release in a transaction,
  supersedes older queued ones and enqueues `instances.build_release` after commit.
- `deploy(release_id)` (the worker) builds under the per-instance build lock (builds of one
  instance never overlap; different instances build in parallel), switches under the
  instance lock (never at the same time as a reconcile).
- `rollback()` redeploys a previous live release's image as a new release.
- `sweep()` fails releases whose worker died.

While an oTree session of the instance is live (instances.sessions), a deploy builds and
health-checks the release but does not switch to it: the release becomes READY ("ready to
switch"), its candidate app is stopped and the previous release keeps serving.
`switch_ready()` (the minute sweep) switches it once no session is live; `switch_now()`
(the owner, lab managers) switches it at once. Either re-enqueues the deploy, which finds
the release's image built and only starts, health-checks and switches. A newer push (or a
rollback) supersedes a READY release.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Concat
from django.utils import timezone

from instances import build, proxy, reconciler, sessions, sleep, state
from instances.git.repos import repo_path
from instances.models import Instance, Release
from instances.selectors import next_number
from instances.spec import app_of, app_spec, instance_spec
from instances.runtime import get_runtime
from instances.runtime.base import RuntimeError_
from manager import locks
from manager.texts import storable
from manager.accounts.services import Conflict, NotAllowed
from manager.audit.services import record
from manager.jobs import services as jobs

log = logging.getLogger(__name__)

HANDOVER_WAIT = 15  # seconds a build waits for its instance's lock before leaving the handover to its holder
ACTIVE = (Release.Status.QUEUED, Release.Status.BUILDING, Release.Status.STARTING)
WAS_LIVE = (Release.Status.LIVE, Release.Status.SUPERSEDED, Release.Status.ROLLED_BACK)


def build_timeout() -> int:
    return settings.LAB_BUILD_TIMEOUT


def start_timeout() -> int:
    return settings.LAB_START_TIMEOUT


def keep_releases() -> int:
    return max(1, settings.LAB_KEEP_RELEASES)


# --- recording ---------------------------------------------------------------------------

def _enqueue(release: Release, user, label: str, *, force: bool = False):
    args = [release.pk, True] if force else [release.pk]
    return jobs.start(jobs.task("instances.build_release"), user=user, kind="instance.deploy", label=label, args=args,
                      link=f"/instances/{release.instance.name}/")


class WaitForIdle(Exception):
    """Raised before the switch while an oTree session is live: the release waits as READY."""

    def __init__(self, live: list[dict]):
        super().__init__(sessions.describe(live))
        self.live = live


SWITCH_NOW = "switching now (Switch now)"  # the reason of a release Switch now queued again


def _forced(release: Release) -> bool:
    """A queued release that Switch now queued switches even while a session is live,
    whoever enqueues it (the handover, the sweep)."""
    return release.status_reason == SWITCH_NOW


def release_url(release: Release) -> str:
    return f"{settings.LAB_PUBLIC_URL}/instances/{release.instance.name}/releases/{release.number}/"


def _next_number(instance: Instance) -> int:
    return next_number(instance, Release)


def record_push(instance: Instance, *, commit: str, branch: str = "main", pushed_by=None, author: str = "",
                message: str = "") -> Release:
    """Record a push to `branch` of `instance` (the commit is in its bare repository) as a
    queued release and enqueue its build. Older queued releases are superseded. Author and
    message default to the commit's own (read from the repository)."""
    if not author or not message:
        try:
            info = build.commit_info(repo_path(instance), commit)
            author, message = author or info["author"], message or info["message"]
        except (build.BuildFailed, OSError, subprocess.SubprocessError):
            pass  # the build reports a missing repository or commit
    with transaction.atomic():
        number = _next_number(instance)
        Release.objects.filter(instance=instance, status__in=(Release.Status.QUEUED, Release.Status.READY)).update(
            status=Release.Status.SUPERSEDED, status_reason=f"superseded by the newer push #{number}",
            finished_at=timezone.now())
        release = Release.objects.create(
            instance=instance, number=number, commit=commit, branch=branch, author=(author or "")[:200],
            message=(message or "").strip().splitlines()[0][:500] if (message or "").strip() else "",
            pushed_by=pushed_by if pushed_by is not None and getattr(pushed_by, "is_authenticated", False) else None,
        )
        _enqueue(release, release.pushed_by, f"Deploy {instance.name} #{number} ({commit[:8]})")
    return release


def rollback(actor, release: Release, *, force: bool = False) -> Release:
    """Redeploy `release`'s image (a previous release that was live, image still kept) as
    a new release with `rollback_of` set. It supersedes a release that is ready to switch.
    While an oTree session is live, SessionLive (409) unless `force` (the switch then does
    not wait either)."""
    instance = release.instance
    if actor is not None and not (actor.is_superuser or instance.owner_id == actor.pk):
        raise NotAllowed("Only the owner or a lab manager may roll back this instance.")
    if release.status == Release.Status.LIVE:
        raise Conflict({"release": [f"#{release.number} is already live."]})
    if release.status not in WAS_LIVE or not release.image:
        raise Conflict({"release": [f"#{release.number} never went live; only a release that was live can be "
                                    "rolled back to."]})
    if not get_runtime(instance).release_exists(release.image):
        raise Conflict({"release": [f"the image of #{release.number} is no longer kept (only the last "
                                    f"{keep_releases()} releases are)."]})
    if Release.objects.filter(instance=instance, status__in=ACTIVE).exists():
        raise Conflict({"release": ["a deploy is running; roll back when it has finished."]})
    forced = sessions.require_idle(instance, f"rolling back to #{release.number} (the app restarts)", force)
    with transaction.atomic():
        number = _next_number(instance)
        Release.objects.filter(instance=instance, status=Release.Status.READY).update(
            status=Release.Status.SUPERSEDED, status_reason=f"superseded by the rollback #{number}",
            finished_at=timezone.now())
        new = Release.objects.create(
            instance=instance, number=number, commit=release.commit, branch=release.branch, author=release.author,
            message=f"rollback to #{release.number}: {release.message}"[:500], rollback_of=release,
            pushed_by=actor if actor is not None and actor.is_authenticated else None, image=release.image,
            session_configs=release.session_configs, rooms=release.rooms, language_code=release.language_code,
        )
        record(actor, "instance.rollback", instance, f"rolled {instance.name} back to #{release.number}{forced}")
        _enqueue(new, new.pushed_by, f"Roll {instance.name} back to #{release.number}", force=force)
    return new


def switch_now(actor, release: Release) -> object:
    """Switch to a release that is ready to switch at once, live session or not (the owner,
    lab managers): its deploy is enqueued again (the image is built: start, health check,
    switch). Returns the job."""
    instance = release.instance
    if actor is not None and not (actor.is_superuser or instance.owner_id == actor.pk):
        raise NotAllowed("Only the owner or a lab manager may switch this instance's release.")
    with transaction.atomic():
        claimed = Release.objects.filter(pk=release.pk, status=Release.Status.READY).update(
            status=Release.Status.QUEUED, status_reason=SWITCH_NOW)
        if not claimed:
            release.refresh_from_db()
            raise Conflict({"release": [f"#{release.number} is {release.get_status_display()}, not ready to switch: "
                                        "only a release that waits for a live session to end can be switched."]})
        live = instance.live_sessions
        note = f" (while {sessions.describe(live)})" if live else ""
        record(actor, "instance.switch_release", instance, f"switched {instance.name} to #{release.number} now{note}")
        return _enqueue(release, actor, f"Switch {instance.name} to #{release.number} now", force=True)


def switch_ready() -> int:
    """The minute sweep: a release ready to switch whose instance has no live session any
    more (its sessions were read this minute; an app that does not answer has none the
    manager knows of) is switched to. Returns how many were enqueued."""
    switched = 0
    for release in (Release.objects.filter(status=Release.Status.READY, instance__delete_requested=False)
                    .select_related("instance", "pushed_by").order_by("-number")):
        instance = release.instance
        try:
            sessions.fresh(instance)
        except Exception:  # noqa: BLE001 - read again next minute
            log.warning("reading the sessions of %s", instance.name, exc_info=True)
            continue
        if instance.live_sessions:
            continue
        with transaction.atomic():
            if Release.objects.filter(pk=release.pk, status=Release.Status.READY).update(
                    status=Release.Status.QUEUED, status_reason="switching: no session is live any more"):
                _enqueue(release, release.pushed_by,
                         f"Switch {instance.name} to #{release.number} (the session is idle)")
                switched += 1
    return switched


# --- the build log --------------------------------------------------------------------------

class LogWriter:
    """Appends to Release.log in chunks, at most every `interval` seconds (and at close),
    so the pusher sees the build live without a write per line."""

    def __init__(self, release_id: int, interval: float = 0.3, limit: int = 2_000_000):
        self.release_id = release_id
        self.interval = interval
        self.limit = limit
        self.buffer: list[str] = []
        self.written = 0
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self.lock:
            self.buffer.append(text)
        if time.monotonic() - self.last >= self.interval:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            chunk, self.buffer = "".join(self.buffer), []
            self.last = time.monotonic()
        if not chunk or self.written >= self.limit:
            return
        chunk = storable(chunk[: self.limit - self.written])  # (pip's or the app's output may hold a NUL)
        self.written += len(chunk)
        Release.objects.filter(pk=self.release_id).update(log=Concat(F("log"), Value(chunk)))


# --- the worker ----------------------------------------------------------------------------

def _fail(release: Release, reason: str, out: LogWriter | None = None) -> None:
    if out is not None:
        # The words git_hook's follow() ends with: a pusher reads the reason once.
        out(f"\nDeploy failed: {reason}\n")
        out.flush()
    Release.objects.filter(pk=release.pk, status__in=ACTIVE).update(
        status=Release.Status.FAILED, status_reason=storable(reason[:500]), finished_at=timezone.now())
    release.refresh_from_db()


def deploy(release_id: int, force: bool = False) -> Release:
    """Build (unless it is a rollback), start, health-check and switch to the release.

    Builds of one instance never overlap (its build lock). A release whose build lock is
    taken stays queued and this worker is free at once (another instance's build can use
    it): the running deploy, when done, enqueues the newest queued release of its
    instance; the sweep re-enqueues a queued release whose lock holder died.

    While an oTree session is live at the moment of the switch (unless `force`), the
    release becomes READY instead: built and health-checked, not switched to."""
    release = Release.objects.select_related("instance").filter(pk=release_id).first()
    if release is None or release.status != Release.Status.QUEUED:
        return release
    instance = release.instance
    try:
        with locks.lock(f"build:{instance.pk}", wait=HANDOVER_WAIT):
            # Claimed only now: while it waited, a newer push may have superseded it.
            claimed = Release.objects.filter(pk=release.pk, status=Release.Status.QUEUED).update(
                status=Release.Status.BUILDING, started_at=timezone.now())
            release.refresh_from_db()
            if not claimed:
                return release
            out = LogWriter(release.pk)
            try:
                _deploy(release, instance, out, force=force)
            except WaitForIdle as exc:
                _ready(release, instance, exc.live, out)
            except (build.BuildFailed, RuntimeError_, locks.Busy) as exc:
                reason = str(exc) if not isinstance(exc, locks.Busy) else "the instance stayed busy; push again"
                _fail(release, reason, out)
                _after_failure(instance, release)
            except BaseException as exc:  # time limit, worker shutdown: never leave it building
                _fail(release, f"stopped: {type(exc).__name__}", out)
                _after_failure(instance, release)
                raise
            # Still under the lock: a push recorded before this point is seen here; one
            # recorded later finds the lock free (or waits HANDOVER_WAIT for it).
            waiting = Release.objects.filter(instance=instance, status=Release.Status.QUEUED).order_by("-number").first()
    except locks.Busy:
        return release  # still queued: the running deploy hands it on
    if waiting is not None:
        _enqueue(waiting, waiting.pushed_by, f"Deploy {instance.name} #{waiting.number} ({waiting.commit[:8]})",
                 force=_forced(waiting))
    release.refresh_from_db()
    return release


def _deploy(release: Release, instance: Instance, out: LogWriter, *, force: bool = False) -> None:
    runtime = get_runtime(instance)
    if Instance.objects.filter(pk=instance.pk, asleep=True).exists():  # (we hold the build lock: it stays awake)
        out("The instance was asleep: waking it (its database) for the deploy\n")
        try:
            sleep.wake(instance.name, "a deploy")
        except reconciler.ReconcileError as exc:  # e.g. the old app did not come up: the new one may
            out(f"It woke with a problem: {exc}\n")
        instance.refresh_from_db()
    state.set_status(instance, Instance.Status.DEPLOYING, f"deploying #{release.number} ({release.commit[:8]})")
    if release.rollback_of_id:
        out(f"Rollback to #{release.rollback_of.number}: reusing its image {release.image}\n")
        if not runtime.release_exists(release.image):
            raise build.BuildFailed(f"the image {release.image} is no longer kept")
        _start_and_switch(release, instance, runtime, out, introspection=None, force=force)
        return
    if release.image:  # built before, it waited as ready to switch: start, check and switch only
        out(f"\nSwitching to #{release.number}: its image {release.image} is built\n")
        if not runtime.release_exists(release.image):
            raise build.BuildFailed(f"the image {release.image} is no longer kept; push again")
        _start_and_switch(release, instance, runtime, out, introspection=None, force=force)
        return
    repo = repo_path(instance)
    out(f"Building {instance.name} #{release.number} from {release.commit[:12]} ({release.branch})\n")
    with build.new_context() as tmp:
        ctx = Path(tmp)
        if not repo.exists():
            raise build.BuildFailed(f"the repository of {instance.name} does not exist")
        build.export_tree(repo, release.commit, ctx)
        for note in build.check_project(ctx):
            out(note + "\n")
        tag = runtime.build_release(instance.name, release.number, ctx, out=out, timeout=build_timeout(),
                                    memory_mb=instance.memory_mb, cpus=float(instance.cpus))
    Release.objects.filter(pk=release.pk).update(image=tag)
    release.refresh_from_db()
    out("Reading session configs and rooms from settings.py\n")
    # Read beside the app's start (its own runtime object): neither waits for the other.
    with ThreadPoolExecutor(1, thread_name_prefix="introspect") as pool:
        found = pool.submit(get_runtime(instance).introspect, instance.name, tag)
        _start_and_switch(release, instance, runtime, out, introspection=found, force=force)


def _record_introspection(release: Release, found: dict, out: LogWriter) -> None:
    Release.objects.filter(pk=release.pk).update(session_configs=found["session_configs"], rooms=found["rooms"],
                                                 language_code=found.get("language_code", ""))
    for warning in found.get("warnings", []):  # what settings.py claimed that the manager did not take
        out(f"warning: {warning}\n")
    for room in found["rooms"]:
        if room.get("problem"):
            out(f"warning: room {room['name']}: {room['problem']}\n")
    out(f"Session configs: {', '.join(c['name'] for c in found['session_configs']) or '(none)'}; "
        f"rooms: {', '.join(r['name'] for r in found['rooms']) or '(none)'}\n")


def _start_and_switch(release: Release, instance: Instance, runtime, out: LogWriter, *,
                      introspection: Future | None, force: bool = False) -> None:
    """Start the release's app beside the live one, health-check it, and switch to it once
    the introspection (a future, None for a rollback) has been recorded; an introspection
    failure fails the release even when the app answered. While an oTree session is live
    (read now; unless `force`), WaitForIdle instead of the switch: the candidate is stopped."""
    Release.objects.filter(pk=release.pk).update(status=Release.Status.STARTING)
    out(f"Starting the app (health check for up to {start_timeout()} s)\n")
    out.flush()
    release.refresh_from_db()

    def introspected():
        if introspection is not None:
            _record_introspection(release, introspection.result(), out)
        if not force and Release.objects.filter(instance=instance, status=Release.Status.LIVE).exists():
            live = sessions.idle_now(instance)  # the old app's sessions, read now
            if live:
                raise WaitForIdle(live)

    with locks.lock(f"instance:{instance.pk}", wait=120):
        instance.refresh_from_db()
        spec = instance_spec(instance, app_spec(instance, app_of(release)))
        started_with = instance.app_settings()  # the settings a later change falls back to
        try:
            url = runtime.deploy_app(spec, timeout=start_timeout(), out=out, before_switch=introspected)
        except RuntimeError_:
            # A project whose settings cannot be imported also crashes on start: its reason is the clearer one.
            if introspection is not None and isinstance(introspection.exception(), build.BuildFailed):
                raise introspection.exception() from None
            raise
        try:  # the proxy first: once the release is live (the pusher reads "Deployed"), it is served
            proxy.sync_routes(instance.name)  # only this instance's app changed
        except Exception:  # noqa: BLE001 - the proxy heals at its next sync; the app is live
            log.exception("sync_routes after deploying %s #%s", instance.name, release.number)
        with transaction.atomic():
            previous = Release.objects.filter(instance=instance, status=Release.Status.LIVE).exclude(pk=release.pk)
            previous.update(status=Release.Status.ROLLED_BACK if release.rollback_of_id else Release.Status.SUPERSEDED,
                            status_reason=f"replaced by #{release.number}")
            Release.objects.filter(pk=release.pk).update(status=Release.Status.LIVE, finished_at=timezone.now(),
                                                         status_reason="")
            Instance.objects.filter(pk=instance.pk).update(runtime=runtime.name, applied_settings=started_with)
        out(f"Live: #{release.number} answers at {instance.url or url}\n")
        out.flush()
        state.set_status(instance, Instance.Status.RUNNING, "")
        runtime.retire_app(instance.name)  # the old app stops once the new one serves
    release.refresh_from_db()
    _prune(instance, runtime)


def _ready(release: Release, instance: Instance, live: list[dict], out: LogWriter) -> None:
    """The release is built and answered its health check, but a session is live: it waits."""
    reason = (f"ready to switch: {sessions.describe(live)}; it switches when the session is idle, or click "
              f"Switch now on {release_url(release)}")
    out(f"\n{reason[:1].upper()}{reason[1:]}\n")
    out.flush()
    Release.objects.filter(pk=release.pk, status__in=ACTIVE).update(
        status=Release.Status.READY, status_reason=storable(reason[:500]))
    release.refresh_from_db()
    instance.refresh_from_db()
    if instance.status == Instance.Status.DEPLOYING:
        state.set_status(instance, Instance.Status.RUNNING,
                         f"release #{release.number} is ready to switch: {sessions.describe(live)}"[:500])


def _after_failure(instance: Instance, release: Release) -> None:
    """The previous release keeps serving: the instance's status is what runs."""
    try:
        reconciler.reconcile(instance.pk)
    except Exception:  # noqa: BLE001 - the sweep reconciles again
        log.warning("reconcile after the failed release %s", release, exc_info=True)
    instance.refresh_from_db()
    if instance.status != Instance.Status.DELETING:
        reason = f"release #{release.number} failed: {release.status_reason}"
        live = Release.objects.filter(instance=instance, status=Release.Status.LIVE).first()
        if live is not None:
            reason += f" (#{live.number} keeps serving)"
        state.set_status(instance, instance.status, reason)


def _prune(instance: Instance, runtime) -> None:
    keep = [str(n) for n in Release.objects.filter(instance=instance, status__in=WAS_LIVE, rollback_of=None)
            .exclude(image="").order_by("-number").values_list("number", flat=True)[: keep_releases()]]
    # A release ready to switch (or switching) keeps its image.
    keep += [str(n) for n in Release.objects.filter(instance=instance, rollback_of=None)
             .exclude(status__in=(*WAS_LIVE, Release.Status.FAILED)).exclude(image="").values_list("number", flat=True)]
    # Rollbacks reuse an older release's image: that one stays while its rollback is live.
    live = Release.objects.filter(instance=instance, status=Release.Status.LIVE).select_related("rollback_of").first()
    if live is not None:
        keep.append(str(live.rollback_of.number if live.rollback_of_id else live.number))
    try:
        runtime.prune_releases(instance.name, set(keep))
    except RuntimeError_:
        log.warning("pruning images of %s", instance.name, exc_info=True)


# --- the sweep -----------------------------------------------------------------------------

def sweep(now=None) -> int:
    """Fail releases whose worker died: building or starting while nobody holds their
    instance's build lock (it outlives a killed holder by LAB_LOCK_TTL), or active longer
    than the build timeout plus the start timeout; re-enqueue a queued release that waited
    a few minutes while nobody holds the lock (the holder died before handing it on).
    Returns how many were failed."""
    now = now or timezone.now()
    limit = timedelta(seconds=build_timeout() + start_timeout() + 60)
    grace = timedelta(seconds=settings.LAB_LOCK_TTL)  # the lock is taken before the claim
    failed = 0
    for release in Release.objects.filter(status__in=ACTIVE).select_related("instance"):
        since = release.started_at or release.created_at
        held = locks.held(f"build:{release.instance_id}")
        if since + limit < now or (release.status != Release.Status.QUEUED and since + grace < now and not held):
            _fail(release, "the deploy stopped without finishing (its worker died); push again")
            failed += 1
        elif (release.status == Release.Status.QUEUED and release.created_at + timedelta(minutes=3) < now
              and not held):
            with transaction.atomic():
                _enqueue(release, release.pushed_by,
                         f"Deploy {release.instance.name} #{release.number} ({release.commit[:8]})",
                         force=_forced(release))
    return failed
