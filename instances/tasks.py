"""Celery tasks of instances: the top of the app's layers (they call the reconciler and the
releases; services and releases enqueue them by name through `manager.jobs.services.task`)."""

from celery import shared_task
from django.conf import settings

from instances import proxy, reconciler, releases
from instances.models import Instance
from manager import locks
from manager.accounts.models import User
from manager.jobs.services import JobFailed, job_task


@job_task("instances.instance_action", time_limit=900)
def instance_action(job, instance_id, action):
    actor = User.objects.filter(pk=job.user_id).first()
    name = Instance.objects.filter(pk=instance_id).values_list("name", flat=True).first() or "the instance"
    try:
        if action == "reset":
            row = reconciler.backup_and_reset(instance_id, actor)
            return f"{name}: database reset; the backup {row.filename} ({row.size} bytes) was kept"
        if action == "backup":
            row = reconciler.backup_only(instance_id, actor)
            return f"{name}: backup {row.filename} written ({row.size} bytes)"
        instance = reconciler.reconcile(instance_id, restart=(action == "restart"))
    except reconciler.ReconcileError as exc:
        raise JobFailed(str(exc)) from exc
    except locks.Busy:
        raise JobFailed("another action on this instance is still running; try again in a minute") from None
    if action in ("create", "delete"):
        proxy.sync_routes()  # its public port answers (503 until a release is live) / is closed
    if action == "delete":
        return f"{name} deleted; its final backup is kept"
    if instance is None:
        return f"{name} no longer exists"
    if instance.status == Instance.Status.FAILED:  # e.g. its app does not come up: the job says why
        raise JobFailed(f"{name}: {instance.status_reason}")
    return f"{name}: {instance.get_status_display()}"


@shared_task(name="instances.sweep", soft_time_limit=240, time_limit=270)
def sweep():
    """Every minute: leftovers of deleted instances removed, releases whose worker died
    failed, every instance reconciled."""
    result = reconciler.sweep_leftovers()
    if "skipped" in result:
        return result
    stuck = releases.sweep()  # releases whose worker died
    return {**result, **reconciler.reconcile_all(), "stuck_releases_failed": stuck}


@job_task("instances.build_release", time_limit=settings.LAB_BUILD_TIMEOUT)
def build_release(job, release_id):
    """Build, start and switch to a release (record_push / rollback enqueue it)."""
    release = releases.deploy(release_id)
    if release is None:
        return "the release no longer exists"
    name = release.instance.name
    if release.status == "live":
        return f"{name} #{release.number} is live"
    if release.status == "superseded":
        return f"{name} #{release.number} was superseded by a newer push"
    if release.status == "queued":
        return f"{name} #{release.number} is queued behind the running deploy"
    raise JobFailed(f"{name} #{release.number} failed: {release.status_reason}")
