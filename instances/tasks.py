"""Celery tasks of instances: the top of the app's layers (they call the reconciler and the
releases; services and releases enqueue them by name through `manager.jobs.services.task`)."""

from celery import shared_task
from django.conf import settings

from instances import export, proxy, reconciler, releases, schedule, sessions, sleep
from instances.models import Backup, Instance
from instances.runtime import RuntimeError_
from manager import locks
from manager.accounts.models import User
from manager.jobs.services import JobFailed, job_task


# The actions that wake a sleeping instance first, and what its page says woke it.
WAKES = {"reset": "a database reset", "backup": "a backup", "restart": "a restart"}


@job_task("instances.instance_action", time_limit=900)
def instance_action(job, instance_id, action):
    actor = User.objects.filter(pk=job.user_id).first()
    name = Instance.objects.filter(pk=instance_id).values_list("name", flat=True).first() or "the instance"
    try:
        if action == "wake":  # Wake now
            sleep.wake(name, f"{actor.username} pressed Wake now" if actor else "Wake now was pressed", actor=actor)
        elif action in WAKES:  # a sleeping instance's database sleeps too (LAB_SLEEP_DATABASES); its app restarts
            sleep.wake(name, WAKES[action])
        if action == "reset":
            row = reconciler.backup_and_reset(instance_id, actor)
            data = export.data_sentence(row)
            return f"{name}: database reset; the backup {row.filename} ({row.size} bytes) was kept" + (
                f"; {data}" if data else "")
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
        final = (Backup.objects.filter(instance_name=name, kind=Backup.Kind.FINAL, status=Backup.Status.DONE)
                 .order_by("-created_at", "-pk").first())
        data = export.data_sentence(final) if final is not None else ""
        return f"{name} deleted; its final backup is kept" + (f"; {data}" if data else "")
    if instance is None:
        return f"{name} no longer exists"
    if instance.status == Instance.Status.FAILED:  # e.g. its app does not come up: the job says why
        raise JobFailed(f"{name}: {instance.status_reason}")
    return f"{name}: {instance.get_status_display()}"


@job_task("instances.restore", time_limit=settings.LAB_BUILD_TIMEOUT * 2 + 300)
def restore(job, instance_id, backup_id, new_instance=False):
    """A backup into an instance (services.restore_backup): a fresh backup of what is there,
    then the restore, then the app restarts. `new_instance`: the instance was made for it
    (its database and Redis are created first by the restore's own reconcile)."""
    actor = User.objects.filter(pk=job.user_id).first()
    name = Instance.objects.filter(pk=instance_id).values_list("name", flat=True).first() or "the instance"
    try:
        sleep.wake(name, "a restore")
        row = reconciler.restore(instance_id, backup_id, actor)
    except reconciler.ReconcileError as exc:
        raise JobFailed(str(exc)) from exc
    except locks.Busy:
        raise JobFailed("another action on this instance is still running; try again in a minute") from None
    finally:
        if new_instance:
            proxy.sync_routes()  # its public port answers (503 until a release is live)
    source = reconciler.Backup.objects.filter(pk=backup_id).values_list("filename", flat=True).first()
    return f"{name}: {source} restored; the data it had before are in {row.filename}"


@shared_task(name="instances.sweep", soft_time_limit=240, time_limit=270)
def sweep():
    """Every minute: leftovers of deleted instances removed, releases whose worker died
    failed, every instance reconciled."""
    result = reconciler.sweep_leftovers()
    if "skipped" in result:
        return result
    stuck = releases.sweep()  # releases whose worker died
    activity = proxy.record_activity()  # last_request_at of every instance that had a request (the sleep policy)
    return {**result, **reconciler.reconcile_all(), "stuck_releases_failed": stuck,
            "instances_with_requests": activity.get("active", 0)}


@shared_task(name="instances.sleep_sweep", soft_time_limit=50, time_limit=58)
def sleep_sweep():
    """Every minute: idle running instances without a live session fall asleep (instances.sleep)."""
    return sleep.sweep()


@shared_task(name="instances.wake", soft_time_limit=150, time_limit=170)
def wake(name, why):
    """Wake a sleeping instance (instances.sleep.wake_soon: e.g. a lobby's kiosk page opened)."""
    instance = sleep.wake_quietly(name, why)
    return {"name": name, "status": instance.status if instance is not None else "gone"}


@shared_task(name="instances.sessions_sweep", soft_time_limit=50, time_limit=58)
def sessions_sweep():
    """Every minute: the oTree sessions of every running instance read again, and releases
    that wait as ready to switch switched to where no session is live any more."""
    result = sessions.refresh_running()
    return {**result, "ready_releases_switched": releases.switch_ready()}


@job_task("instances.build_release", time_limit=settings.LAB_BUILD_TIMEOUT)
def build_release(job, release_id, force=False):
    """Build, start and switch to a release (record_push / rollback enqueue it; Switch now
    and the sessions sweep for a release ready to switch). `force`: switch even while an
    oTree session is live."""
    release = releases.deploy(release_id, force=bool(force))
    if release is None:
        return "the release no longer exists"
    name = release.instance.name
    if release.status == "live":
        return f"{name} #{release.number} is live"
    if release.status == "superseded":
        return f"{name} #{release.number} was superseded by a newer push"
    if release.status == "queued":
        return f"{name} #{release.number} is queued behind the running deploy"
    if release.status == "ready":
        return f"{name} #{release.number} is {release.status_reason}"
    raise JobFailed(f"{name} #{release.number} failed: {release.status_reason}")


# Seconds. Both stay below the broker's visibility timeout (an hour: a task unacknowledged
# longer is delivered again). A drain stopped by its limit is continued by draining again.
MOVE_TIME_LIMIT = 1800  # a dump and a restore of a large database
DRAIN_TIME_LIMIT = 3300  # the moves of a node's instances, one after another


@job_task("instances.move_instance", time_limit=MOVE_TIME_LIMIT)
def move_instance(job, instance_id, node_id):
    """Move a swarm instance to another node (services.move_instance enqueues it)."""
    actor = User.objects.filter(pk=job.user_id).first()
    name = Instance.objects.filter(pk=instance_id).values_list("name", flat=True).first() or "the instance"
    try:
        sleep.wake(name, "a move to another node")
        backup, result = reconciler.move(instance_id, node_id, actor)
    except reconciler.ReconcileError as exc:
        raise JobFailed(f"{name}: {exc}") from exc
    except locks.Busy:
        raise JobFailed("another action on this instance is still running; try again in a minute") from None
    instance = Instance.objects.filter(pk=instance_id).first()
    where = instance.node_label if instance is not None and instance.node_label else node_id[:12]
    return (f"{name} moved to node {where} in {result['seconds']:g} s; its database was backed up first "
            f"({backup.filename}, {backup.size} bytes, kept under Backups)")


@job_task("instances.drain_node", time_limit=DRAIN_TIME_LIMIT)
def drain_node(job, node_id):
    """Move every instance off a swarm node (services.drain_node enqueues it)."""
    actor = User.objects.filter(pk=job.user_id).first()
    try:
        result = reconciler.drain(node_id, actor)
    except RuntimeError_ as exc:
        raise JobFailed(f"the swarm did not answer: {exc}") from exc
    node = result["hostname"]
    moved = "; ".join(f"{name} to {target}" for name, target in result["moved"])
    failed = "; ".join(f"{name}: {reason}" for name, reason in result["failed"])
    if result["failed"]:
        raise JobFailed(f"node {node}: moved {len(result['moved'])} ({moved or 'none'}); "
                        f"{len(result['failed'])} could not move ({failed}). The node stays paused (no new "
                        "instances), so those keep running there; drain it again once the reason is fixed")
    after = ("it is drained now (availability drain)" if result["availability"] == "drain" else
             "it stays paused (no new instances; the manager's own node is never drained: the lab's registry "
             "runs there)")
    if not result["moved"]:
        return f"node {node}: no instances of this lab on it, nothing to move; {after}"
    return f"node {node}: moved {len(result['moved'])} instance(s) ({moved}); {after}"


@shared_task(name="instances.backup_schedule", soft_time_limit=120, time_limit=150)
def backup_schedule():
    """Every LAB_BACKUP_CHECK_SECONDS (beat): a scheduled-backup job for each instance that
    is due, and the copies to LAB_BACKUP_COPY_DIR that are missing (instances.schedule)."""
    return schedule.run_pass()


@job_task(schedule.JOB_TASK, time_limit=schedule.JOB_TIME_LIMIT)
def scheduled_backup(job, instance_id):
    """One instance's scheduled backup and the retention after it (run_pass starts it)."""
    try:
        return schedule.back_up(instance_id)
    except reconciler.ReconcileError as exc:
        name = Instance.objects.filter(pk=instance_id).values_list("name", flat=True).first() or "the instance"
        raise JobFailed(f"{name}: scheduled {exc}") from exc
