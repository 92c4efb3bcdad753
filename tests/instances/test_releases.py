"""Releases on every runtime (a real Docker engine; plain processes with their own virtual
environments) with a real oTree 6 project installed from PyPI by the build: a push goes
live; broken pushes fail with a specific reason while the live release keeps answering;
rollback; queued pushes are superseded; builds of two instances run in parallel; stuck
releases swept. The same tests for both backends.

Builds are slow (pip), so the deploy story is one test. Everything created belongs to this
run's manager id and is removed at the end.
"""

import shutil
import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from instances import otree_project, reconciler, releases
from instances.git.repos import repo_path
from instances.models import Instance, Release
from instances.runtime.base import Health
from manager.accounts.services import Conflict
from manager.jobs.models import Job
from tests.job_helpers import record_jobs, run_recorded
from tests import backends, otree_projects
from tests import docker_helpers
from tests.docker_helpers import http_get
from tests.waits import wait_until
from tests.db_helpers import database_url

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]
REUSED = {"docker": "Using cache", "swarm": "Using cache", "process": "reusing the environment"}  # a code-only push installs nothing


@pytest.fixture(autouse=True)
def clean_engine(runtime, settings):
    settings.LAB_RUNTIME = runtime.name
    yield
    for name in runtime.owned_instances():
        runtime.remove(name)  # containers or processes, data, and the instance's release images/folders
    if runtime.name in ("docker", "swarm"):  # (children first: uv's dependencies images form chains)
        docker_helpers.remove_images(runtime.api, runtime.manager_id)


running_release = backends.running_release


def assert_only_the_live_app(runtime, name) -> None:
    """The instance runs its app, database and Redis, and nothing else of it runs (no
    candidate, no retired app, no stray process)."""
    if runtime.name == "docker":
        names = {c["Names"][0] for c in runtime.api.containers(all=True, filters={"label": [
            f"org.otree-lab.manager={runtime.manager_id}", f"org.otree-lab.instance={name}"]})}
        assert names == {f"/{runtime.container_name(name, c)}" for c in ("app", "db", "redis")}
    elif runtime.name == "swarm":
        assert backends.swarm_components(runtime, name) == ["app", "db", "redis"]
    else:
        assert sorted(runtime._state(name)["processes"]) == ["app", "db", "redis"]
        assert backends.stray_processes(runtime, name) == []


def kept_releases(runtime, name) -> set[str]:
    """Numbers of the release builds still kept."""
    if runtime.name in ("docker", "swarm"):
        return {tag.rsplit(":r", 1)[1]
                for i in runtime.api.images(filters={"label": [
                    f"org.otree-lab.manager={runtime.manager_id}", f"org.otree-lab.instance={name}"]})
                for tag in i["RepoTags"] or []}
    return {folder.name[1:] for folder in (runtime.dir(name) / "releases").glob("r*")}


queued = {}


@pytest.fixture(autouse=True)
def capture_jobs(monkeypatch):
    """Record each build job instead of sending it to a broker; `run_build` runs it."""
    record_jobs(monkeypatch, queued)
    yield
    queued.clear()


def run_jobs(kind):
    """Run the queued jobs of `kind` in-process (oldest first), as the worker would."""
    return run_recorded(queued, kind)


@pytest.fixture
def lab(runtime, tmp_path, boss, ann):
    return boss, ann


def new_instance(owner, name, tmp_path):
    instance = Instance.objects.create(name=name, owner=owner, public_port=None, runtime=settings.LAB_RUNTIME)
    shutil.rmtree(repo_path(name), ignore_errors=True)  # an instance of the same name on the other backend
    bare = otree_projects.init_bare(repo_path(name))
    return instance, otree_projects.Checkout(tmp_path / f"{name}-work", bare)


def push(instance, checkout, files, message, user):
    commit = checkout.push(files, message)
    return releases.record_push(instance, commit=commit, branch="main", pushed_by=user)


def deploy(instance, checkout, files, message, user):
    release = push(instance, checkout, files, message, user)
    started = time.monotonic()
    [job] = run_jobs("instance.deploy")
    release.refresh_from_db()
    return release, job, time.monotonic() - started


def answers(runtime, name) -> tuple[int, bytes]:
    url = runtime.state(name).app_url
    assert url, "the app has no URL"
    return http_get(url + "/", timeout=5)


def test_deploy_broken_pushes_and_rollback(runtime, lab, tmp_path, capsys):
    boss, ann = lab
    instance, checkout = new_instance(ann, "rel-story", tmp_path)
    timings = {}

    # 1. The first push goes live: oTree answers on its 127.0.0.1 port.
    first, job, timings["first build"] = deploy(instance, checkout, otree_projects.valid_project("v1"),
                                                "first version", ann)
    assert first.status == "live", (first.status_reason, first.log[-3000:])
    assert job.status == "succeeded" and "is live" in job.message
    assert first.author == "Ann Experimenter <ann@lab.test>" and first.message == "first version"
    assert first.pushed_by == ann and first.duration is not None
    assert "Installed packages (the whole environment):" in first.log and "Live: #1" in first.log  # (uv's list)
    assert runtime.name == "process" or "Successfully built" in first.log  # the release image
    code, _ = answers(runtime, "rel-story")
    assert code in (200, 302)  # oTree 6 shows its login page at /
    assert first.session_configs[0]["name"] == "hello_game"
    assert first.session_configs[0]["display_name"] == "Hello game"
    rooms = {r["name"]: r for r in first.rooms}
    assert rooms["lab"]["participant_labels"] == otree_projects.LABELS and rooms["online"]["participant_labels"] == []
    assert first.language_code == "en"  # settings.LANGUAGE_CODE: the lobby speaks it
    instance.refresh_from_db()
    assert instance.status == "running"
    # The reconciler keeps the live release: a pass changes nothing.
    app_id = backends.app_identity(runtime, "rel-story")
    assert reconciler.current_app(instance)["image"] == first.image
    reconciler.reconcile(instance.pk)
    assert backends.app_identity(runtime, "rel-story") == app_id
    for secret in (instance.admin_password, instance.rest_key, instance.db_password):
        assert secret not in first.log  # nothing secret went into the build or its log
    if runtime.name in ("docker", "swarm"):
        # The image is labelled and holds no secret; the app runs unprivileged.
        labels = runtime.api.inspect_image(first.image)["Config"]["Labels"]
        assert labels["org.otree-lab.instance"] == "rel-story" and first.image.endswith(":r1")
        assert backends.app_user(runtime, "rel-story") == "10001:10001"
        env = "\n".join(runtime.api.inspect_image(first.image)["Config"]["Env"])
        assert not any(secret in env for secret in (instance.admin_password, instance.rest_key, instance.db_password))
    else:
        # The release folder; the app runs as the instance's own user (the manager is root here).
        assert first.image == "rel-story/r1" and (runtime.dir("rel-story") / "releases" / "r1" / "settings.py").exists()
        import psutil

        app_pid = runtime._state("rel-story")["processes"]["app"]["pid"]
        expected = runtime.user_name("rel-story") if runtime.own_users else psutil.Process().username()
        assert psutil.Process(app_pid).username() == expected

    # 2. A code-only change reuses the pip layer and replaces the app.
    second, job, timings["code-only redeploy"] = deploy(instance, checkout, otree_projects.valid_project("v2"),
                                                        "second version", ann)
    assert second.status == "live", (second.status_reason, second.log[-3000:])
    assert REUSED[runtime.name] in second.log
    first.refresh_from_db()
    assert first.status == "superseded"
    assert answers(runtime, "rel-story")[0] in (200, 302)
    assert running_release(runtime, "rel-story") == second.image
    assert_only_the_live_app(runtime, "rel-story")  # the old app and the candidate are gone

    # 3. Broken pushes fail with their specific reason; #2 keeps answering throughout.
    expected = {
        "no_settings": "there is no settings.py",
        "no_otree": "requirements.txt does not name otree",
        "syntax": "settings.py has a syntax error on line",
        "missing_package": "package otree-lab-no-such-package-zz9 not found on PyPI",
        "crash": "this app crashes on start",
    }
    for kind, reason in expected.items():
        bad, job, timings[f"failed: {kind}"] = deploy(instance, checkout, otree_projects.broken(kind), kind, ann)
        assert bad.status == "failed", (kind, bad.status, bad.log[-2000:])
        assert reason in bad.status_reason, (kind, bad.status_reason)
        assert reason in bad.log and job.status == "failed" and reason in job.message
        assert answers(runtime, "rel-story")[0] in (200, 302), kind
        assert reconciler.current_app(instance)["image"] == second.image
        instance.refresh_from_db()
        assert instance.status == "running" and f"#{bad.number} failed" in instance.status_reason
        assert runtime.state("rel-story").app.health == Health.RUNNING
    assert "syntax error on line 21" in Release.objects.get(instance=instance, message="syntax").status_reason
    assert "exited" in Release.objects.get(instance=instance, message="crash").status_reason

    # 4. Rollback to #1: a new release with #1's image, #2 is rolled back.
    back = releases.rollback(ann, first)
    assert back.rollback_of == first and back.status == "queued"
    [job] = run_jobs("instance.deploy")
    back.refresh_from_db()
    assert back.status == "live", back.status_reason
    second.refresh_from_db()
    assert second.status == "rolled_back"
    assert reconciler.current_app(instance)["image"] == first.image
    assert answers(runtime, "rel-story")[0] in (200, 302)
    crash = Release.objects.get(instance=instance, message="crash")
    with pytest.raises(Conflict) as refused:
        releases.rollback(ann, crash)  # never live
    assert refused.value.message_dict == {
        "release": [f"#{crash.number} never went live; only a release that was live can be rolled back to."]}

    # 5. Images of failed releases were pruned; the live ones are kept.
    assert kept_releases(runtime, "rel-story") == {"1", "2"}
    with capsys.disabled():
        print("\n  release timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


def test_a_newer_push_supersedes_queued_ones_and_builds_never_overlap(runtime, lab, tmp_path):
    boss, ann = lab
    instance, checkout = new_instance(ann, "rel-queue", tmp_path)
    one = push(instance, checkout, otree_projects.broken("no_settings"), "one", ann)
    two = push(instance, checkout, otree_projects.broken("no_otree"), "two", ann)
    three = push(instance, checkout, otree_projects.broken("syntax"), "three", ann)
    assert [r.number for r in (one, two, three)] == [1, 2, 3]
    one.refresh_from_db(), two.refresh_from_db()
    assert one.status == two.status == "superseded" and "#2" in one.status_reason and "#3" in two.status_reason
    jobs = run_jobs("instance.deploy")
    assert [j.status for j in jobs] == ["succeeded", "succeeded", "failed"]
    assert "superseded" in jobs[0].message
    three.refresh_from_db()
    assert three.status == "failed" and "syntax error" in three.status_reason
    # While another worker holds the instance's build lock, a release stays queued and its
    # worker is free at once (the holder hands it on when done; if the holder died, the sweep).
    from manager import locks

    four = push(instance, checkout, otree_projects.broken("no_otree"), "four", ann)
    saved, releases.HANDOVER_WAIT = releases.HANDOVER_WAIT, 0.5
    real_lock, waits = locks.lock, []

    def spied_lock(name, wait=60):
        waits.append((name, wait))
        return real_lock(name, wait=wait)

    try:
        with locks.lock(f"build:{instance.pk}"):
            locks.lock = spied_lock
            [job] = run_jobs("instance.deploy")
    finally:
        releases.HANDOVER_WAIT, locks.lock = saved, real_lock
    assert waits == [(f"build:{instance.pk}", 0.5)]  # it waited HANDOVER_WAIT for the lock, then left
    four.refresh_from_db()
    assert four.status == "queued" and job.status == "succeeded" and "queued behind" in job.message
    Release.objects.filter(pk=four.pk).update(created_at=timezone.now() - timedelta(minutes=4))
    assert releases.sweep() == 0  # the lock is free again: re-enqueued, not failed
    [job] = run_jobs("instance.deploy")
    four.refresh_from_db()
    assert four.status == "failed" and "does not name otree" in four.status_reason


def _deploy_in_subprocess(release_id):
    """`releases.deploy` in a process of its own, as a worker runs it (killable)."""
    import os
    import subprocess
    import sys


    env = {**os.environ, "DATABASE_URL": database_url(), "LAB_LOCK_TTL": "3",
           "LAB_RUNTIME": settings.LAB_RUNTIME}
    code = ("import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); django.setup();"
            f"from instances.releases import deploy; deploy({release_id})")
    return subprocess.Popen([sys.executable, "-c", code], cwd=settings.BASE_DIR, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_worker_and_app_killed_mid_deploy_come_back_with_the_live_release(runtime, lab, tmp_path, settings):
    """The worker dies while the new release is being health-checked, and the live app
    crashes at the same moment: the next passes fail the release, the live release serves
    again, and nothing of the half-done deploy is left running."""
    import signal

    boss, ann = lab
    settings.LAB_LOCK_TTL = 3
    instance, checkout = new_instance(ann, "rel-kill", tmp_path)
    first, job, _ = deploy(instance, checkout, otree_projects.valid_project("v1"), "first", ann)
    assert first.status == "live", first.status_reason
    second = push(instance, checkout, otree_projects.valid_project("v2"), "second", ann)
    worker = _deploy_in_subprocess(second.pk)

    def starting():
        if Release.objects.get(pk=second.pk).status == "starting":
            return True
        assert worker.poll() is None, Release.objects.get(pk=second.pk).log[-2000:]  # the worker died early
        return False

    try:
        wait_until(starting, 300, 0.05,
                   lambda: f"#2 starting (its log ends: {Release.objects.get(pk=second.pk).log[-2000:]})")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    backends.kill_app(runtime, "rel-kill")
    from manager import locks

    assert locks.held(f"build:{instance.pk}")  # the killed worker's locks outlive it ...
    wait_until(lambda: not locks.held(f"build:{instance.pk}") and not locks.held(f"instance:{instance.pk}"),
               timeout=10, interval=0.1, message="the killed worker's locks expiring (LAB_LOCK_TTL=3)")
    assert releases.sweep() == 1
    second.refresh_from_db()
    assert second.status == "failed" and "worker died" in second.status_reason
    reconciler.reconcile(instance.pk)
    instance.refresh_from_db()
    assert instance.status == "running", instance.status_reason
    assert running_release(runtime, "rel-kill") == first.image
    def live_page():  # "not yet" says what the app answered
        code, body = answers(runtime, "rel-kill")
        assert code in (200, 302), (code, body[:300])
        return True

    wait_until(live_page, 60, 0.3, "the restarted app answering with the live release's page", ignore=(AssertionError,))
    assert_only_the_live_app(runtime, "rel-kill")


def test_sweep_fails_releases_whose_worker_died(lab, tmp_path):
    boss, ann = lab
    instance = Instance.objects.create(name="rel-sweep", owner=ann)
    old = timezone.now() - timedelta(seconds=releases.build_timeout() + releases.start_timeout() + 120)
    stuck = Release.objects.create(instance=instance, number=1, commit="a" * 40, status="building", started_at=old)
    fresh = Release.objects.create(instance=instance, number=2, commit="b" * 40, status="queued")
    assert releases.sweep() == 1
    stuck.refresh_from_db(), fresh.refresh_from_db()
    assert stuck.status == "failed" and "worker died" in stuck.status_reason
    assert fresh.status == "queued"


def test_sweep_fails_a_release_as_soon_as_its_build_lock_is_gone(lab):
    """A killed worker's build lock expires after LAB_LOCK_TTL: its release is failed at the
    next sweep, not only after the whole build timeout; a live holder's release is kept."""
    from manager import locks

    boss, ann = lab
    mine = Instance.objects.create(name="rel-lost", owner=ann)
    busy = Instance.objects.create(name="rel-busy", owner=ann)
    a_minute_ago = timezone.now() - timedelta(seconds=60)
    lost = Release.objects.create(instance=mine, number=1, commit="a" * 40, status="starting", started_at=a_minute_ago)
    just_now = Release.objects.create(instance=mine, number=2, commit="b" * 40, status="building",
                                      started_at=timezone.now())
    working = Release.objects.create(instance=busy, number=1, commit="c" * 40, status="building",
                                     started_at=a_minute_ago)
    with locks.lock(f"build:{busy.pk}"):
        assert releases.sweep() == 1
    for release in (lost, just_now, working):
        release.refresh_from_db()
    assert lost.status == "failed" and "worker died" in lost.status_reason
    assert just_now.status == "building" and working.status == "building"


def test_pip_failure_is_explained():
    log = ("ERROR: Could not find a version that satisfies the requirement nopkg-x==1.0 (from versions: none)\n"
           "ERROR: No matching distribution found for nopkg-x==1.0\n")
    assert otree_project.explain_pip(log) == "package nopkg-x not found on PyPI (requirements.txt: nopkg-x==1.0)"
    assert "no version of otree matches" in otree_project.explain_pip(
        "Could not find a version that satisfies the requirement otree==99 (from versions: 5.0, 6.0.15)")


def test_builds_of_different_instances_run_in_parallel(lab, tmp_path, bob):
    """Two experimenters push at the same time: neither build waits for the other (two
    workers, here two threads running the real task)."""
    import threading

    boss, ann = lab
    pushed = []
    for owner, name, extra in ((ann, "rel-par-a", ""), (bob, "rel-par-b", "six\n")):
        instance, checkout = new_instance(owner, name, tmp_path)
        files = otree_projects.broken("missing_package")
        files["requirements.txt"] += extra  # their own requirements: nothing shared to wait for
        pushed.append(push(instance, checkout, files, "slow pip", owner))
    jobs = {job.pk: queued.pop(job.pk) for job in Job.objects.filter(kind="instance.deploy", status="queued")}
    threads = [threading.Thread(target=task.apply, args=([str(pk), *args],)) for pk, (task, args) in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    a, b = (Release.objects.get(pk=r.pk) for r in pushed)
    assert a.status == b.status == "failed"
    assert all("otree-lab-no-such-package-zz9 not found on PyPI" in r.status_reason for r in (a, b))
    # Each build started before the other one ended.
    assert a.started_at < b.finished_at and b.started_at < a.finished_at, (a.started_at, a.finished_at,
                                                                          b.started_at, b.finished_at)


def test_only_the_newest_live_releases_are_kept(runtime, lab, tmp_path, settings):
    """LAB_KEEP_RELEASES: the builds of older live releases are pruned after a deploy; a
    rollback to a pruned one is refused with the reason, to a kept one it works."""
    boss, ann = lab
    settings.LAB_KEEP_RELEASES = 2
    instance, checkout = new_instance(ann, "rel-keep", tmp_path)
    for version in ("v1", "v2"):
        release, job, _ = deploy(instance, checkout, otree_projects.valid_project(version), version, ann)
        assert release.status == "live", release.status_reason
    assert kept_releases(runtime, "rel-keep") == {"1", "2"}  # the set-up: both kept so far
    third, job, _ = deploy(instance, checkout, otree_projects.valid_project("v3"), "v3", ann)
    assert third.status == "live", third.status_reason
    assert kept_releases(runtime, "rel-keep") == {"2", "3"}  # #1's build is gone
    first = Release.objects.get(instance=instance, number=1)
    assert first.status == "superseded"
    with pytest.raises(Conflict) as refused:
        releases.rollback(ann, first)
    assert refused.value.message_dict == {
        "release": ["the image of #1 is no longer kept (only the last 2 releases are)."]}
    back = releases.rollback(ann, Release.objects.get(instance=instance, number=2))
    [job] = run_jobs("instance.deploy")
    back.refresh_from_db()
    assert back.status == "live", back.status_reason
    assert running_release(runtime, "rel-keep") == Release.objects.get(instance=instance, number=2).image
    assert kept_releases(runtime, "rel-keep") == {"2", "3"}
