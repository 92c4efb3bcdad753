"""Sleeping instances: an idle instance's app is stopped and wakes on the next request.

Desired state: `Instance.asleep`. `put_to_sleep()` sets it (the reconciler then stops the
app, and with LAB_SLEEP_DATABASES its PostgreSQL and Redis, and writes status `sleeping`);
`wake()` clears it, reconciles at once (everything started, the app answering HTTP) and
points the proxy at the app again. Both record when and why (`slept_at`/`sleep_reason`,
`woke_at`/`wake_reason`), which the instance page shows.

When it sleeps (`sweep()`, every minute; level-triggered: each pass decides afresh): the
instance is running, its `sleep_after()` is not 0, the proxy saw no request for that many
minutes (counted from the last request, its last wake, or the time its live release went
live, whichever is latest: a fresh deploy is not put to sleep at once), and nothing is
going on (`why_awake()`): no live oTree session (as read in the last SESSIONS_FRESH
minutes; an app that does not answer has none), no deploy (a release queued, building,
starting or ready to switch; the build lock), no backup being written, no job of the
instance queued or running (backup, reset, restore, restart, move), no bot run playing,
and nobody holds the instance's lock (taken without waiting).

Who wakes an instance: the proxy (a request to its URL: HTTP or websocket, a participant,
the experimenter, the lobby's room links), the lobby and bot runs before they talk to the
app, a deploy, a restart, a backup, reset, restore or move of its data, the experimenter's
*Wake now*. Whatever wakes it marks itself first (a job row running, the build lock, a
bot run), then calls `wake()`; `put_to_sleep()` sets `asleep` first and checks again
afterwards, so one of the two always sees the other.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from instances.models import Backup, Instance, Release
from manager import locks
from manager.audit.services import record

log = logging.getLogger(__name__)

SESSIONS_FRESH = 5  # minutes: an older read of the oTree sessions keeps the instance awake
# Releases that mean a deploy is under way (READY: built, waiting for a live session to end).
DEPLOYING = (Release.Status.QUEUED, Release.Status.BUILDING, Release.Status.STARTING, Release.Status.READY)


def sleep_after(instance: Instance) -> int:
    """Minutes without a request after which `instance` sleeps (0 = never)."""
    if instance.sleep_after_minutes is not None:
        return instance.sleep_after_minutes
    return settings.LAB_SLEEP_AFTER_MINUTES


def idle_since(instance: Instance) -> datetime:
    """Since when the instance had no request: the latest of the proxy's last request, its
    last wake and the moment its live release went live (the instance's creation at worst)."""
    live = (Release.objects.filter(instance=instance, status=Release.Status.LIVE)
            .aggregate(at=Max("finished_at"))["at"])
    times = [t for t in (instance.last_request_at, instance.woke_at, live, instance.created_at) if t is not None]
    return max(times)


def _job_link(instance: Instance) -> str:
    return f"/instances/{instance.name}/"  # what the instance's jobs link to (services, schedule)


def busy_reason(instance: Instance) -> str:
    """What keeps the instance awake whatever its idleness ('' when nothing does): work on
    it that wakes it, or would, were it asleep."""
    from manager.jobs.models import Job

    if Release.objects.filter(instance=instance, status__in=DEPLOYING).exists() or locks.held(f"build:{instance.pk}"):
        return "a deploy is under way"
    if Backup.objects.filter(instance=instance, status=Backup.Status.PENDING).exists():
        return "a backup is being written"
    job = (Job.objects.filter(link=_job_link(instance), status__in=[Job.Status.QUEUED, Job.Status.RUNNING])
           .order_by("created_at").first())
    if job is not None:
        return f"{job.label} is {job.status}"
    runs = instance.bot_runs.model  # (no import of bots: instances sits below it)
    if instance.bot_runs.filter(status__in=runs.ACTIVE).exists():
        return "a bot run is playing"
    return ""


def why_awake(instance: Instance, now: datetime | None = None) -> str:
    """Why the instance does not fall asleep now ('' when it may)."""
    now = now or timezone.now()
    if instance.asleep:
        return "it is asleep"
    if instance.status != Instance.Status.RUNNING or instance.delete_requested or not instance.desired_running:
        return f"it is {instance.get_status_display()}"
    minutes = sleep_after(instance)
    if minutes <= 0:
        return "sleep is off for it"
    since = idle_since(instance)
    if since > now - timedelta(minutes=minutes):
        return f"it had a request or started less than {minutes} minutes ago"
    checked = instance.sessions_checked_at
    if checked is None or checked < now - timedelta(minutes=SESSIONS_FRESH):
        return f"its oTree sessions were not read in the last {SESSIONS_FRESH} minutes"
    if instance.live_sessions:  # (none while the app does not answer: sessions_problem)
        return "an oTree session is live"
    return busy_reason(instance)


def sweep(now: datetime | None = None) -> dict:
    """Every minute (beat): put to sleep each running instance that is idle long enough
    and has nothing going on. Returns {"asleep": [names], "kept_awake": n}."""
    from celery.exceptions import SoftTimeLimitExceeded

    now = now or timezone.now()
    slept, kept = [], 0
    candidates = (Instance.objects.filter(status=Instance.Status.RUNNING, asleep=False, delete_requested=False,
                                          desired_running=True)
                  .exclude(sleep_after_minutes=0))
    for instance in candidates:
        minutes = sleep_after(instance)
        if why_awake(instance, now):
            kept += 1
            continue
        try:
            if put_to_sleep(instance.pk, f"no request for {minutes} minute{'s' if minutes != 1 else ''} and no live oTree session") is not None:
                slept.append(instance.name)
        except SoftTimeLimitExceeded:
            raise
        except Exception:  # noqa: BLE001 - one instance never stops the sweep of the others
            log.warning("putting %s to sleep", instance.name, exc_info=True)
    return {"asleep": slept, "kept_awake": kept}


def put_to_sleep(instance_id: int, reason: str) -> Instance | None:
    """Put the instance to sleep (with `reason`) unless something keeps it awake
    (`why_awake`, checked under its lock taken without waiting, and again once `asleep` is
    set); the reconciler stops it. Returns the instance, or None when it stays awake."""
    from instances import proxy
    from instances.reconciler import reconcile

    try:
        with locks.lock(f"instance:{instance_id}", wait=0):
            instance = Instance.objects.filter(pk=instance_id).first()
            if instance is None or why_awake(instance):
                return None
            now = timezone.now()
            if not Instance.objects.filter(pk=instance_id, asleep=False).update(
                    asleep=True, slept_at=now, sleep_reason=reason[:200]):
                return None
            # Whatever wakes an instance marks itself first, then wakes it: seen here, or it sees `asleep`.
            instance.refresh_from_db()
            busy = busy_reason(instance)
            if busy:
                Instance.objects.filter(pk=instance_id, asleep=True, slept_at=now).update(asleep=False)
                log.info("instance %s stays awake: %s", instance.name, busy)
                return None
    except locks.Busy:
        return None
    log.info("instance %s falls asleep: %s", instance.name, reason)
    record(None, "instance.sleep", instance, f"{instance.name} fell asleep: {reason}", reason=reason[:200])
    instance = reconcile(instance_id)
    try:
        proxy.sync_routes(instance.name if instance is not None else None)
    except Exception:  # noqa: BLE001 - the proxy heals at its next sync
        log.warning("sync_routes after %s fell asleep", instance_id, exc_info=True)
    return instance


def wake(name: str, why: str, *, actor=None, request=None) -> Instance | None:
    """Wake instance `name` (`why`: what woke it, shown on its page) and return it once its
    app answers (status running), or as the reconciler left it. Does nothing to an instance
    that is not asleep. Blocks while the app starts (seconds). `actor`/`request`: who asked
    (the audit record; None: the system)."""
    from instances import proxy
    from instances.reconciler import reconcile

    with transaction.atomic():
        instance = Instance.objects.select_for_update().filter(name=name).first()
        if instance is None:
            return None
        if not instance.asleep:
            return instance
        Instance.objects.filter(pk=instance.pk).update(asleep=False, woke_at=timezone.now(), wake_reason=why[:200],
                                                       last_request_at=timezone.now())
    log.info("instance %s wakes: %s", name, why)
    record(actor, "instance.wake", instance, f"{name} woke: {why}", request, reason=why[:200])
    instance = reconcile(instance.pk)
    proxy.sync_routes(name)
    return instance


def wake_quietly(name: str, why: str, **who) -> Instance | None:
    """`wake`, for callers that go on whatever happens (the lobby, a bot run, a download:
    their own requests then say what is wrong): a failure is logged, not raised."""
    try:
        return wake(name, why, **who)
    except Exception:  # noqa: BLE001 - see above
        log.warning("waking %s (%s)", name, why, exc_info=True)
        return Instance.objects.filter(name=name).first()



def wake_soon(name: str, why: str) -> bool:
    """Start waking a sleeping instance in the background (task `instances.wake`), for a
    page that must not wait for it (a lobby's kiosk page: its participants' requests then
    find the app up, or the proxy holds them until it is). Once per instance within
    WAKE_SOON_SECONDS. True when a wake was sent."""
    from manager.jobs.services import task

    if not Instance.objects.filter(name=name, asleep=True).exists():
        return False
    if not locks.client().set(f"lab:waking:{name}", 1, nx=True, ex=WAKE_SOON_SECONDS):
        return False
    task("instances.wake").apply_async(args=[name, why[:200]], expires=WAKE_SOON_SECONDS)
    return True


WAKE_SOON_SECONDS = 30


# --- the per-instance setting (lab managers) ---------------------------------------------------

SLEEP_AFTER_MAX = 43200  # minutes (30 days)


def clean_sleep_after(actor, minutes) -> int | None:
    """The value of `sleep_after_minutes` checked (None = the lab's default, 0 = never):
    lab managers only (NotAllowed), a whole number in range (ValidationError naming the field)."""
    from django.core.exceptions import ValidationError

    from manager.accounts.services import NotAllowed

    if not actor.is_superuser:
        raise NotAllowed("Only lab managers may change when an instance sleeps.")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, int)
                                or not 0 <= minutes <= SLEEP_AFTER_MAX):
        raise ValidationError({"sleep_after_minutes": [
            f"Sleep after must be a whole number of minutes from 0 (never sleeps) to {SLEEP_AFTER_MAX}, or empty "
            f"(null) for the lab's default ({settings.LAB_SLEEP_AFTER_MINUTES})."]})
    return minutes


def set_sleep_after(actor, instance: Instance, *, minutes, request=None) -> Instance:
    """Set after how many idle minutes the instance sleeps (lab managers; None = the lab's
    LAB_SLEEP_AFTER_MINUTES, 0 = never). Nothing restarts; an instance asleep now stays
    asleep until something wakes it."""
    minutes = clean_sleep_after(actor, minutes)
    if instance.sleep_after_minutes == minutes:
        return instance
    Instance.objects.filter(pk=instance.pk).update(sleep_after_minutes=minutes)
    instance.sleep_after_minutes = minutes
    shown = ("never sleeps" if minutes == 0 else f"sleeps after {minutes} idle minutes" if minutes is not None
             else f"sleeps after the lab's default ({settings.LAB_SLEEP_AFTER_MINUTES} idle minutes)")
    record(actor, "instance.sleep_after", instance, f"{instance.name} {shown}", request, sleep_after_minutes=minutes)
    return instance

