"""Sleeping instances (instances.sleep) on a real oTree 6 app, on Docker and on plain
processes: an idle instance falls asleep (its app, database and Redis stop; status
`sleeping`) and wakes with its data; with LAB_SLEEP_DATABASES off only the app sleeps; a
live oTree session, a deploy, a backup, a job, a bot run or a held instance lock keep it
awake; a deploy, a backup, a bot run, the lobby and *Wake now* wake it.

One deployment per backend shared by the module (built once, a code-only push later); the
rows that point at it are made again per test (transactional tests empty the tables).
oTree's own database keeps the sessions of earlier tests.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from django.test import Client
from django.utils import timezone

from instances import otree_api, releases, schedule, sessions, sleep
from instances.git.repos import repo_path
from instances.models import Backup, Instance, Release
from instances.runtime.base import Health
from instances.tasks import sessions_sweep, sleep_sweep
from manager import locks
from manager.accounts import services as accounts
from manager.accounts.models import User
from manager.audit.models import AuditEvent
from manager.jobs.models import Job
from tests import backends, otree_projects
from tests.job_helpers import record_jobs, run_recorded

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]
NAME = "sleepy"
CONFIG = "hello_game"


@pytest.fixture(scope="module", params=["docker", "process"])
def runtime(request):
    """Docker and plain processes (the swarm's stop_app shares the others' shape; its
    stop/ensure are tested in test_runtime_swarm)."""
    backends.require(request.param)
    rt = backends.make(request.param)
    yield rt
    for name in rt.owned_instances():
        rt.remove(name)


@dataclass
class Deployed:
    rest_key: str
    admin_password: str
    db_password: str
    image: str
    commit: str
    session_configs: list
    rooms: list
    checkout: otree_projects.Checkout


@pytest.fixture(scope="module")
def deployed(runtime, redis_server, django_db_setup, django_db_blocker):
    from django.conf import settings

    runtime.remove(NAME)
    old_runtime = settings.LAB_RUNTIME
    settings.LAB_RUNTIME = runtime.name
    with django_db_blocker.unblock():
        owner = User.objects.create_user("sleep-deployer", "sleep-deployer@lab.test", "pw-sleep-123456")
        try:
            instance = Instance.objects.create(name=NAME, owner=owner, runtime=runtime.name)
            shutil.rmtree(repo_path(NAME), ignore_errors=True)  # the other backend's
            bare = otree_projects.init_bare(repo_path(NAME))
            checkout = otree_projects.Checkout(Path(tempfile.mkdtemp(prefix="sleep-work-")), bare)
            commit = checkout.push(otree_projects.valid_project("v1"), "v1")
            release = Release.objects.create(instance=instance, number=1, commit=commit)
            release = releases.deploy(release.pk)
            assert release.status == Release.Status.LIVE, release.log[-3000:]
            instance.refresh_from_db()
            found = Deployed(instance.rest_key, instance.admin_password, instance.db_password, release.image, commit,
                             release.session_configs, release.rooms, checkout)
        finally:
            Instance.objects.filter(name=NAME).delete()
            owner.delete()
            settings.LAB_RUNTIME = old_runtime
    try:
        yield found
    finally:
        runtime.remove(NAME)
        shutil.rmtree(repo_path(NAME), ignore_errors=True)
        shutil.rmtree(found.checkout.dir, ignore_errors=True)
        if runtime.name == "docker":
            for image in runtime.api.images(filters={"label": [f"org.otree-lab.manager={runtime.manager_id}",
                                                               f"org.otree-lab.instance={NAME}"]}):
                runtime.api.remove_image(image["Id"], force=True)


queued = {}


@pytest.fixture
def lab(runtime, deployed, monkeypatch, settings, boss, ann, bob):
    settings.LAB_RUNTIME = runtime.name
    settings.LAB_SLEEP_AFTER_MINUTES = 30
    settings.LAB_SLEEP_DATABASES = True
    queued.clear()
    record_jobs(monkeypatch, queued)
    instance = Instance.objects.create(name=NAME, owner=ann, rest_key=deployed.rest_key,
                                       admin_password=deployed.admin_password, db_password=deployed.db_password,
                                       status=Instance.Status.RUNNING, runtime=runtime.name)
    Release.objects.create(instance=instance, number=1, commit=deployed.commit, status=Release.Status.LIVE,
                           image=deployed.image, session_configs=deployed.session_configs, rooms=deployed.rooms,
                           language_code="en", finished_at=timezone.now())
    _, token = accounts.create_token(boss, name="sleep")
    sleep.wake(NAME, "the next test")  # a test that failed half-way may have left it asleep
    yield {"instance": instance, "ann": ann, "boss": boss, "bob": bob, "runtime": runtime, "deployed": deployed,
           "api": Client(HTTP_AUTHORIZATION=f"Bearer {token}")}
    queued.clear()


# --- helpers --------------------------------------------------------------------------------------

def app_url(runtime) -> str:
    url = runtime.state(NAME).app_url
    assert url, "the app does not run"
    return url.rstrip("/")


def rest(lab, method, path, **kwargs):
    response = requests.request(method, app_url(lab["runtime"]) + path,
                                headers={"otree-rest-key": lab["deployed"].rest_key}, timeout=30, **kwargs)
    assert response.status_code == 200, response.text[:300]
    return response.json()


def new_session(lab) -> tuple[str, list[str]]:
    code = rest(lab, "POST", "/api/sessions", json={"session_config_name": CONFIG, "num_participants": 1})["code"]
    detail = rest(lab, "GET", f"/api/sessions/{code}")
    return code, [p["code"] for p in detail["participants"]]


def start(lab, participant: str) -> None:
    response = requests.get(f"{app_url(lab['runtime'])}/InitializeParticipant/{participant}", timeout=30)
    assert response.status_code == 200 and "MyPage" in response.url, response.url


def finish(lab, participant: str) -> None:
    page = requests.get(f"{app_url(lab['runtime'])}/InitializeParticipant/{participant}", timeout=30)
    if "MyPage" not in page.url:
        return
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
    done = requests.post(page.url, data=hidden, timeout=30)
    assert done.status_code == 200 and "OutOfRange" in done.url, (done.status_code, done.url)


def idle(instance: Instance, minutes: int = 31) -> Instance:
    """No request for `minutes` (nor a wake, nor a deploy), and its sessions read now."""
    past = timezone.now() - timedelta(minutes=minutes)
    Instance.objects.filter(pk=instance.pk).update(last_request_at=past, woke_at=None, created_at=past)
    Release.objects.filter(instance=instance).update(finished_at=past)
    instance.refresh_from_db()
    assert sessions.refresh(instance), instance.sessions_problem
    instance.refresh_from_db()
    return instance


def health(runtime) -> dict[str, Health]:
    state = runtime.state(NAME)
    return {"app": state.app.health, "db": state.db.health, "redis": state.redis.health}


def asleep(lab) -> Instance:
    """Idle, then the sweep puts it to sleep."""
    instance = idle(lab["instance"])
    assert sleep_sweep.apply().get()["asleep"] == [NAME], sleep.why_awake(instance)
    instance.refresh_from_db()
    assert instance.status == Instance.Status.SLEEPING and instance.asleep
    return instance


def awake(instance: Instance, why: str) -> None:
    instance.refresh_from_db()
    assert (instance.status, instance.asleep, instance.wake_reason) == (Instance.Status.RUNNING, False, why), \
        instance.status_reason


# --- the tests ------------------------------------------------------------------------------------

def test_an_idle_instance_falls_asleep_and_wakes_with_its_data(lab, settings):
    runtime, instance = lab["runtime"], lab["instance"]
    code, _ = new_session(lab)  # data in its database
    # A fresh deploy (or a recent request) is not put to sleep.
    assert sleep_sweep.apply().get()["asleep"] == []
    assert "less than 30 minutes" in sleep.why_awake(Instance.objects.get(pk=instance.pk))

    instance = asleep(lab)
    assert instance.sleep_reason == "no request for 30 minutes and no live oTree session"
    assert instance.status_reason == instance.sleep_reason
    assert all(h != Health.RUNNING for h in health(runtime).values()), health(runtime)  # db and redis sleep too
    if runtime.name == "process":
        assert not runtime.supervisor_alive(NAME) and backends.stray_processes(runtime, NAME) == []
    assert AuditEvent.objects.filter(action="instance.sleep", target_id=str(instance.pk)).exists()
    # The manager's own reads do not wake it: the sessions sweep skips it; a REST read says why.
    checked = instance.sessions_checked_at
    sessions_sweep.apply().get()
    instance.refresh_from_db()
    assert instance.sessions_checked_at == checked and instance.asleep
    with pytest.raises(otree_api.OTreeUnavailable, match="is asleep") as caught:
        otree_api.get_json(instance, "/api/sessions")
    assert caught.value.kind == "asleep"
    # The instance's JSON and page say so.
    data = lab["api"].get(f"/api/v1/instances/{NAME}").json()
    assert (data["status"], data["sleep_reason"], data["slept_at"] is not None) == (
        "sleeping", instance.sleep_reason, True)
    owner = Client()
    owner.force_login(lab["ann"])
    page = owner.get(f"/instances/{NAME}/").content.decode()
    assert "asleep since" in page and instance.sleep_reason in page and 'id="wake-now"' in page

    # Wake now (the owner): a job wakes it; its data are there.
    response = owner.post(f"/instances/{NAME}/wake/")
    assert response.status_code == 302
    [job] = run_recorded(queued, "instance.wake")
    assert job.status == Job.Status.SUCCEEDED, job.message
    awake(instance, "ann pressed Wake now")
    assert all(h == Health.RUNNING for h in health(runtime).values())
    assert rest(lab, "GET", f"/api/sessions/{code}")["code"] == code
    page = owner.get(f"/instances/{NAME}/").content.decode()
    assert "woke at" in page and "ann pressed Wake now" in page and 'id="wake-now"' not in page
    assert owner.post(f"/instances/{NAME}/wake/").status_code == 302  # not asleep: said, nothing queued
    assert not Job.objects.filter(kind="instance.wake", status="queued").exists()
    # A wake counts as activity: it does not fall asleep again at once.
    assert sleep_sweep.apply().get()["asleep"] == []

    # LAB_SLEEP_DATABASES off: only the app sleeps.
    settings.LAB_SLEEP_DATABASES = False
    instance = asleep(lab)
    assert health(runtime) == {"app": Health.MISSING if runtime.name == "process" else Health.EXITED,
                               "db": Health.RUNNING, "redis": Health.RUNNING}
    sleep.wake(NAME, "a request to its URL")
    awake(instance, "a request to its URL")
    assert rest(lab, "GET", f"/api/sessions/{code}")["code"] == code


def test_a_live_session_or_work_on_it_keeps_it_awake(lab):
    instance = lab["instance"]
    code, [participant] = new_session(lab)
    start(lab, participant)
    try:
        instance = idle(instance)
        assert instance.live_sessions and sleep.why_awake(instance) == "an oTree session is live"
        assert sleep_sweep.apply().get()["asleep"] == []
    finally:
        finish(lab, participant)
    instance = idle(instance)
    assert sleep.why_awake(instance) == ""
    # A read of the sessions older than a few minutes: nothing is known, it stays awake.
    Instance.objects.filter(pk=instance.pk).update(sessions_checked_at=timezone.now() - timedelta(minutes=10))
    instance.refresh_from_db()
    assert "not read" in sleep.why_awake(instance)
    instance = idle(instance)
    # A deploy (its build lock; a queued release), a backup being written, a job, a held lock.
    with locks.lock(f"build:{instance.pk}"):
        assert sleep.why_awake(instance) == "a deploy is under way"
        assert sleep.put_to_sleep(instance.pk, "test") is None
    queued_release = Release.objects.create(instance=instance, number=2, commit="c" * 40)
    assert sleep.why_awake(instance) == "a deploy is under way"
    queued_release.delete()
    pending = Backup.objects.create(instance=instance, instance_name=NAME, owner=lab["ann"], kind="manual",
                                    filename="x.dump")
    assert sleep.why_awake(instance) == "a backup is being written"
    pending.delete()
    Job.objects.create(kind="instance.backup", label=f"Back up {NAME}", link=f"/instances/{NAME}/", status="running")
    assert sleep.why_awake(instance) == f"Back up {NAME} is running"
    assert sleep_sweep.apply().get()["asleep"] == []
    Job.objects.all().delete()
    with locks.lock(f"instance:{instance.pk}"):  # a backup, reset, restore or move holds it
        assert sleep.put_to_sleep(instance.pk, "test") is None
    instance.refresh_from_db()
    assert (instance.status, instance.asleep) == (Instance.Status.RUNNING, False)
    # Sleep turned off for this instance (lab managers).
    Instance.objects.filter(pk=instance.pk).update(sleep_after_minutes=0)
    instance.refresh_from_db()
    assert sleep.why_awake(instance) == "sleep is off for it" and sleep_sweep.apply().get()["asleep"] == []


def test_a_deploy_and_a_backup_wake_a_sleeping_instance(lab):
    runtime, instance = lab["runtime"], lab["instance"]
    code, _ = new_session(lab)
    asleep(lab)
    # A backup (Back up now): woken first, its database dumped.
    owner = Client()
    owner.force_login(lab["ann"])
    assert owner.post(f"/instances/{NAME}/backup/").status_code == 302
    [job] = run_recorded(queued, "instance.backup")
    assert job.status == Job.Status.SUCCEEDED, job.message
    awake(instance, "a backup")
    backup = Backup.objects.get(instance=instance, kind="manual")
    assert backup.status == Backup.Status.DONE and backup.size > 0
    # Scheduled backups: asleep since its last backup, it is not due (its data cannot change).
    instance = asleep(lab)
    Instance.objects.filter(pk=instance.pk).update(backup_interval_minutes=60)
    later = timezone.now() + timedelta(hours=2)
    Backup.objects.filter(pk=backup.pk).update(created_at=instance.slept_at - timedelta(seconds=1))
    assert [i.name for i in schedule.due_instances(later)] == [NAME]  # it changed before it fell asleep
    Backup.objects.filter(pk=backup.pk).update(created_at=instance.slept_at + timedelta(seconds=1))
    assert schedule.due_instances(later) == []
    assert not schedule.status_of(instance, later).overdue

    # A push to the sleeping instance deploys (the deploy wakes it first).
    commit = lab["deployed"].checkout.push(otree_projects.valid_project("v2"), "v2")
    release = releases.record_push(instance, commit=commit, branch="main", pushed_by=lab["ann"])
    [job] = run_recorded(queued, "instance.deploy")
    release.refresh_from_db()
    assert release.status == Release.Status.LIVE, release.log[-2000:]
    assert "The instance was asleep: waking it" in release.log
    awake(instance, "a deploy")
    assert backends.running_release(runtime, NAME) == release.image
    assert rest(lab, "GET", f"/api/sessions/{code}")["code"] == code


def test_a_bot_run_and_the_lobby_wake_it(lab, monkeypatch, settings):
    from bots import services as bot_services
    from bots.tasks import run_bots
    from manager.celery import app as celery_app

    instance = lab["instance"]
    # The lobby: a kiosk page wakes it in the background (task instances.wake).
    asleep(lab)
    celery_app.conf.task_always_eager = True  # the task runs as the worker would, here
    try:
        page = Client().get(f"/lobby/{NAME}/lab/{otree_projects.LABELS[0]}/")
    finally:
        celery_app.conf.task_always_eager = False
        locks.client().delete(f"lab:waking:{NAME}")
    assert page.status_code == 200
    awake(instance, "the lobby of room lab")

    # The gate opened by the experimenter wakes it at once.
    from lobby import services as lobby

    asleep(lab)
    lobby.set_gate(lab["ann"], lobby.find_room(NAME, "lab"), True)
    awake(instance, "the lobby of room lab (its gate opened)")
    lobby.set_gate(lab["ann"], lobby.find_room(NAME, "lab"), False)

    # A bot run (the random policy) wakes it and says so.
    asleep(lab)
    monkeypatch.setattr(run_bots, "apply_async", lambda args, **kw: None)
    run = bot_services.create_run(lab["ann"], instance, session_config=CONFIG, num_participants=1, num_bots=1,
                                  provider=None, model="random")
    run_bots.apply(args=[run.pk])
    run.refresh_from_db()
    assert run.status == "finished" and run.status_reason.startswith(bot_services.WOKE), run.status_reason
    awake(instance, f"a bot run (#{run.number})")


def test_sleep_after_is_a_lab_managers_setting(lab):
    boss, ann = Client(), Client()
    boss.force_login(lab["boss"])
    ann.force_login(lab["ann"])
    url = f"/instances/{NAME}/sleep/"
    assert ann.post(url, {"sleep_after_minutes": "0"}).status_code == 403
    page = boss.post(url, {"sleep_after_minutes": "-1"})
    assert page.status_code == 422 and "from 0 (never sleeps) to 43200" in page.content.decode()
    assert boss.post(url, {"sleep_after_minutes": "0"}).status_code == 302
    instance = Instance.objects.get(name=NAME)
    assert instance.sleep_after_minutes == 0 and "never" in boss.get(f"/instances/{NAME}/").content.decode()
    assert boss.post(url, {"sleep_after_minutes": ""}).status_code == 302
    assert Instance.objects.get(name=NAME).sleep_after_minutes is None

    api = lab["api"]
    for bad in (-1, 43201, "5", 1.5, True):
        response = api.patch(f"/api/v1/instances/{NAME}", {"sleep_after_minutes": bad},
                             content_type="application/json")
        assert response.status_code == 422, (bad, response.content)
        assert "sleep_after_minutes" in response.content.decode(), response.content
    response = api.patch(f"/api/v1/instances/{NAME}", {"sleep_after_minutes": 5}, content_type="application/json")
    assert response.status_code == 200 and response.json()["sleep_after_minutes"] == 5
    assert response.json()["sleep_after"] == 5
    _, token = accounts.create_token(lab["ann"], name="ann")
    owner_api = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    response = owner_api.patch(f"/api/v1/instances/{NAME}", {"sleep_after_minutes": 0},
                               content_type="application/json")
    assert response.status_code == 403 and "lab managers" in response.json()["detail"]
    assert Instance.objects.get(name=NAME).sleep_after_minutes == 5
    assert AuditEvent.objects.filter(action="instance.sleep_after").count() == 3


def test_deleting_a_sleeping_instance_keeps_its_data_export(lab):
    """(Last of the tests on the shared deployment: it goes.)"""
    from instances import reconciler

    new_session(lab)
    instance = asleep(lab)
    Instance.objects.filter(pk=instance.pk).update(delete_requested=True)
    assert reconciler.reconcile(instance.pk) is None
    final = Backup.objects.get(instance_name=NAME, kind="final")
    assert final.status == Backup.Status.DONE and final.data_filename and not final.data_problem, final.data_problem
    assert NAME not in lab["runtime"].owned_instances()


def test_the_swarm_stops_only_the_app_and_ensure_brings_it_back():
    """stop_app on the swarm (LAB_SLEEP_DATABASES off): the app's service scales to 0, its
    database and Redis keep running; `ensure` (the wake's reconcile) scales it up again.
    (A stand-in app: the swarm's deploys are tested in test_runtime_swarm/test_releases.)"""
    from django.conf import settings

    from instances.runtime.base import AppSpec, InstanceSpec

    backends.require("swarm")
    swarm = backends.make("swarm")
    spec = InstanceSpec(name="sw-sleepy", db_name="otree", db_user="otree", db_password="pw-sw-sleepy-123456",
                        memory_mb=256, cpus=0.5,
                        app=AppSpec(image=settings.LAB_IMAGE_PYTHON, command=["python", "-m", "http.server", "8000"],
                                    release_id="t1"))
    try:
        swarm.ensure(spec)
        swarm.stop_app("sw-sleepy")
        state = swarm.state("sw-sleepy")
        assert (state.db.health, state.redis.health) == (Health.RUNNING, Health.RUNNING)
        assert state.app.health != Health.RUNNING
        assert swarm._service("sw-sleepy", "app")["Spec"]["Mode"]["Replicated"]["Replicas"] == 0
        swarm.ensure(spec)
        assert swarm._service("sw-sleepy", "app")["Spec"]["Mode"]["Replicated"]["Replicas"] == 1
        assert swarm.state("sw-sleepy").app.health in (Health.RUNNING, Health.STARTING)
    finally:
        swarm.remove("sw-sleepy")
