"""Jobs recorded instead of sent to a broker, then run in-process as the worker would."""

from __future__ import annotations


def record_jobs(monkeypatch, queued: dict) -> None:
    """From now on (this test), each started job is kept in `queued` (job id -> (task,
    args)) instead of being enqueued."""
    from manager.jobs import services as jobs

    real_start = jobs.start

    def start(task, *, user, kind, label, args=(), link=""):
        job = real_start(task, user=user, kind=kind, label=label, args=args, link=link)
        queued[job.pk] = (task, tuple(args))
        return job

    monkeypatch.setattr(jobs, "start", start)


def run_recorded(queued: dict, kind: str) -> list:
    """Run the queued jobs of `kind` in-process (oldest first), as the worker would; the
    jobs, refreshed."""
    from manager.jobs.models import Job

    done = []
    for job in Job.objects.filter(kind=kind, status="queued").order_by("created_at"):
        task, args = queued.pop(job.pk)
        task.apply(args=[str(job.pk), *args])
        job.refresh_from_db()
        done.append(job)
    return done
