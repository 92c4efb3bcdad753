"""Background jobs (manager.jobs.services): every job ends in a status the user is told.

Tasks run in this process (`task.apply`); no worker. The realtime notification is read
back from the real Redis channel layer, as the user's browser tabs would get it.
"""

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from celery.exceptions import SoftTimeLimitExceeded
from channels.layers import get_channel_layer
from django.test import Client
from django.utils import timezone

from manager.jobs import services as jobs
from manager.jobs.models import Job
from manager.jobs.services import JobFailed, job_task
from manager.jobs.tasks import sweep_jobs

pytestmark = pytest.mark.django_db

calls = []  # (task, args) of every test task that really ran


@job_task("tests.jobs.succeed", time_limit=30)
def succeed(job, what):
    calls.append(("succeed", what))
    return f"Built {what}"


@job_task("tests.jobs.quiet")
def quiet(job):
    calls.append(("quiet",))


@job_task("tests.jobs.refuse")
def refuse(job, reason):
    calls.append(("refuse", reason))
    raise JobFailed(reason)


@job_task("tests.jobs.crash")
def crash(job):
    calls.append(("crash",))
    raise KeyError("/srv/secret/path/token=abc123")


@job_task("tests.jobs.too_slow", time_limit=5)
def too_slow(job):
    calls.append(("too_slow",))
    raise SoftTimeLimitExceeded()


@job_task("tests.jobs.swept_meanwhile")
def swept_meanwhile(job):
    """While this runs, the sweep (or anyone) ends the job: the late result must not win."""
    calls.append(("swept_meanwhile",))
    Job.objects.filter(pk=job.pk).update(status=Job.Status.FAILED, message="ended by the sweep",
                                         finished_at=timezone.now())
    return "late success"


@pytest.fixture(autouse=True)
def _reset_calls():
    calls.clear()


def start(task, user, *args, label="Build ann's experiment"):
    """Record a job (its enqueueing waits for a commit that never comes inside a test)."""
    return jobs.start(task, user=user, kind="tests.build", label=label, args=list(args), link="/somewhere/")


def run(task, job, *args):
    task.apply(args=[str(job.id), *args])
    job.refresh_from_db()
    return job


# --- outcomes ------------------------------------------------------------------------


def test_start_records_the_job_and_enqueues_after_commit(ann, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job = jobs.start(succeed, user=ann, kind="tests.build", label="Build it", args=["x"], link="/x/")
    assert len(callbacks) == 1  # nothing is sent to the broker before the row is committed
    job.refresh_from_db()
    assert (job.status, job.user, job.kind, job.label, job.link) == (Job.Status.QUEUED, ann, "tests.build",
                                                                     "Build it", "/x/")
    assert job.time_limit == 30  # the task's own limit, for the sweep
    assert job.started_at is None and job.finished_at is None and calls == []


def test_success_message_is_what_the_task_returned(ann):
    job = run(succeed, start(succeed, ann), "v2")
    assert calls == [("succeed", "v2")]
    assert job.status == Job.Status.SUCCEEDED and job.message == "Built v2"
    assert job.started_at <= job.finished_at and job.is_finished and job.duration is not None


def test_success_without_a_message_says_done(ann):
    job = run(quiet, start(quiet, ann))
    assert job.status == Job.Status.SUCCEEDED and job.message == "Build ann's experiment: done"


def test_job_failed_ends_failed_with_its_message(ann):
    job = run(refuse, start(refuse, ann), "the repository has no settings.py")
    assert job.status == Job.Status.FAILED
    assert job.message == "Build ann's experiment: the repository has no settings.py"
    assert job.finished_at is not None


def test_unexpected_exception_ends_failed_with_a_generic_message(ann, caplog):
    job = run(crash, start(crash, ann))
    assert job.status == Job.Status.FAILED
    assert job.message == "Build ann's experiment: failed (KeyError)"
    assert "secret" not in job.message and "abc123" not in job.message  # details stay in the worker log
    assert any("failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_time_limit_ends_failed_and_says_so(ann):
    job = run(too_slow, start(too_slow, ann))
    assert job.status == Job.Status.FAILED
    assert job.message == "Build ann's experiment: stopped after 5 s (time limit)"


def test_very_long_messages_are_cut(ann):
    job = run(refuse, start(refuse, ann), "x" * 5000)
    assert job.status == Job.Status.FAILED and len(job.message) == 2000


# --- redelivery ----------------------------------------------------------------------


@pytest.mark.parametrize("task, args", [(succeed, ["v1"]), (refuse, ["no"]), (crash, [])])
def test_a_finished_job_is_not_run_again_when_its_task_is_redelivered(ann, task, args):
    job = run(task, start(task, ann), *args)
    status, message, finished_at = job.status, job.message, job.finished_at
    assert len(calls) == 1

    job = run(task, job, *args)  # the broker delivers the same message again
    assert len(calls) == 1  # the work did not run a second time
    assert (job.status, job.message, job.finished_at) == (status, message, finished_at)


def test_a_job_whose_worker_died_while_running_is_resumed_on_redelivery(ann):
    job = start(succeed, ann)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING, started_at=timezone.now())
    job = run(succeed, job, "again")
    assert calls == [("succeed", "again")]
    assert job.status == Job.Status.SUCCEEDED and job.message == "Built again"


def test_a_result_arriving_after_the_job_ended_does_not_change_it(ann):
    job = run(swept_meanwhile, start(swept_meanwhile, ann))
    assert job.status == Job.Status.FAILED and job.message == "ended by the sweep"


def test_an_unknown_job_id_is_ignored(ann):
    import uuid

    succeed.apply(args=[str(uuid.uuid4()), "x"])
    assert calls == [] and not Job.objects.exists()


# --- the sweep -----------------------------------------------------------------------


def make_job(label, status, *, created_ago=0, started_ago=None, finished_ago=None, time_limit=120, user=None):
    now = timezone.now()
    return Job.objects.create(
        kind="tests.sweep", label=label, status=status, user=user, time_limit=time_limit,
        created_at=now - timedelta(seconds=created_ago),
        started_at=None if started_ago is None else now - timedelta(seconds=started_ago),
        finished_at=None if finished_ago is None else now - timedelta(seconds=finished_ago),
    )


def test_sweep_fails_stuck_jobs_and_leaves_fresh_ones(ann):
    limit, grace = 120, jobs.GRACE_SECONDS
    dead_runner = make_job("dead runner", Job.Status.RUNNING, created_ago=1000, started_ago=limit + grace + 5, user=ann)
    slow_runner = make_job("slow runner", Job.Status.RUNNING, created_ago=1000, started_ago=limit + grace - 30)
    fresh_runner = make_job("fresh runner", Job.Status.RUNNING, created_ago=10, started_ago=5)
    lost_in_queue = make_job("lost in queue", Job.Status.QUEUED, created_ago=3600 + 60)
    waiting = make_job("waiting", Job.Status.QUEUED, created_ago=3600 - 60)
    done = make_job("done", Job.Status.SUCCEEDED, created_ago=5000, started_ago=5000, finished_ago=4000)

    assert jobs.sweep() == 2

    for job in (dead_runner, lost_in_queue):
        job.refresh_from_db()
        assert job.status == Job.Status.FAILED
        assert job.message == f"{job.label}: the worker stopped before finishing"
        assert job.finished_at is not None
    for job, status in ((slow_runner, "running"), (fresh_runner, "running"), (waiting, "queued")):
        job.refresh_from_db()
        assert (job.status, job.message, job.finished_at) == (status, "", None), job.label
    done_finished_at = done.finished_at
    done.refresh_from_db()
    assert (done.status, done.message, done.finished_at) == ("succeeded", "", done_finished_at)

    # A second sweep finds nothing new; the dead job's late task does not run.
    assert jobs.sweep() == 0
    succeed.apply(args=[str(lost_in_queue.id), "late"])
    assert calls == []


def test_sweep_uses_each_jobs_own_time_limit():
    long_build = make_job("long build", Job.Status.RUNNING, started_ago=900, time_limit=1800)
    short_mail = make_job("short mail", Job.Status.RUNNING, started_ago=900, time_limit=60)
    assert jobs.sweep() == 1
    long_build.refresh_from_db()
    short_mail.refresh_from_db()
    assert (long_build.status, short_mail.status) == ("running", "failed")


def test_sweep_prunes_jobs_finished_a_month_ago():
    old = make_job("old", Job.Status.SUCCEEDED, created_ago=40 * 86400, finished_ago=31 * 86400)
    recent = make_job("recent", Job.Status.FAILED, created_ago=30 * 86400, finished_ago=29 * 86400)
    jobs.sweep()
    assert list(Job.objects.values_list("label", flat=True)) == ["recent"]
    assert not Job.objects.filter(pk=old.pk).exists() and Job.objects.filter(pk=recent.pk).exists()


def test_sweep_accepts_a_given_now():
    job = make_job("running", Job.Status.RUNNING, started_ago=0, time_limit=60)
    assert jobs.sweep(now=timezone.now() + timedelta(seconds=59 + jobs.GRACE_SECONDS)) == 0
    assert jobs.sweep(now=timezone.now() + timedelta(seconds=61 + jobs.GRACE_SECONDS)) == 1
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED


def test_the_scheduled_sweep_task():
    make_job("lost", Job.Status.QUEUED, created_ago=7200)
    assert sweep_jobs.apply().get(timeout=10) == 1


# --- the user is told ----------------------------------------------------------------


class Listener:
    """A browser tab's view of the channel layer: joined to one user's group."""

    def __init__(self, user_id):
        self.layer = get_channel_layer()
        self.channel = async_to_sync(self.layer.new_channel)()
        async_to_sync(self.layer.group_add)(f"user.{user_id}", self.channel)

    def receive(self, timeout=5.0):
        async def go():
            return await asyncio.wait_for(self.layer.receive(self.channel), timeout)

        return async_to_sync(go)()

    def nothing_within(self, seconds=0.5) -> bool:
        try:
            self.receive(seconds)
        except (asyncio.TimeoutError, TimeoutError):
            return True
        return False


def test_the_user_is_notified_when_the_job_succeeds(ann):
    tab = Listener(ann.pk)
    job = run(succeed, start(succeed, ann), "v3")
    message = tab.receive()
    assert message["type"] == "push"
    event = message["event"]
    assert event["type"] == "notify" and event["level"] == "success"
    assert event["message"] == "Built v3" and event["link"] == "/somewhere/"
    assert event["job"] == {"id": str(job.id), "kind": "tests.build", "label": "Build ann's experiment",
                            "status": "succeeded"}
    assert tab.nothing_within()  # one notification per job


def test_the_user_is_notified_when_the_job_fails_and_others_are_not(ann, bob):
    ann_tab, bob_tab = Listener(ann.pk), Listener(bob.pk)
    run(refuse, start(refuse, ann), "no room left")
    event = ann_tab.receive()["event"]
    assert event["level"] == "danger"
    assert event["message"] == "Build ann's experiment: no room left"
    assert event["job"]["status"] == "failed"
    assert bob_tab.nothing_within()


def test_a_swept_job_is_announced_and_a_redelivery_is_not(ann):
    tab = Listener(ann.pk)
    job = make_job("stuck", Job.Status.RUNNING, started_ago=10_000, user=ann)
    jobs.sweep()
    assert tab.receive()["event"]["message"] == "stuck: the worker stopped before finishing"
    succeed.apply(args=[str(job.id), "again"])
    assert tab.nothing_within()


# --- what the user sees on the dashboard ----------------------------------------------


def test_recent_jobs_show_the_outcome_to_their_owner_only(ann, bob):
    run(succeed, start(succeed, ann, label="Build one"), "one")
    run(refuse, start(refuse, ann, label="Build two"), "broken requirements.txt")
    start(quiet, ann, label="Build three")
    client = Client()
    client.force_login(ann)
    body = client.get("/jobs/recent/").content.decode()
    assert 'data-status="succeeded"' in body and "Built one" in body
    assert 'data-status="failed"' in body and "Build two: broken requirements.txt" in body
    assert 'data-status="queued"' in body and "Build three" in body

    other = Client()
    other.force_login(bob)
    body = other.get("/jobs/recent/").content.decode()
    assert "Nothing has run for you yet." in body and "Build" not in body
