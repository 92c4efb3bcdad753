"""The reconciler on every runtime (a real Docker engine; plain processes with a real
PostgreSQL): instances are created, changed, reset, deleted and healed as a lab manager
and an experimenter would see it (status, backups, data). The same tests for both
backends, so a behaviour cannot drift between them.

Only resources of this test run's manager id (derived from its own LAB_DATA_DIR) are
created or touched.
"""

import os
import signal
import subprocess
import sys

import pytest
from django.conf import settings
from django.test import Client

from instances import reconciler, services
from instances.models import Backup, Instance, Release
from instances.runtime.base import Health
from instances.tasks import instance_action
from manager import locks
from manager.jobs.models import Job
from tests import backends
from tests.backends import app_env, app_identity, sql
from tests.waits import wait_until
from tests.db_helpers import database_url

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def clean_engine(runtime, settings):
    """New instances get this backend; each test starts and ends with none of this run's
    instances."""
    settings.LAB_RUNTIME = runtime.name
    yield
    for name in runtime.owned_instances():
        runtime.remove(name)


@pytest.fixture
def people(boss, ann):
    return boss, ann


@pytest.fixture
def fake_app(monkeypatch, runtime):
    """Stand-in for a deployed release (the releases' own tests deploy real oTree): a tiny
    HTTP server."""
    monkeypatch.setattr(reconciler, "current_app", lambda instance: backends.fake_app(runtime, instance.name))


def run_job(kind):
    """Run the newest job of this kind in-process, as the worker would."""
    job = Job.objects.filter(kind=kind).order_by("-created_at").first()
    instance_id, action = job_args[job.pk]
    instance_action.apply(args=[str(job.pk), instance_id, action])
    job.refresh_from_db()
    return job


job_args = {}


@pytest.fixture(autouse=True)
def capture_jobs(monkeypatch):
    """Record what each job would be enqueued with instead of sending it to a broker."""
    from manager.jobs import services as jobs

    real_start = jobs.start

    def start(task, *, user, kind, label, args=(), link=""):
        job = real_start(task, user=user, kind=kind, label=label, args=args, link=link)
        job_args[job.pk] = tuple(args)
        return job

    monkeypatch.setattr(jobs, "start", start)
    monkeypatch.setattr(instance_action, "apply_async", lambda *a, **k: None)
    yield
    job_args.clear()


def created(boss, owner, name):
    """A new instance whose create job has run (and succeeded)."""
    instance = services.create_instance(boss, name=name, owner=owner)
    job = run_job("instance.create")
    assert job.status == "succeeded", job.message
    return instance


def running_with(runtime, boss, owner, name, setup_sql):
    """A new running instance (with the fake app) whose database holds what `setup_sql` made."""
    instance = created(boss, owner, name)
    instance.refresh_from_db()
    assert instance.status == "running"
    assert sql(runtime, name, setup_sql)[0] == 0
    return instance


def test_create_is_ready_for_code_with_its_own_database(runtime, people):
    boss, ann = people
    instance = services.create_instance(boss, name="rc-create", owner=ann)
    job = run_job("instance.create")
    assert job.status == "succeeded", job.message
    instance.refresh_from_db()
    assert instance.status == "ready_for_code" and instance.runtime == runtime.name
    state = runtime.state("rc-create")
    assert state.db.health == Health.RUNNING and state.redis.health == Health.RUNNING
    assert sql(runtime, "rc-create", "SELECT 1") == (0, "1")
    # The first push is being built when the minute's sweep comes: the instance stays
    # deploying (it said "ready for code", and the switch's route sync then gave it no app).
    first = Release.objects.create(instance=instance, number=1, commit="a" * 40, status="building")
    instance.status = "deploying"
    instance.save(update_fields=["status"])
    reconciler.reconcile(instance.pk)
    instance.refresh_from_db()
    assert instance.status == "deploying" and "#1" in instance.status_reason, instance.status_reason
    Release.objects.filter(pk=first.pk).update(status="failed")  # the build failed: nothing runs
    reconciler.reconcile(instance.pk)
    instance.refresh_from_db()
    assert instance.status == "ready_for_code", instance.status_reason


def test_settings_change_restarts_the_app_and_keeps_the_data(runtime, people, fake_app):
    boss, ann = people
    instance = running_with(runtime, boss, ann, "rc-settings",
                            "CREATE TABLE sessions (code text); INSERT INTO sessions VALUES ('abc')")
    before = app_identity(runtime, "rc-settings")

    password = services.set_admin_password(ann, instance, "a-brand-new-password")
    services.update_settings(ann, instance, auth_level="DEMO", env={"COLOR": "blue"})
    assert run_job("instance.apply").status == "succeeded"

    env = app_env(runtime, "rc-settings")
    assert env["OTREE_ADMIN_PASSWORD"] == password and env["OTREE_AUTH_LEVEL"] == "DEMO"
    assert env["COLOR"] == "blue" and env["OTREE_PRODUCTION"] == "1"
    assert app_identity(runtime, "rc-settings") != before
    assert sql(runtime, "rc-settings", "SELECT code FROM sessions") == (0, "abc")  # data untouched


def test_restart_starts_the_app_anew_and_keeps_the_data(runtime, people, fake_app):
    boss, ann = people
    instance = running_with(runtime, boss, ann, "rc-restart", "CREATE TABLE kept (v int); INSERT INTO kept VALUES (5)")
    before = app_identity(runtime, "rc-restart")
    services.restart(ann, instance)
    job = run_job("instance.restart")
    assert job.status == "succeeded", job.message
    instance.refresh_from_db()
    assert instance.status == "running" and instance.observed_restart_generation == instance.restart_generation == 1
    assert app_identity(runtime, "rc-restart") != before  # started again (not only a 202)
    assert runtime.state("rc-restart").app.health == Health.RUNNING
    assert sql(runtime, "rc-restart", "SELECT v FROM kept") == (0, "5")


def test_back_up_now_writes_a_dump_of_the_data(runtime, people):
    boss, ann = people
    instance = created(boss, ann, "rc-backup")
    assert sql(runtime, "rc-backup", "CREATE TABLE notes (v text); INSERT INTO notes VALUES ('kept')")[0] == 0
    services.backup_now(ann, instance)
    job = run_job("instance.backup")
    assert job.status == "succeeded", job.message
    backup = Backup.objects.get(instance=instance)
    assert backup.kind == "manual" and backup.status == "done" and backup.size == backup.path.stat().st_size > 0
    dump = backup.path.read_bytes()
    assert dump[:5] == b"PGDMP" and b"CREATE TABLE public.notes" in dump and backup.filename in job.message
    assert sql(runtime, "rc-backup", "SELECT v FROM notes") == (0, "kept")  # a backup changes nothing
    owner = Client()
    owner.force_login(ann)  # the experimenter downloads it
    download = owner.get(f"/instances/rc-backup/backups/{backup.pk}/download/")
    assert download.status_code == 200 and b"".join(download.streaming_content) == dump


def test_reset_database_writes_a_backup_first(runtime, people):
    boss, ann = people
    instance = created(boss, ann, "rc-reset")
    assert sql(runtime, "rc-reset", "CREATE TABLE players (id int); INSERT INTO players VALUES (7)")[0] == 0
    assert sql(runtime, "rc-reset", "SELECT id FROM players") == (0, "7")  # the set-up took effect
    services.reset_database(ann, instance)
    job = run_job("instance.reset")
    assert job.status == "succeeded", job.message
    backup = Backup.objects.get(instance=instance, kind="before_reset")
    assert backup.status == "done" and backup.size > 0
    dump = backup.path.read_bytes()
    assert dump[:5] == b"PGDMP" and b"CREATE TABLE public.players" in dump  # the data before the reset
    assert backup.filename in job.message
    code, out = sql(runtime, "rc-reset", "SELECT count(*) FROM players")
    assert code != 0 and "does not exist" in out  # the table is gone
    assert sql(runtime, "rc-reset", "SELECT 1") == (0, "1")  # the database itself is back and usable


def test_delete_keeps_a_final_backup_and_leaves_nothing(runtime, people):
    boss, ann = people
    instance = created(boss, ann, "rc-delete")
    assert sql(runtime, "rc-delete", "CREATE TABLE keep (v int); INSERT INTO keep VALUES (1)")[0] == 0
    assert sql(runtime, "rc-delete", "SELECT v FROM keep") == (0, "1")  # the set-up took effect
    commit = pushed_history(instance)
    services.delete_instance(boss, instance)
    job = run_job("instance.delete")
    assert job.status == "succeeded", job.message
    assert not Instance.objects.filter(name="rc-delete").exists()
    final = Backup.objects.get(instance_name="rc-delete", kind="final")
    dump = final.path.read_bytes()
    assert final.status == "done" and dump[:5] == b"PGDMP" and b"CREATE TABLE public.keep" in dump
    assert "rc-delete" not in runtime.owned_instances()
    # The git history went beside it; the repository is gone.
    history = Backup.objects.get(instance_name="rc-delete", kind="repository")
    assert history.status == "done" and history.owner == ann
    heads = subprocess.run(["git", "bundle", "list-heads", str(history.path)], capture_output=True, text=True,
                           check=True, timeout=30).stdout
    assert f"{commit} refs/heads/main" in heads
    from instances.git.repos import repo_path

    assert not repo_path("rc-delete").exists()
    # The lab manager still finds and downloads it.
    from django.test import Client

    manager = Client()
    manager.force_login(boss)
    page = manager.get("/backups/").content.decode()
    assert "rc-delete" in page and "deleted" in page
    download = manager.get(f"/backups/{final.pk}/download/")
    assert download.status_code == 200 and b"".join(download.streaming_content)[:5] == b"PGDMP"


def pushed_history(instance) -> str:
    """A commit on main of the instance's repository (as a push would leave it)."""
    from instances.git.archive import ensure_repo
    from tests.otree_projects import Checkout

    repo = ensure_repo(instance)
    work = Checkout(settings.DATA_DIR / f"{instance.name}-work")
    commit = work.commit({"settings.py": "SESSION_CONFIGS = []\n"}, "first")
    subprocess.run(["git", "--git-dir", str(repo), "fetch", "-q", str(work.dir), "main:main"], check=True, timeout=30)
    return commit


def test_sweep_heals_drift_and_removes_orphans(runtime, people):
    boss, ann = people
    created(boss, ann, "rc-heal")
    backends.break_service(runtime, "rc-heal", "redis")  # by hand, or a crash
    # resources of an instance the database does not know (e.g. a crash after a delete)
    from instances.runtime.base import InstanceSpec

    runtime.ensure(InstanceSpec(name="rc-orphan", db_name="otree", db_user="otree", db_password="x" * 20,
                                memory_mb=256, cpus=0.5))
    from instances.tasks import sweep

    result = sweep()  # the minute task, run here in-process
    assert result["orphans_removed"] == ["rc-orphan"]
    assert "rc-orphan" not in runtime.owned_instances()
    assert runtime.state("rc-heal").redis.health == Health.RUNNING


def _reconcile_in_subprocess(instance_id):
    env = {**os.environ, "DATABASE_URL": database_url(), "LAB_LOCK_TTL": "3"}
    code = (
        "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); django.setup();"
        f"from instances.reconciler import reconcile; reconcile({instance_id})"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=settings.BASE_DIR, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("phase", ["create", "delete"])
def test_worker_killed_mid_way_is_healed_by_the_next_pass(runtime, people, settings, phase):
    boss, ann = people
    settings.LAB_LOCK_TTL = 3
    name = f"rc-kill-{phase}"
    instance = services.create_instance(boss, name=name, owner=ann)
    if phase == "delete":
        assert run_job("instance.create").status == "succeeded"
        services.delete_instance(boss, instance)
    proc = _reconcile_in_subprocess(instance.pk)

    def started_or_ended() -> str | None:
        if proc.poll() is not None:
            return "ended"
        owned = name in runtime.owned_instances()
        if (phase == "create" and owned) or (phase == "delete" and Backup.objects.filter(
                instance_name=name, kind="final").exists()):
            return "started"
        return None

    started = alive_when_killed = False
    try:  # kill it as soon as it has started changing the world
        started = wait_until(started_or_ended, 60, 0.02, "the worker changing the world") == "started"
        alive_when_killed = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert started and alive_when_killed, "the worker was not killed mid-way (it had not started, or had finished)"
    assert locks.held(f"instance:{instance.pk}")  # the killed worker's lock outlives it ...
    wait_until(lambda: not locks.held(f"instance:{instance.pk}"), timeout=10, interval=0.1,
               message="the killed worker's lock expiring (LAB_LOCK_TTL=3)")  # ... until its TTL
    reconciler.reconcile(instance.pk)
    if phase == "create":
        instance.refresh_from_db()
        assert instance.status == "ready_for_code"
        if runtime.name == "docker":
            containers = runtime.api.containers(all=True, filters={"label": [f"org.otree-lab.instance={name}"]})
            assert sorted(c["Labels"]["org.otree-lab.component"] for c in containers) == ["db", "redis"]
        elif runtime.name == "swarm":
            assert backends.swarm_components(runtime, name) == ["db", "redis"]
        else:  # one supervisor, its database and Redis; nothing else of the instance runs
            assert sorted(runtime._state(name)["processes"]) == ["db", "redis"]
            assert len(runtime.processes(name)) == 3 and backends.stray_processes(runtime, name) == []
    else:
        assert not Instance.objects.filter(pk=instance.pk).exists()
        assert name not in runtime.owned_instances()
        assert Backup.objects.filter(instance_name=name, kind="final", status="done").count() == 1
