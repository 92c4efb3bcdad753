"""Scheduled backups as a lab lives with them: a real Celery beat and worker (subprocesses on
the test's database and Redis) back up real Docker instances every few seconds
(LAB_BACKUP_INTERVAL=2s, LAB_BACKUP_CHECK_SECONDS=1), prune them to the configured number,
copy them to a second folder, skip an instance whose lock is busy and catch up at the next
pass, keep going when one instance's database is down (its failure and the overdue flag on
the Backups page), report a second folder that cannot be written and copy again once it
can, and follow a lab manager's per-instance override (0 = off; the owner gets 403).

Beat runs only the backup schedule here (the minute's sweeps would restart the stopped
database this test breaks on purpose). The instances have no oTree app: a database is all
a backup needs.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone as dt_timezone
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone

from instances import schedule, services
from instances.backups import backup_dir
from instances.models import Backup, Instance
from manager import locks
from manager.accounts.services import create_token
from manager.jobs.models import Job
from tests import backends
from tests.db_helpers import database_url
from tests.waits import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

INTERVAL, CHECK, KEEP_DAILY = 2, 1, 2

BEAT = """
import os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "manager.settings")
import django
django.setup()
from manager.celery import app
app.conf.beat_schedule = {"backup-schedule": app.conf.beat_schedule["backup-schedule"]}
app.Beat(schedule=sys.argv[1], loglevel="INFO").run()
"""


def noon_zone() -> str:
    """A time zone where it is about noon now: the test's backups and yesterday's stay on
    their own days whatever the hour of the run (retention counts days there)."""
    offset = 12 - datetime.now(dt_timezone.utc).hour
    return f"Etc/GMT{-offset:+d}"


class Celery:
    """A Celery worker and beat as labserver starts them, output in files."""

    def __init__(self, folder: Path, env: dict):
        self.folder = folder
        self.procs = {}
        py = sys.executable
        commands = {
            "worker": [py, "-m", "celery", "-A", "manager", "worker", "-l", "INFO", "-c", "2", "-P", "prefork",
                       "-n", f"schedule-test-{os.getpid()}@%h"],
            "beat": [py, "-c", BEAT, str(folder / "beat-schedule")],
        }
        for name, command in commands.items():
            log = open(folder / f"{name}.log", "wb")
            self.procs[name] = subprocess.Popen(command, cwd=django_settings.BASE_DIR, env=env, stdout=log,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
            log.close()

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def tails(self) -> str:
        return "\n".join(f"--- {name}:\n" + "\n".join(self.log(name).splitlines()[-40:]) for name in self.procs)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def docker():
    backends.require("docker")
    runtime = backends.make("docker")
    yield runtime
    for name in runtime.owned_instances():
        runtime.remove(name)


@pytest.fixture
def lab(transactional_db, docker, settings, tmp_path):
    """The worker and beat with the schedule's settings (the test's own process has the
    same, for the pages it opens)."""
    zone = noon_zone()
    share = tmp_path / "share"
    share.mkdir()
    values = {"LAB_RUNTIME": "docker", "LAB_BACKUP_INTERVAL": f"{INTERVAL}s", "LAB_BACKUP_CHECK_SECONDS": str(CHECK),
              "LAB_BACKUP_KEEP_DAILY": str(KEEP_DAILY), "LAB_BACKUP_KEEP_WEEKLY": "0",
              "LAB_BACKUP_COPY_DIR": str(share), "LAB_TIME_ZONE": zone}
    settings.LAB_RUNTIME, settings.LAB_BACKUP_INTERVAL, settings.LAB_BACKUP_CHECK_SECONDS = "docker", INTERVAL, CHECK
    settings.LAB_BACKUP_KEEP_DAILY, settings.LAB_BACKUP_KEEP_WEEKLY = KEEP_DAILY, 0
    settings.LAB_BACKUP_COPY_DIR, settings.TIME_ZONE = str(share), zone
    from manager.celery import app

    app.control.purge()  # nothing an earlier test enqueued
    celery = Celery(tmp_path, {**os.environ, "DATABASE_URL": database_url(), **values})
    celery.share = share
    try:
        yield celery
    finally:
        celery.stop()


def scheduled(name: str, **filters):
    return Backup.objects.filter(instance_name=name, kind=Backup.Kind.SCHEDULED, **filters)


def jobs_of(name: str):
    return Job.objects.filter(kind=schedule.JOB_KIND, label=f"Scheduled backup of {name}")


def fake_backup(instance, name: str, age: timedelta, kind=Backup.Kind.SCHEDULED) -> Backup:
    """A finished backup written `age` ago (its file: a few bytes)."""
    row = Backup.objects.create(instance=instance, instance_name=instance.name, owner=instance.owner, kind=kind,
                                status=Backup.Status.DONE, filename=name, size=5, created_at=timezone.now() - age)
    row.path.write_bytes(b"PGDMP")
    return row


def schedule_row(user, name: str) -> str:
    client = Client()
    client.force_login(user)
    page = client.get("/backups/").content.decode()
    start = page.find(f'id="schedule-{name}"')
    assert start >= 0, f"{name} is not on the Backups page"
    return page[start:page.find("</tr>", start)]


def test_scheduled_backups_under_celery_beat(lab, docker, boss, ann):
    one = services.create_instance(boss, name="sb-one", owner=ann)
    broken = services.create_instance(boss, name="sb-broken", owner=ann)
    yesterday = fake_backup(one, "sb-one-yesterday-scheduled.dump", timedelta(days=1))
    older = fake_backup(one, "sb-one-3days-scheduled.dump", timedelta(days=3))
    manual = fake_backup(one, "sb-one-old-manual.dump", timedelta(days=30), kind=Backup.Kind.MANUAL)

    def status(instance):
        instance.refresh_from_db()
        return instance.status

    wait_until(lambda: status(one) == status(broken) == "ready_for_code", 120, 0.2,
               lambda: f"both instances set up ({one.status}, {broken.status})\n{lab.tails()}")

    # Every 2 s a scheduled backup of each; several appear, one after another.
    seen = set()

    def real_backups():
        seen.update(scheduled("sb-one", status="done").exclude(pk__in=[yesterday.pk, older.pk])
                    .values_list("filename", flat=True))
        return len(seen) >= 3 and jobs_of("sb-one").filter(status="succeeded",
                                                            message__contains="scheduled backup").count() >= 3

    wait_until(real_backups, 60, 0.2, lambda: f"three scheduled backups of sb-one, their jobs done\n{lab.tails()}")

    # Retention (2 daily, 0 weekly): today's newest and yesterday's; the one of three days
    # ago and today's older ones go, with their files and copies; the manual backup stays.
    share = lab.share / "sb-one"

    def pruned():
        rows = list(scheduled("sb-one", status="done"))
        names = {r.filename for r in rows}
        copies = set(os.listdir(share)) if share.exists() else set()
        return (len(rows) == 2 and yesterday.filename in names and all(r.copied_at for r in rows)
                and copies == names | {manual.filename}) and rows

    rows = wait_until(pruned, 30, 0.1, lambda: f"sb-one pruned to 2 scheduled backups, copies alike\n{lab.tails()}")
    newest = max(rows, key=lambda r: r.created_at)
    assert newest.filename != yesterday.filename and newest.path.exists() and newest.size > 0
    assert (share / newest.filename).read_bytes() == newest.path.read_bytes()
    assert oct((share / newest.filename).stat().st_mode & 0o777) == "0o600"
    assert not Backup.objects.filter(pk=older.pk).exists() and not older.path.exists()
    assert not (share / older.filename).exists()
    gone = seen - {r.filename for r in scheduled("sb-one")}
    assert gone and not any((backup_dir() / g).exists() or (share / g).exists() for g in gone)
    assert Backup.objects.filter(pk=manual.pk).exists() and manual.path.exists()

    # A database that is down: its backups fail (a failed row, the job says why), the other
    # instance is backed up all the same, and the Backups page flags it.
    docker.stop("sb-broken")
    wait_until(lambda: jobs_of("sb-broken").filter(status="failed").exists(), 30, 0.2,
               lambda: f"a failed scheduled backup of sb-broken\n{lab.tails()}")
    assert "the database of sb-broken is not running" in jobs_of("sb-broken").filter(status="failed").first().message
    done_before = jobs_of("sb-one").filter(status="succeeded").count()
    wait_until(lambda: jobs_of("sb-one").filter(status="succeeded").count() >= done_before + 2, 30, 0.2,
               "sb-one backed up while sb-broken fails")
    failed_rows = scheduled("sb-broken", status="failed")
    assert failed_rows.count() == 1  # tried again every interval: only the newest failure is kept
    wait_until(lambda: 'data-overdue="true"' in schedule_row(ann, "sb-broken"), 20, 0.5, "sb-broken overdue")
    row = schedule_row(ann, "sb-broken")
    assert "last scheduled backup failed" in row
    assert 'data-overdue="false"' in schedule_row(ann, "sb-one")

    # A busy instance lock (a reset, a restore, another backup): the pass skips, the next
    # pass catches up once it is free.
    one.refresh_from_db()
    with locks.lock(f"instance:{one.pk}"):
        held_since = timezone.now()
        wait_until(lambda: jobs_of("sb-one").filter(created_at__gt=held_since, status="succeeded",
                                                   message__startswith="skipped").exists(),
                   20, 0.2, lambda: f"a skipped scheduled backup of sb-one\n{lab.tails()}")
        assert not scheduled("sb-one").filter(created_at__gt=held_since).exists()
    released = timezone.now()
    wait_until(lambda: scheduled("sb-one", status="done", created_at__gt=released).exists(), 20, 0.2,
               "sb-one backed up once its lock is free")

    # The second folder cannot be written (the share is not mounted: a file stands there):
    # the backup is kept, its copy is reported missing; once it is back, the pass copies.
    moved = lab.share.with_name("share-away")
    lab.share.rename(moved)
    lab.share.write_text("not a folder")
    broken_since = timezone.now()
    job = wait_until(lambda: jobs_of("sb-one").filter(created_at__gt=broken_since, status="succeeded",
                                                      message__contains="FAILED").first(), 20, 0.2,
                     lambda: f"a backup whose copy failed\n{lab.tails()}")
    assert "the copy to the second folder FAILED" in job.message
    uncopied = scheduled("sb-one", status="done", copied_at__isnull=True).first()
    assert uncopied is not None and uncopied.path.exists()
    assert 'data-copy="missing"' in schedule_row(boss, "sb-one")
    assert "copying backup" in lab.log("worker") and "LAB_BACKUP_COPY_DIR" in lab.log("worker")
    lab.share.unlink()
    moved.rename(lab.share)
    wait_until(lambda: 'data-copy="done"' in schedule_row(boss, "sb-one"), 20, 0.3,
               lambda: f"the missing copies made by the next pass\n{lab.tails()}")
    assert not Backup.objects.filter(status="done", copied_at__isnull=True).exclude(filename="").exists()

    # The per-instance override: not the owner's (403); a lab manager turns it off.
    def patch(user, body):
        token = create_token(user, name="t")[1]
        return Client(HTTP_AUTHORIZATION=f"Bearer {token}").patch("/api/v1/instances/sb-one", body,
                                                                  content_type="application/json")

    assert patch(ann, {"backup_interval_minutes": 0}).status_code == 403
    response = patch(boss, {"backup_interval_minutes": 0})
    assert response.status_code == 200 and response.json()["backup_schedule"]["interval_seconds"] == 0
    off_since = timezone.now()
    time.sleep(INTERVAL + 1)  # a job started just before the change may still finish
    count = scheduled("sb-one").count()
    failures = jobs_of("sb-broken").count()
    wait_until(lambda: jobs_of("sb-broken").count() >= failures + 2, 30, 0.2, "two more passes")
    assert scheduled("sb-one").count() == count, "sb-one was backed up after its schedule was turned off"
    row = schedule_row(ann, "sb-one")
    assert ">off<" in row and 'data-overdue="false"' in row
    assert Instance.objects.get(name="sb-one").status == "ready_for_code"  # nothing restarted
    assert not jobs_of("sb-one").filter(created_at__gt=off_since + timedelta(seconds=INTERVAL + 1)).exists()
