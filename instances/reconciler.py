"""Converge the runtime to the database, one instance at a time under its lock.

Level-triggered: `reconcile(id)` reads the desired state fresh and makes the world match,
whatever happened before (a killed worker, a lost message, a container removed by hand).
It is safe to run at any time, any number of times.
"""

import logging
import secrets as pysecrets
import time
from datetime import datetime, timezone as dt_timezone
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import F

from instances import export, netguard, proxy
from instances.backups import backup_dir, copy_backup, restore_problem
from instances.git import archive
from instances.models import Backup, Instance, Release
from instances.runtime import available_runtimes, backend_class, get_runtime
from instances.runtime.base import AppFailed, Health, RuntimeError_, http_problem, last_lines
from instances.state import deleted_event, push_event, set_status
from instances.spec import app_spec, current_app, instance_spec, with_settings
from manager import locks
from manager.audit.services import record

log = logging.getLogger(__name__)


class ReconcileError(Exception):
    """Shown to the user (the instance's status reason)."""


class SettingsNotApplied(ReconcileError):
    """The app did not come up with new settings: the previous ones are back in the
    database and the app runs with them (the message says why, with the app's output)."""


def reconcile(instance_id: int, *, restart: bool = False, runtime=None) -> Instance | None:
    """Make the runtime match the instance's desired state. Returns the instance (None when
    it no longer exists). Raises ReconcileError with the reason on failure; after new
    settings the app could not run with, SettingsNotApplied once everything runs again
    with the previous ones."""
    with locks.lock(f"instance:{instance_id}"):
        instance = Instance.objects.filter(pk=instance_id).first()
        if instance is None:
            return None
        runtime = runtime or get_runtime(instance)
        if instance.delete_requested:
            _delete(instance, runtime)
            return None
        generation = instance.generation
        restart_generation = instance.restart_generation
        refused = ""
        try:
            if not instance.desired_running:
                runtime.stop(instance.name)
                set_status(instance, Instance.Status.STOPPED, "", observed_generation=generation)
                return instance
            if instance.asleep:  # (instances.sleep) the app, and with LAB_SLEEP_DATABASES its db and redis
                if instance.status != Instance.Status.SLEEPING:
                    # the wake route first (its marker file; no config load): a request from
                    # now on wakes it instead of meeting a stopped app
                    proxy.sync_routes(instance.name)
                if settings.LAB_SLEEP_DATABASES:
                    runtime.stop(instance.name)
                else:
                    runtime.stop_app(instance.name)
                if (instance.status, instance.status_reason, instance.observed_generation) != (
                        Instance.Status.SLEEPING, instance.sleep_reason, generation):
                    # (each minute's pass only checks that it still sleeps: no write, no event)
                    set_status(instance, Instance.Status.SLEEPING, instance.sleep_reason,
                               observed_generation=generation)
                return instance
            found = current_app(instance)
            view = instance  # what the app runs with: the instance's settings, or those it ran with before
            if found is not None:
                view, refused = _apply_settings(instance, runtime, found, generation)
            app = app_spec(view, found)
            state = runtime.ensure(instance_spec(view, app))
            placement = _placement(runtime, instance)
            if not locks.held(f"build:{instance.pk}"):  # no build runs: a dead one's leftovers go
                runtime.remove_build_leftovers(instance.name)
            if app is not None and (restart or restart_generation > instance.observed_restart_generation):
                runtime.restart_app(instance.name)
                state = runtime.state(instance.name)
        except RuntimeError_ as exc:
            set_status(instance, Instance.Status.FAILED, str(exc))
            raise ReconcileError(str(exc)) from exc
        if not state.services_ready:
            reason = f"database {state.db.health.value}, redis {state.redis.health.value}"
            set_status(instance, Instance.Status.FAILED, reason, **placement)
            raise ReconcileError(reason)
        fields = dict(placement)
        if app is None:
            # A first release being built or started (its worker holds no instance lock while
            # it builds): the instance is deploying, not ready for code — and the route sync
            # of that release's switch must see it so.
            building = (Release.objects.filter(instance=instance, status__in=(Release.Status.BUILDING,
                                                                              Release.Status.STARTING))
                        .order_by("-number").first())
            if building is not None:
                status, reason = (Instance.Status.DEPLOYING,
                                  f"deploying #{building.number} ({building.commit[:8]})")
            else:
                status, reason = Instance.Status.READY_FOR_CODE, "database and Redis are up; push your oTree project"
        else:
            status, reason = _app_status(runtime, instance.name, state)
            if status == Instance.Status.RUNNING:
                fields["applied_settings"] = view.app_settings()
            waiting = (Release.objects.filter(instance=instance, status=Release.Status.READY)
                       .order_by("-number").values_list("number", flat=True).first())
            if waiting is not None:  # (instances.releases: a push that waits for a live session to end)
                reason = f"{reason}; " if reason else ""
                reason += f"release #{waiting} is ready to switch (it waits for the live session to end)"
            reason = " ".join(part for part in (refused, reason) if part)
        set_status(instance, status, reason, runtime=runtime.name,
                   observed_generation=generation, observed_restart_generation=restart_generation, **fields)
        if refused:
            raise SettingsNotApplied(refused)
        return instance


def _node_of(runtime, name: str) -> str:
    """The node instance `name` lives on, for runtimes that have nodes (swarm); '' for the
    others. RuntimeError_ when the runtime does not answer."""
    node_of = getattr(runtime, "node_of", None)
    return node_of(name) if node_of is not None else ""


def _placement(runtime, instance: Instance) -> dict:
    """The `node` and `node_name` fields to record (what the pages show, so no page asks the
    swarm): the node's hostname is looked up only when the node is new to this row. {} when
    the swarm does not answer (what was recorded stays)."""
    try:
        node = _node_of(runtime, instance.name)
    except RuntimeError_:
        return {}
    hostname = instance.node_name if node == instance.node else ""
    if node and not hostname:
        try:
            hostname = next((n["hostname"] for n in runtime.nodes() if n["id"] == node), "")
        except RuntimeError_:
            hostname = ""
    return {"node": node, "node_name": hostname}


APP_ANSWER_WAIT = 30  # seconds an app that runs but does not answer HTTP yet gets (it may be starting)


def _app_status(runtime, name: str, state) -> tuple[str, str]:
    """(status, reason) of an instance whose app should run: `running` only while the app
    answers HTTP; `failed` with what a user can act on when it exited and is being started
    again (in a crash loop, the runtime's own restarts would hide it), has stopped, or
    runs without answering — each with the app's last output. An app that runs but does not
    answer yet gets up to APP_ANSWER_WAIT seconds (it may be starting), unless it exits
    meanwhile."""
    deadline = time.monotonic() + min(APP_ANSWER_WAIT, settings.LAB_START_TIMEOUT)
    restarts = state.app.restarts
    while True:
        app = state.app
        if app.health == Health.STARTING or (app.health == Health.RUNNING and app.restarts > restarts):
            return Instance.Status.FAILED, _with_output(
                runtime, name, f"the oTree app exited and is being started again ({app.detail or 'crashing'})")
        if app.health != Health.RUNNING:
            what = "is missing" if app.health == Health.MISSING else f"has stopped ({app.detail or 'exited'})"
            return Instance.Status.FAILED, _with_output(runtime, name, f"the oTree app {what}")
        problem = http_problem(state.app_url) if state.app_url else "it has no address"
        if not problem:
            return Instance.Status.RUNNING, ""
        if time.monotonic() >= deadline:
            return Instance.Status.FAILED, _with_output(
                runtime, name, f"the oTree app runs but does not answer HTTP ({problem})")
        time.sleep(0.1)  # (a woken instance's first request waits for this: instances.sleep)
        state = runtime.state(name)


def _with_output(runtime, name: str, reason: str) -> str:
    """`reason`, and the app's last lines of output (what it said before it failed)."""
    try:
        lines = [line for line in runtime.logs(name, "app", tail=40).splitlines() if line.strip()]
    except RuntimeError_:
        lines = []
    # A crash loop repeats its last words at every start: each once.
    tail = last_lines("\n".join(line for n, line in enumerate(lines) if n == 0 or line != lines[n - 1]), 3)
    return f"{reason}; its last output: {tail}" if tail else f"{reason}."


def _apply_settings(instance: Instance, runtime, found: dict, generation: int) -> tuple[Instance, str]:
    """New settings of an instance with an app are applied as a deploy is: the app with
    them starts beside the running one and takes over only once it answers HTTP. Should it
    not come up (it exits, or does not answer within LAB_START_TIMEOUT), the settings it
    ran with before are restored in the database (unless a newer change came meanwhile)
    and the running app is left as it is. Returns the instance as its app is to run
    (`spec.with_settings`) and "" or the reason the new settings were not applied. A
    failure of the machine (not of the app) raises RuntimeError_ and changes nothing."""
    wanted = instance.app_settings()
    applied = instance.applied_settings or {}
    if not applied or applied == wanted:  # nothing new (or an app from before this was recorded)
        return instance, ""
    try:
        runtime.deploy_app(instance_spec(instance, app_spec(instance, found)), timeout=settings.LAB_START_TIMEOUT)
    except AppFailed as exc:
        reason = (f"The new settings were not applied: {exc}. The previous settings are back and the app "
                  "runs with them.")
        _restore(instance, applied, generation, wanted)
        return with_settings(instance, applied), reason
    proxy.sync_routes(instance.name)  # the new app answers on another port
    runtime.retire_app(instance.name)
    Instance.objects.filter(pk=instance.pk).update(applied_settings=wanted)
    instance.applied_settings = wanted
    return instance, ""


def _restore(instance: Instance, applied: dict, generation: int, wanted: dict) -> None:
    """Put the settings the app ran with back, unless a newer change arrived meanwhile
    (its own pass tries that one)."""
    values = {key: Decimal(applied[key]) if key == "cpus" else applied[key]
              for key in Instance.APP_SETTINGS if key in applied}
    if not Instance.objects.filter(pk=instance.pk, generation=generation).update(**values):
        return
    instance.refresh_from_db()
    changed = sorted("config vars" if k == "config_vars" else k for k in values if values[k] != wanted.get(k)
                     and not (k == "cpus" and str(values[k]) == wanted.get(k)))
    # Values are secrets: the audit log names only what went back.
    record(None, "instance.settings_restored", instance,
           f"the app of {instance.name} did not come up with its new {', '.join(changed) or 'settings'}; "
           "the previous ones are back", changed=changed)


def backup(instance: Instance, kind: str, actor=None, runtime=None, *, data: bool = False) -> Backup:
    """Dump the instance's database into LAB_DATA_DIR/backups (caller holds the lock).
    With `data`, oTree's own data export (instances.export) is stored beside the dump, or
    the backup records why it could not be (the dump alone is the authoritative copy)."""
    runtime = runtime or get_runtime(instance)
    # We hold the instance's lock: a backup still "pending" belongs to a worker that died.
    Backup.objects.filter(instance=instance, status=Backup.Status.PENDING).update(status=Backup.Status.FAILED)
    stamp = datetime.now(dt_timezone.utc).strftime("%Y%m%d-%H%M%S")
    filename = f"{instance.name}-{stamp}-{kind}-{pysecrets.token_hex(3)}{runtime.backup_suffix(instance.name)}"
    row = Backup.objects.create(instance=instance, instance_name=instance.name, owner=instance.owner, kind=kind,
                                filename=filename, created_by=actor if actor and actor.is_authenticated else None)
    path = backup_dir() / filename
    try:
        size = runtime.backup_database(instance.name, instance_spec(instance), path)
        path.chmod(0o600)
    except RuntimeError_ as exc:
        Backup.objects.filter(pk=row.pk).update(status=Backup.Status.FAILED)
        raise ReconcileError(f"backup failed: {exc}") from exc
    Backup.objects.filter(pk=row.pk).update(status=Backup.Status.DONE, size=size)
    row.refresh_from_db()
    if data:  # before the copy: the data export goes to the second folder with the dump
        export.store_beside(row, instance, runtime.backup_suffix(instance.name))
    copy_backup(row)  # to LAB_BACKUP_COPY_DIR when set; a failed copy is logged, retried by the scheduler
    return row


def _converge_for_data(instance_id: int, runtime) -> None:
    """Reconcile before a backup or reset: new settings the app refused stop neither (the
    database runs; the app runs with the previous settings)."""
    try:
        reconcile(instance_id, runtime=runtime)
    except SettingsNotApplied:
        pass


def backup_and_reset(instance_id: int, actor=None) -> Backup:
    runtime = get_runtime(Instance.objects.get(pk=instance_id))
    _converge_for_data(instance_id, runtime)  # the database must be up to be dumped
    with locks.lock(f"instance:{instance_id}"):
        instance = Instance.objects.get(pk=instance_id)
        # No backup, no reset; the data export beside it is made while the app still answers.
        row = backup(instance, Backup.Kind.BEFORE_RESET, actor, runtime, data=True)
        try:
            runtime.reset_database(instance.name, instance_spec(instance))
        except RuntimeError_ as exc:
            raise ReconcileError(f"reset failed (the backup {row.filename} was kept): {exc}") from exc
        Instance.objects.filter(pk=instance_id).update(restart_generation=F("restart_generation") + 1)
    reconcile(instance_id, restart=True, runtime=runtime)
    return row


def restore(instance_id: int, backup_id: int, actor=None) -> Backup:
    """Replace the instance's database with backup `backup_id`: under the instance's lock
    the backup is validated (its kind, its file, its content read in the instance's own
    sandbox) before anything changes, then a fresh backup of what is there now is taken
    (kind `before_restore`: no backup, no restore), then the runtime restores (aside
    first; the live database is replaced only once that succeeded), then the app restarts.
    Returns the fresh backup. On failure ReconcileError says why; the database is as it was
    and the app runs again as before."""
    runtime = get_runtime(Instance.objects.get(pk=instance_id))
    _converge_for_data(instance_id, runtime)  # the database must be up (a new instance's made)
    failure = None
    with locks.lock(f"instance:{instance_id}"):
        instance = Instance.objects.get(pk=instance_id)
        if instance.delete_requested:
            raise ReconcileError(f"{instance.name} is being deleted")
        source = Backup.objects.filter(pk=backup_id).first()
        if source is None:
            raise ReconcileError("restore refused: the backup no longer exists")
        spec = instance_spec(instance)
        problem = restore_problem(source, runtime.backup_suffix(instance.name))
        if problem:
            raise ReconcileError(f"restore refused ({instance.name} was not changed): {problem}")
        try:
            runtime.check_restore(instance.name, spec, source.path)
        except RuntimeError_ as exc:
            raise ReconcileError(f"restore refused ({instance.name} was not changed): {source.filename}: {exc}") \
                from exc
        # No backup, no restore; oTree's data export beside it (as a reset's), while the app answers.
        row = backup(instance, Backup.Kind.BEFORE_RESTORE, actor, runtime, data=True)
        try:
            runtime.restore_database(instance.name, spec, source.path)
        except RuntimeError_ as exc:
            failure = exc
        else:
            Instance.objects.filter(pk=instance_id).update(restart_generation=F("restart_generation") + 1)
    if failure is not None:
        try:
            reconcile(instance_id, runtime=runtime)  # the app runs again as before
        except (ReconcileError, RuntimeError_) as exc:
            log.warning("reconciling %s after its failed restore: %s", instance.name, exc)
        raise ReconcileError(f"restore failed; {instance.name} is as it was (the backup {row.filename} of its "
                             f"current data is kept): {failure}") from failure
    record(actor if actor and actor.is_authenticated else None, "instance.restored", instance,
           f"restored {source.filename} into {instance.name}; the data before are in {row.filename}",
           backup=source.filename, before=row.filename)
    try:
        reconcile(instance_id, restart=True, runtime=runtime)
    except SettingsNotApplied:
        pass
    return row


def backup_only(instance_id: int, actor=None) -> Backup:
    runtime = get_runtime(Instance.objects.get(pk=instance_id))
    _converge_for_data(instance_id, runtime)
    with locks.lock(f"instance:{instance_id}"):
        return backup(Instance.objects.get(pk=instance_id), Backup.Kind.MANUAL, actor, runtime)


# --- moving instances between swarm nodes ------------------------------------------------

MOVED_DUMP = "Backup done"  # the runtime's progress line once the dump is complete (move_instance)


def move(instance_id: int, node_id: str, actor=None, *, runtime=None, out=None) -> tuple[Backup, dict]:
    """Move a swarm instance to node `node_id` (SwarmRuntime.move_instance): under the
    instance's lock a Backup row (kind `move`) is made first, the runtime stops the app,
    dumps the database into that backup's file, restores it on the target and starts the
    app there; the backup is kept like any other. Then the instance is reconciled (status,
    node recorded) and the proxy's route synced (the app answers at another address).
    Returns (the backup, the runtime's {source, target, seconds}). On failure the runtime
    has put everything back on the old node: the instance is reconciled there and
    ReconcileError carries the runtime's sentence; a dump that was complete is kept."""
    runtime = runtime or get_runtime(Instance.objects.get(pk=instance_id))
    lines: list[str] = []

    def progress(text: str) -> None:
        lines.append(text)
        log.info("move of instance %s: %s", instance_id, text.strip())
        if out is not None:
            out(text)

    failure = ""
    with locks.lock(f"instance:{instance_id}"):
        instance = Instance.objects.get(pk=instance_id)
        if instance.delete_requested:
            raise ReconcileError(f"{instance.name} is being deleted")
        target = _node_label(runtime, node_id)
        set_status(instance, Instance.Status.DEPLOYING,
                   f"moving to node {target}: the app is down until it starts there")
        # The settings the app last came up with (new ones are applied by the reconcile after).
        view = with_settings(instance, instance.applied_settings) if instance.applied_settings else instance
        spec = instance_spec(view, app_spec(view, current_app(instance)))
        # We hold the instance's lock: a backup still "pending" belongs to a worker that died.
        Backup.objects.filter(instance=instance, status=Backup.Status.PENDING).update(status=Backup.Status.FAILED)
        stamp = datetime.now(dt_timezone.utc).strftime("%Y%m%d-%H%M%S")
        filename = (f"{instance.name}-{stamp}-{Backup.Kind.MOVE}-{pysecrets.token_hex(3)}"
                    f"{runtime.backup_suffix(instance.name)}")
        row = Backup.objects.create(instance=instance, instance_name=instance.name, owner=instance.owner,
                                    kind=Backup.Kind.MOVE, filename=filename,
                                    created_by=actor if actor and actor.is_authenticated else None)
        path = backup_dir() / filename
        try:
            result = runtime.move_instance(instance.name, spec, node_id, dump=path, out=progress)
        except RuntimeError_ as exc:
            failure = str(exc)
            result = {}
        except BaseException:  # a time limit: the runtime went back to the old node; the sweep reconciles
            _finish_move_backup(row, path, complete=any(line.startswith(MOVED_DUMP) for line in lines))
            raise
        _finish_move_backup(row, path, complete=not failure or any(line.startswith(MOVED_DUMP) for line in lines))
    try:
        reconcile(instance_id, runtime=runtime)  # status, and the node it is on now
    except SettingsNotApplied:
        pass
    except ReconcileError as exc:
        if not failure:
            raise ReconcileError(f"moved to {target}, but {exc}") from exc
    proxy.sync_routes(instance.name)  # the app answers at another address
    row.refresh_from_db()
    if failure:
        kept = f" (its database dump {row.filename} is kept)" if row.status == Backup.Status.DONE else ""
        raise ReconcileError(f"{failure}{kept}")
    return row, result


def _finish_move_backup(row: Backup, path, *, complete: bool) -> None:
    """The move's backup: done with its size when the dump is complete, else failed (a
    partial file goes)."""
    if complete and path.exists() and path.stat().st_size > 0:
        path.chmod(0o600)
        Backup.objects.filter(pk=row.pk).update(status=Backup.Status.DONE, size=path.stat().st_size)
        row.refresh_from_db()
        copy_backup(row)
        return
    Backup.objects.filter(pk=row.pk).update(status=Backup.Status.FAILED)
    path.unlink(missing_ok=True)


def _node_label(runtime, node_id: str) -> str:
    """The node's hostname (its id's start when the swarm does not say)."""
    try:
        return next((n["hostname"] for n in runtime.nodes() if n["id"] == node_id and n["hostname"]),
                    node_id[:12])
    except RuntimeError_:
        return node_id[:12]


def drain(node_id: str, actor=None, *, runtime=None, out=None) -> dict:
    """Move every instance on swarm node `node_id` to another node (one after another, each
    as `move` does it, to the emptiest ready, active node), the node being paused meanwhile
    (no new instances go there; those on it keep running until they move). Once none is
    left, a node other than the manager's own is drained (availability `drain`: the swarm
    stops whatever else runs there); the manager's own node stays paused (the lab's
    registry runs there). A node where some could not move stays paused, so those keep
    running. Returns {"node", "hostname", "moved": [(name, target hostname)],
    "failed": [(name, reason)], "availability"}."""
    runtime = runtime or backend_class("swarm")()
    hostname = _node_label(runtime, node_id)
    moved, failed = [], []
    for name in runtime.instances_on(node_id):
        instance = Instance.objects.filter(name=name, delete_requested=False).first()
        if instance is None:
            continue  # being deleted, or an orphan the sweep removes
        try:
            spec = instance_spec(instance)
            target = runtime._choose_node(spec.memory_mb + spec.db_memory_mb + spec.redis_memory_mb)
            if target == node_id:
                raise ReconcileError("no other node is ready and active")
            move(instance.pk, target, actor, runtime=runtime, out=out)
            moved.append((name, _node_label(runtime, target)))
        except (ReconcileError, RuntimeError_) as exc:
            failed.append((name, str(exc)))
        except locks.Busy:
            failed.append((name, "another action on it was still running"))
    availability = "pause"
    if not failed and node_id != runtime.local_node:
        runtime.set_node_availability(node_id, "drain")
        availability = "drain"
    return {"node": node_id, "hostname": hostname, "moved": moved, "failed": failed, "availability": availability}


def _delete(instance: Instance, runtime) -> None:
    """Final backup (when there is a database to back up), then remove everything; the
    git repository goes too, its history archived beside the final backup (a later
    instance of the same name must never serve it)."""
    if instance.name in runtime.owned_instances():
        if instance.asleep:  # (instances.sleep) woken: its app answers the data export beside the dump
            Instance.objects.filter(pk=instance.pk).update(asleep=False)
            instance.asleep = False
            found = current_app(instance)
            state = runtime.ensure(instance_spec(instance, app_spec(instance, found)))
            if found is not None:
                _app_status(runtime, instance.name, state)  # until it answers (or not: the export says why)
        elif runtime.state(instance.name).db.health != Health.RUNNING:
            runtime.ensure(instance_spec(instance))  # bring the database up for its dump
        already = instance.backups.filter(kind=Backup.Kind.FINAL, status=Backup.Status.DONE).exists()
        if not already:  # with oTree's data export, while the app still answers
            backup(instance, Backup.Kind.FINAL, runtime=runtime, data=True)
        runtime.remove(instance.name)
    _archive_repository(instance)
    name, owner_id, pk = instance.name, instance.owner_id, instance.pk
    with transaction.atomic():
        instance.delete()
    push_event(pk, owner_id, deleted_event(name))


def _archive_repository(instance: Instance) -> None:
    """The instance's git history into a bundle among its backups; its repository goes."""
    try:
        archive.archive(instance.name, instance=instance, owner=instance.owner)
    except (archive.ArchiveFailed, locks.Busy, OSError) as exc:
        raise ReconcileError(f"archiving the git repository failed (the instance stays until it succeeds): {exc}") \
            from exc


def sweep_leftovers() -> dict:
    """Remove resources of instances that no longer exist (asking every backend available
    here) and archive their repositories. The instances' firewall first: a flushed or
    rebooted rule set is back within a minute."""
    firewall = netguard.ensure()
    if not firewall.enforced:
        log.warning("instances' firewall: %s", firewall.detail)
    from instances import uploads

    uploads.sweep_stale()  # half-received uploads of a killed web process
    runtimes = available_runtimes()
    if not runtimes:
        return {"skipped": "no runtime available"}
    repositories = archive.sweep_orphans(set(Instance.objects.values_list("name", flat=True)))
    known = set(Instance.objects.values_list("name", flat=True))
    orphans = set()
    for runtime in runtimes:
        try:
            runtime.ensure_protections()  # e.g. the swarm's other nodes: a node that joined is guarded
        except RuntimeError_ as exc:
            log.warning("%s: %s", runtime.name, exc)
        for name in runtime.owned_instances() - known:
            log.warning("removing orphaned %s resources of instance %s", runtime.name, name)
            runtime.remove(name)
            orphans.add(name)
    return {"orphans_removed": sorted(orphans), "repositories_archived": repositories}


def reconcile_all() -> dict:
    """Reconcile every instance, then heal any drift between Caddy's routes and the database."""
    failed = 0
    for instance_id in Instance.objects.values_list("pk", flat=True):
        try:
            reconcile(instance_id)
        except (ReconcileError, locks.Busy, RuntimeError_):
            failed += 1
    proxy.sync_routes()  # heals any drift between Caddy's routes and the database
    return {"failed": failed}
