"""Scheduled backups (README "Scheduled backups").

Each instance is backed up every `LAB_BACKUP_INTERVAL` (or its own interval, set by a lab
manager; 0 = off). Celery beat runs `instances.backup_schedule` every
`LAB_BACKUP_CHECK_SECONDS`: `run_pass()` finds the instances that are due — no finished
backup of any kind within their interval, not being deleted, their database set up — and
starts one job per instance (`instances.scheduled_backup`, visible as a Job with a time
limit; never a second one while one is queued or running). The job backs up under the
instance's lock, taken without waiting: a reset, a restore or another backup running = the
job ends saying so and the next pass finds the instance still due (level-triggered: a
missed pass or a killed worker is healed the same way). A failed scheduled backup is
tried again after `retry_after()` (at most an hour), not at every pass.

After each scheduled backup, retention: of the instance's finished scheduled backups the
newest of each of the last N days and of the last M ISO weeks that have one are kept
(`to_keep`), the others deleted with their files and copies. Backups of other kinds are
never deleted here.

Each pass also copies finished backups that have no copy yet to LAB_BACKUP_COPY_DIR (one
that failed before, or one written while the folder was unreachable).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count, Max, Q
from django.urls import reverse
from django.utils import timezone

from instances import reconciler, sleep
from instances.backups import copy_backup, files_of, remove_files
from instances.models import Backup, Instance
from instances.selectors import visible_instances
from manager import locks
from manager.accounts.services import NotAllowed
from manager.audit.services import record
from manager.jobs import services as jobs
from manager.jobs.models import Job

log = logging.getLogger(__name__)

JOB_KIND = "instance.scheduled_backup"
JOB_TASK = "instances.scheduled_backup"
JOB_TIME_LIMIT = 900  # seconds one scheduled backup may take (a large database's dump)
MAX_IN_FLIGHT = 1  # scheduled backups queued or running in the lab at a time (the worker has two processes)
RETRY_AFTER_MAX = 3600  # seconds: a failed scheduled backup is tried again after at most this
COPY_BUDGET = 30  # seconds of copies retried per pass (the rest: the next pass)
OVERDUE_GRACE = 0.10  # of the interval, plus one check period, before a backup counts as overdue
INTERVAL_MAX_MINUTES = 366 * 24 * 60
KEEP_MAX = 1000
FIELDS = ("backup_interval_minutes", "backup_keep_daily", "backup_keep_weekly")


# --- the schedule of an instance ------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    interval: int  # seconds; 0 = off
    keep_daily: int
    keep_weekly: int
    own: bool  # the instance overrides some of the lab's defaults

    @property
    def off(self) -> bool:
        return self.interval == 0

    @property
    def interval_label(self) -> str:
        return "off" if self.off else f"every {duration_label(self.interval)}"

    @property
    def keep_label(self) -> str:
        return f"keep {self.keep_daily} daily, {self.keep_weekly} weekly"

    def __str__(self) -> str:
        return "off" if self.off else f"{self.interval_label}, {self.keep_label}"


def duration_label(seconds: int) -> str:
    """'24 h', '30 min', '7 d', '90 s' (the largest unit that divides it; days from two on)."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0 and (unit != "d" or seconds >= 2 * size):
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def schedule_of(instance: Instance) -> Schedule:
    """The instance's effective schedule: its own values where set, else the lab's."""
    own = instance.backup_interval_minutes
    return Schedule(
        interval=settings.LAB_BACKUP_INTERVAL if own is None else own * 60,
        keep_daily=settings.LAB_BACKUP_KEEP_DAILY if instance.backup_keep_daily is None else instance.backup_keep_daily,
        keep_weekly=(settings.LAB_BACKUP_KEEP_WEEKLY if instance.backup_keep_weekly is None
                     else instance.backup_keep_weekly),
        own=any(getattr(instance, field) is not None for field in FIELDS))


def lab_schedule() -> Schedule:
    """The lab's defaults (LAB_BACKUP_*)."""
    return Schedule(interval=settings.LAB_BACKUP_INTERVAL, keep_daily=settings.LAB_BACKUP_KEEP_DAILY,
                    keep_weekly=settings.LAB_BACKUP_KEEP_WEEKLY, own=False)


def retry_after(schedule: Schedule) -> int:
    """Seconds after a failed scheduled backup before the next try."""
    return max(1, min(schedule.interval, RETRY_AFTER_MAX))


def overdue_after(schedule: Schedule) -> int:
    """Seconds since the last finished backup after which it is overdue: the interval and a
    little grace (10 % and one check period: the pass and the dump take a moment)."""
    return int(schedule.interval * (1 + OVERDUE_GRACE)) + settings.LAB_BACKUP_CHECK_SECONDS


# --- changing it (lab managers) --------------------------------------------------------

def clean(actor, **values) -> dict:
    """The schedule fields given (`FIELDS`; None = the lab's default), checked: lab managers
    only (NotAllowed), whole numbers in range (ValidationError naming the field)."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"not schedule fields: {sorted(unknown)}")
    if values and not actor.is_superuser:
        raise NotAllowed("Only lab managers may change the backup schedule.")
    limits = {"backup_interval_minutes": (INTERVAL_MAX_MINUTES, "minutes between backups (0 = off)"),
              "backup_keep_daily": (KEEP_MAX, "daily backups kept"),
              "backup_keep_weekly": (KEEP_MAX, "weekly backups kept")}
    for field, value in values.items():
        high, what = limits[field]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise ValidationError({field: [f"The {what} must be a whole number from 0 to {high}, or empty (null) for "
                                           "the lab's default."]})
    return values


def update(actor, instance: Instance, *, request=None, **values) -> Instance:
    """Set the instance's own schedule (lab managers; None = the lab's default). Nothing
    restarts: the schedule is no setting of the app."""
    changes = {k: v for k, v in clean(actor, **values).items() if getattr(instance, k) != v}
    if not changes:
        return instance
    with transaction.atomic():
        Instance.objects.filter(pk=instance.pk).update(**changes)
        for key, value in changes.items():
            setattr(instance, key, value)
        record(actor, "instance.backup_schedule", instance,
               f"set the backup schedule of {instance.name}: {schedule_of(instance)}", request,
               **{k: v for k, v in changes.items()})
    return instance


# --- retention ----------------------------------------------------------------------------

def to_keep(backups, keep_daily: int, keep_weekly: int, tz: tzinfo) -> set:
    """Of `backups` ((key, created_at) pairs), the keys to keep: the newest of each of the
    `keep_daily` most recent days that have one, and the newest of each of the
    `keep_weekly` most recent ISO weeks that have one (days and weeks in `tz`); the newest
    of all always (so a schedule keeping 0 and 0 never deletes what it just wrote)."""
    ordered = sorted(backups, key=lambda b: (b[1], b[0]), reverse=True)
    keep = {ordered[0][0]} if ordered else set()
    days, weeks = set(), set()
    for key, when in ordered:
        local = when.astimezone(tz)
        day, week = local.date(), local.isocalendar()[:2]
        if day not in days and len(days) < keep_daily:
            days.add(day)
            keep.add(key)
        if week not in weeks and len(weeks) < keep_weekly:
            weeks.add(week)
            keep.add(key)
    return keep


def prune(instance: Instance, schedule: Schedule | None = None) -> int:
    """Apply the retention to the instance's finished scheduled backups (caller holds its
    lock); failed scheduled ones go too but the newest, when it is newer than every finished
    one (it tells that the last try failed). Returns how many rows went."""
    schedule = schedule or schedule_of(instance)
    scheduled = list(Backup.objects.filter(instance=instance, kind=Backup.Kind.SCHEDULED))
    done = [b for b in scheduled if b.status == Backup.Status.DONE]
    keep = to_keep([(b.pk, b.created_at) for b in done], schedule.keep_daily, schedule.keep_weekly,
                   timezone.get_current_timezone())
    newest_done = max((b.created_at for b in done), default=None)
    failed = sorted((b for b in scheduled if b.status == Backup.Status.FAILED), key=lambda b: (b.created_at, b.pk))
    if failed and (newest_done is None or failed[-1].created_at > newest_done):
        keep.add(failed[-1].pk)
    gone = [b for b in scheduled if b.status != Backup.Status.PENDING and b.pk not in keep]
    for row in gone:
        remove_files(row)
        row.delete()
    return len(gone)


# --- which instances are due --------------------------------------------------------------

def _annotated(queryset):
    done = Q(backups__status=Backup.Status.DONE)
    return queryset.annotate(
        last_done=Max("backups__created_at", filter=done),
        last_try=Max("backups__created_at", filter=Q(backups__kind=Backup.Kind.SCHEDULED)),
        last_scheduled_done=Max("backups__created_at", filter=done & Q(backups__kind=Backup.Kind.SCHEDULED)),
    )


def _is_due(instance, now: datetime) -> bool:
    """`instance` annotated by `_annotated`."""
    schedule = schedule_of(instance)
    if schedule.off:
        return False
    if instance.last_done is not None and instance.last_done > now - timedelta(seconds=schedule.interval):
        return False
    if instance.last_try is not None and instance.last_try > now - timedelta(seconds=retry_after(schedule)):
        return False  # its last try (failed, or still running) was a moment ago
    if instance.asleep and instance.last_done is not None and instance.slept_at is not None \
            and instance.last_done >= instance.slept_at:
        return False  # asleep since its last backup: its data cannot have changed (instances.sleep)
    return True


def _candidates():
    # A stopped instance's database is stopped too: its data cannot change until it starts
    # again (then it is due at once when its last backup is older than its interval).
    return (Instance.objects.filter(delete_requested=False, desired_running=True)
            .exclude(status__in=[Instance.Status.PROVISIONING, Instance.Status.DELETING]))


def due_instances(now: datetime | None = None) -> list[Instance]:
    """The instances due for a scheduled backup, the longest without one first."""
    now = now or timezone.now()
    due = [i for i in _annotated(_candidates()) if _is_due(i, now)]
    return sorted(due, key=lambda i: (i.last_done or i.created_at, i.pk))


def _job_link(instance: Instance) -> str:
    return reverse("instance_detail", args=[instance.name])


def _jobs_in_flight(now: datetime) -> set[str]:
    """The instance pages (links) of the scheduled-backup jobs queued or running. A job
    older than its time limit and a minute is not counted: its message was lost or its
    worker killed (should it run after all, it finds the lock taken or nothing due)."""
    fresh = now - timedelta(seconds=JOB_TIME_LIMIT + 60)
    return set(Job.objects.filter(kind=JOB_KIND, status__in=[Job.Status.QUEUED, Job.Status.RUNNING],
                                  created_at__gt=fresh).values_list("link", flat=True))


def run_pass(now: datetime | None = None) -> dict:
    """One pass of the scheduler: a job for the due instances (the longest without a backup
    first; at most MAX_IN_FLIGHT scheduled backups queued or running in the lab at a time,
    so the workers stay free for what users ask; never two for one instance), then the
    copies that are missing. One pass at a time (another running = this one returns
    {"skipped": ...})."""
    now = now or timezone.now()
    try:
        with locks.lock("backup-schedule", wait=0):
            in_flight = _jobs_in_flight(now)
            started = []
            for instance in due_instances(now):
                if len(in_flight) >= MAX_IN_FLIGHT:
                    break
                link = _job_link(instance)
                if link in in_flight:
                    continue
                jobs.start(jobs.task(JOB_TASK), user=None, kind=JOB_KIND,
                           label=f"Scheduled backup of {instance.name}", args=[instance.pk], link=link)
                in_flight.add(link)
                started.append(instance.name)
            return {"started": started, **retry_copies()}
    except locks.Busy:
        return {"skipped": "another pass is running"}


def retry_copies(budget: float = COPY_BUDGET) -> dict:
    """Copy finished backups that have none yet to LAB_BACKUP_COPY_DIR (newest first; for
    at most `budget` seconds: the next pass goes on)."""
    if not settings.LAB_BACKUP_COPY_DIR:
        return {"copied": 0, "copy_failed": 0}
    deadline = time.monotonic() + budget
    copied = failed = 0
    for row in Backup.objects.filter(status=Backup.Status.DONE, copied_at__isnull=True).exclude(filename=""):
        if time.monotonic() > deadline:
            break
        if not all((row.path.parent / name).exists() for name in files_of(row)):
            continue  # its file is gone (removed by hand): nothing to copy
        if copy_backup(row):
            copied += 1
        else:
            failed += 1
            break  # the folder is unreachable: the next pass tries again
    return {"copied": copied, "copy_failed": failed}


def back_up(instance_id: int, now: datetime | None = None) -> str:
    """The scheduled backup of one instance (the job's work): under its lock, taken without
    waiting, if it is still due; then the retention. Returns what happened (the job's
    message); a failed dump raises reconciler.ReconcileError (its Backup row says failed)."""
    asleep = _annotated(_candidates().filter(pk=instance_id, asleep=True)).first()
    if asleep is not None and _is_due(asleep, now or timezone.now()):
        # Its data changed before it fell asleep: woken for the backup, it falls asleep again
        # by the usual rule (instances.sleep). The database must run to be dumped.
        sleep.wake(asleep.name, "a scheduled backup")
    try:
        with locks.lock(f"instance:{instance_id}", wait=0):
            instance = _annotated(_candidates().filter(pk=instance_id)).first()
            if instance is None:
                return "the instance is gone or being deleted: no scheduled backup"
            if not _is_due(instance, now or timezone.now()):
                return f"{instance.name}: not due (backed up meanwhile)"
            try:
                row = reconciler.backup(instance, Backup.Kind.SCHEDULED)
            finally:
                prune(instance)  # a failed try replaces the one before it
            copy = "" if not settings.LAB_BACKUP_COPY_DIR else (
                "; copied to the second folder" if row.copied_at else "; the copy to the second folder FAILED "
                "(tried again by the next pass)")
            return f"{instance.name}: scheduled backup {row.filename} written ({row.size} bytes){copy}"
    except locks.Busy:
        return ("skipped: another action on the instance (a backup, reset or restore) is running; the next pass "
                "backs it up")


# --- what the Backups page shows --------------------------------------------------------------

@dataclass
class Status:
    instance: Instance
    schedule: Schedule
    last_done: datetime | None
    overdue: bool
    last_failed: bool  # the newest scheduled try failed (after the last finished backup)
    not_copied: int  # finished backups without a copy (LAB_BACKUP_COPY_DIR set)
    copy_dir: bool

    @property
    def stopped(self) -> bool:
        """Stopped by its owner: no scheduled backups (its data cannot change meanwhile)."""
        return not self.instance.desired_running

    @property
    def copy_state(self) -> str:
        if not self.copy_dir:
            return "none"
        return "done" if self.not_copied == 0 else "missing"


def overview(user, now: datetime | None = None) -> list[Status]:
    """Per instance `user` may see (lab managers: all): its schedule, last finished backup,
    whether that is overdue, whether its last scheduled try failed, and its copies."""
    return _statuses(visible_instances(user), now)


def status_of(instance: Instance, now: datetime | None = None) -> Status | None:
    """The overview's row of one instance (its page: whoever may see the page)."""
    return next(iter(_statuses(Instance.objects.filter(pk=instance.pk), now)), None)


def _statuses(queryset, now: datetime | None) -> list[Status]:
    now = now or timezone.now()
    queryset = _annotated(queryset).select_related("owner").annotate(
        last_failed_try=Max("backups__created_at", filter=Q(backups__kind=Backup.Kind.SCHEDULED,
                                                             backups__status=Backup.Status.FAILED)),
        not_copied=Count("backups", filter=Q(backups__status=Backup.Status.DONE, backups__copied_at__isnull=True)
                         & ~Q(backups__filename="")),
    ).order_by("name")
    rows = []
    for instance in queryset:
        schedule = schedule_of(instance)
        since = instance.last_done or instance.created_at
        overdue = (not schedule.off and not instance.delete_requested and instance.desired_running
                   and instance.status != Instance.Status.PROVISIONING
                   and since < now - timedelta(seconds=overdue_after(schedule))
                   and not (instance.asleep and instance.last_done is not None and instance.slept_at is not None
                            and instance.last_done >= instance.slept_at))  # nothing changed since
        failed = instance.last_failed_try is not None and (
            instance.last_done is None or instance.last_failed_try > instance.last_done)
        rows.append(Status(instance=instance, schedule=schedule, last_done=instance.last_done, overdue=overdue,
                           last_failed=failed, not_copied=instance.not_copied,
                           copy_dir=bool(settings.LAB_BACKUP_COPY_DIR)))
    return rows

