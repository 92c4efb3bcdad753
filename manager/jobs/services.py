"""Background jobs: recorded in the database first, enqueued after commit, always
ending in a terminal status that the user is told about."""

import functools
import logging
from datetime import timedelta

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.db import transaction
from django.utils import timezone

from manager.celery import app as celery_app
from manager.jobs.models import Job
from manager.realtime.services import notify_user
from manager.texts import storable

log = logging.getLogger(__name__)

GRACE_SECONDS = 60
QUEUE_PATIENCE_SECONDS = 3600  # a queued job may wait behind long builds


class JobFailed(Exception):
    """Raise inside a job with a message meant for the user."""


def start(task, *, user, kind: str, label: str, args=(), link: str = "") -> Job:
    """Create the Job row and enqueue `task` (a `job_task`) once the transaction commits."""
    job = Job.objects.create(
        kind=kind, label=label, user=user if user is not None and user.is_authenticated else None,
        link=link, time_limit=task.job_time_limit,
    )
    job_id = str(job.id)
    transaction.on_commit(lambda: task.apply_async(args=[job_id, *args]))
    return job


def task(name: str):
    """The Celery task registered as `name`. An app's services enqueue their tasks through
    it instead of importing the tasks module (which imports them: a circle); each app's
    AppConfig.ready imports its tasks, so they are registered in every process."""
    return celery_app.tasks[name]


def _finish(job_id, status, message, link=None):
    now = timezone.now()
    updates = {"status": status, "message": storable(message[:2000]), "finished_at": now}
    if link is not None:
        updates["link"] = link
    # Only a job that has not ended yet is ended (a redelivered task cannot flip a result).
    changed = Job.objects.filter(pk=job_id).exclude(status__in=[Job.Status.SUCCEEDED, Job.Status.FAILED]).update(
        **updates
    )
    if changed:
        job = Job.objects.get(pk=job_id)
        announce(job)


def announce(job: Job) -> None:
    level = "success" if job.status == Job.Status.SUCCEEDED else "danger"
    notify_user(
        job.user_id, job.message or job.label, level=level, link=job.link,
        job={"id": str(job.id), "kind": job.kind, "label": job.label, "status": job.status},
    )


def job_task(name: str, time_limit: int = 120):
    """Decorator: turn `fn(job, *args) -> str` into a Celery task that takes a job id.

    The returned string is the message the user sees on success; JobFailed's message on
    failure; any other exception becomes a generic failure (details in the worker log).
    """

    def decorate(fn):
        @shared_task(name=name, soft_time_limit=time_limit, time_limit=time_limit + 15)
        @functools.wraps(fn)
        def run(job_id, *args):
            claimed = Job.objects.filter(pk=job_id, status=Job.Status.QUEUED).update(
                status=Job.Status.RUNNING, started_at=timezone.now()
            )
            if not claimed:
                if not Job.objects.filter(pk=job_id, status=Job.Status.RUNNING).exists():
                    return  # finished, or unknown: nothing to do (idempotent redelivery)
            job = Job.objects.get(pk=job_id)
            try:
                message = fn(job, *args) or f"{job.label}: done"
            except SoftTimeLimitExceeded:
                _finish(job_id, Job.Status.FAILED, f"{job.label}: stopped after {time_limit} s (time limit)")
            except JobFailed as exc:
                _finish(job_id, Job.Status.FAILED, f"{job.label}: {exc}")
            except Exception as exc:
                log.exception("job %s (%s) failed", job_id, name)
                _finish(job_id, Job.Status.FAILED, f"{job.label}: failed ({type(exc).__name__})")
            else:
                _finish(job_id, Job.Status.SUCCEEDED, message)

        run.job_time_limit = time_limit
        return run

    return decorate


def sweep(now=None) -> int:
    """Fail jobs whose worker died (past their time limit plus grace); prune old ones."""
    now = now or timezone.now()
    overdue = 0
    for job in Job.objects.filter(status__in=[Job.Status.QUEUED, Job.Status.RUNNING]):
        if job.started_at:
            deadline = job.started_at + timedelta(seconds=job.time_limit + GRACE_SECONDS)
        else:
            deadline = job.created_at + timedelta(seconds=QUEUE_PATIENCE_SECONDS)
        if deadline < now:
            _finish(job.pk, Job.Status.FAILED, f"{job.label}: the worker stopped before finishing")
            overdue += 1
    Job.objects.filter(finished_at__lt=now - timedelta(days=30)).delete()
    return overdue
