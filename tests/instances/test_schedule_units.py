"""Scheduled backups without a worker: the retention's choice (a pure function), the
schedule's rules, the copy to the second folder, and what the Backups page and the API
say. The schedule under real Celery beat and a real instance: test_backup_schedule.py."""

import logging
import os
import stat
from datetime import datetime, timedelta, timezone as dt_timezone
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone

from instances import backups, schedule
from instances.models import Backup
from manager import locks
from manager.accounts.services import NotAllowed, create_token
from manager.env import parse_duration

UTC = dt_timezone.utc


def at(text: str, tz=UTC) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=tz)


def keep(pairs, daily, weekly, tz=UTC) -> list[str]:
    """The kept keys of `pairs` (key, "YYYY-MM-DD HH:MM" in UTC), sorted."""
    return sorted(schedule.to_keep([(k, at(t)) for k, t in pairs], daily, weekly, tz))


# --- retention ----------------------------------------------------------------------------

def test_several_a_day_keep_the_newest_of_each_day():
    pairs = [("a1", "2026-12-01 02:00"), ("a2", "2026-12-01 14:00"), ("a3", "2026-12-01 23:59"),
             ("b1", "2026-12-02 00:00"), ("b2", "2026-12-02 09:00"), ("c1", "2026-12-03 08:00")]
    assert keep(pairs, 7, 0) == ["a3", "b2", "c1"]
    assert keep(pairs, 2, 0) == ["b2", "c1"]  # the 2 most recent days
    assert keep(pairs, 1, 0) == ["c1"]


def test_days_without_a_backup_do_not_count():
    """N days that have one, not the last N calendar days: a pause keeps older backups."""
    pairs = [("d1", "2026-11-01 10:00"), ("d5", "2026-11-05 10:00"), ("d9", "2026-11-09 10:00"),
             ("d10", "2026-11-10 10:00")]
    assert keep(pairs, 3, 0) == ["d10", "d5", "d9"]


def test_weeks_are_iso_weeks_monday_to_sunday():
    pairs = [("sun", "2026-11-29 23:30"),  # Sunday: ISO week 48
             ("mon", "2026-11-30 00:30"),  # Monday: week 49
             ("wed", "2026-12-02 12:00"),  # week 49
             ("prev", "2026-11-23 12:00")]  # Monday of week 48
    assert keep(pairs, 0, 2) == ["sun", "wed"]  # newest of week 49 and of week 48
    assert keep(pairs, 0, 3) == ["sun", "wed"]  # only two weeks have one
    # ISO weeks across the new year: 2026-12-31 (Thursday) and 2027-01-01 (Friday) are both
    # in week 53 of 2026; 2027-01-04 (Monday) starts week 1 of 2027.
    pairs = [("thu", "2026-12-31 10:00"), ("fri", "2027-01-01 10:00"), ("mon", "2027-01-04 10:00")]
    assert keep(pairs, 0, 2) == ["fri", "mon"]
    assert keep(pairs, 0, 1) == ["mon"]


def test_days_and_weeks_together_are_the_union():
    pairs = [(f"n{i}", f"2026-11-{i:02d} 12:00") for i in range(1, 31)]  # one a day in November
    # 3 days: 28, 29, 30; 3 ISO weeks: Mon 30 (week 49), Sun 29 (week 48), Sun 22 (week 47)
    assert keep(pairs, 3, 3) == ["n22", "n28", "n29", "n30"]
    assert keep(pairs, 1, 4) == ["n15", "n22", "n29", "n30"]


def test_zero_daily_or_zero_of_both():
    pairs = [("x", "2026-12-01 10:00"), ("y", "2026-12-02 10:00"), ("z", "2026-12-03 10:00")]
    assert keep(pairs, 0, 1) == ["z"]
    assert keep(pairs, 0, 0) == ["z"]  # the newest is always kept: never delete what was just written
    assert keep([], 7, 4) == []


def test_days_are_the_labs_time_zone():
    """23:30 UTC is the next day in Berlin: two backups of one UTC day are two days there."""
    pairs = [("early", "2026-12-01 10:00"), ("late", "2026-12-01 23:30")]
    assert keep(pairs, 2, 0) == ["late"]
    assert keep(pairs, 2, 0, ZoneInfo("Europe/Berlin")) == ["early", "late"]


def test_same_time_ties_pick_one_deterministically():
    pairs = [(1, "2026-12-01 10:00"), (2, "2026-12-01 10:00")]
    assert sorted(schedule.to_keep([(k, at(t)) for k, t in pairs], 1, 0, UTC)) == [2]


# --- the schedule's rules --------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("24h", 86400), ("30m", 1800), ("7d", 604800), ("90s", 90), ("0", 0),
                                           ("2H", 7200)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["24", "h", "1.5h", "-1h", "1 day", "1w", "", "٣h"])
def test_not_durations(text):
    assert parse_duration(text) is None


def test_the_effective_schedule_and_its_labels(instance, settings):
    settings.LAB_BACKUP_INTERVAL, settings.LAB_BACKUP_KEEP_DAILY, settings.LAB_BACKUP_KEEP_WEEKLY = 86400, 7, 4
    assert str(schedule.schedule_of(instance)) == "every 24 h, keep 7 daily, 4 weekly"
    assert not schedule.schedule_of(instance).own
    instance.backup_keep_weekly = 0
    assert str(schedule.schedule_of(instance)) == "every 24 h, keep 7 daily, 0 weekly"
    instance.backup_interval_minutes = 0
    assert schedule.schedule_of(instance).off and str(schedule.schedule_of(instance)) == "off"
    instance.backup_interval_minutes = 90
    assert schedule.schedule_of(instance).interval_label == "every 90 min"
    instance.backup_interval_minutes = 14 * 24 * 60
    assert schedule.schedule_of(instance).interval_label == "every 14 d"


def test_only_lab_managers_change_a_schedule_and_values_are_checked(instance, boss, ann):
    with pytest.raises(NotAllowed):
        schedule.update(ann, instance, backup_interval_minutes=60)
    for field, value in [("backup_interval_minutes", -1), ("backup_keep_daily", 1001), ("backup_keep_weekly", 1.5),
                         ("backup_interval_minutes", True)]:
        with pytest.raises(ValidationError) as caught:
            schedule.update(boss, instance, **{field: value})
        assert list(caught.value.message_dict) == [field]
    instance.refresh_from_db()
    assert [getattr(instance, f) for f in schedule.FIELDS] == [None, None, None]
    schedule.update(boss, instance, backup_interval_minutes=0, backup_keep_daily=3)
    instance.refresh_from_db()
    assert (instance.backup_interval_minutes, instance.backup_keep_daily, instance.backup_keep_weekly) == (0, 3, None)
    schedule.update(boss, instance, backup_interval_minutes=None)  # back to the lab's default
    instance.refresh_from_db()
    assert instance.backup_interval_minutes is None and instance.backup_keep_daily == 3


def test_the_page_form_saves_the_schedule_without_a_restart(instance, boss):
    client = Client()
    client.force_login(boss)
    generation = instance.generation
    response = client.post(f"/instances/{instance.name}/backup-schedule/",
                           {"backup_interval_minutes": "720", "backup_keep_daily": "", "backup_keep_weekly": "2"})
    assert response.status_code == 302
    instance.refresh_from_db()
    assert (instance.backup_interval_minutes, instance.backup_keep_daily, instance.backup_keep_weekly) == (720, None, 2)
    assert instance.generation == generation  # no settings change: nothing restarts
    page = client.get(f"/instances/{instance.name}/").content.decode()
    assert "every 12 h" in page and "set for this instance" in page
    owner = Client()
    owner.force_login(instance.owner)
    page = owner.get(f"/instances/{instance.name}/").content.decode()
    assert "Scheduled backups: <strong>every 12 h</strong>" in page and "Save schedule" not in page
    response = client.post(f"/instances/{instance.name}/backup-schedule/",
                           {"backup_interval_minutes": "-5", "backup_keep_daily": "", "backup_keep_weekly": ""})
    assert response.status_code == 422 and "must be a whole number from 0 to" in response.content.decode()


# --- the copy to the second folder --------------------------------------------------------

def done_backup(instance, name, content=b"PGDMP dump", when=None, kind=Backup.Kind.SCHEDULED):
    row = Backup.objects.create(instance=instance, instance_name=instance.name, owner=instance.owner, kind=kind,
                                status=Backup.Status.DONE, filename=name, size=len(content),
                                created_at=when or timezone.now())
    row.path.write_bytes(content)
    return row


def test_a_copy_is_atomic_private_and_recorded(instance, settings, tmp_path):
    settings.LAB_BACKUP_COPY_DIR = str(tmp_path / "share")
    (tmp_path / "share").mkdir()
    row = done_backup(instance, "ann-study-copy.dump", b"x" * 3_000_000)
    assert backups.copy_backup(row)
    copy = tmp_path / "share" / "ann-study" / "ann-study-copy.dump"
    assert copy.read_bytes() == b"x" * 3_000_000
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700
    assert sorted(os.listdir(copy.parent)) == ["ann-study-copy.dump"]  # no temporary file left
    row.refresh_from_db()
    assert row.copied_at is not None
    backups.remove_files(row)
    assert not copy.exists() and not row.path.exists()


def test_a_link_in_the_copy_folder_is_not_followed(instance, settings, tmp_path):
    settings.LAB_BACKUP_COPY_DIR = str(tmp_path / "share")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "ann-study").symlink_to(elsewhere)
    row = done_backup(instance, "ann-study-link.dump")
    assert not backups.copy_backup(row)
    assert list(elsewhere.iterdir()) == []
    row.refresh_from_db()
    assert row.copied_at is None


def test_a_copy_that_fails_keeps_the_backup_and_says_so(instance, settings, tmp_path, caplog):
    settings.LAB_BACKUP_COPY_DIR = str(tmp_path / "not-mounted")
    (tmp_path / "not-mounted").write_text("a file where the share should be")
    row = done_backup(instance, "ann-study-fail.dump")
    with caplog.at_level(logging.WARNING, logger="instances.backups"):
        assert not backups.copy_backup(row)
    assert "copying backup ann-study-fail.dump to LAB_BACKUP_COPY_DIR" in caplog.text
    row.refresh_from_db()
    assert row.copied_at is None and row.status == "done" and row.path.exists()


# --- retention on the rows, the overdue flag, the API ------------------------------------

def test_prune_keeps_other_kinds_and_removes_files(instance, settings):
    settings.LAB_BACKUP_KEEP_DAILY, settings.LAB_BACKUP_KEEP_WEEKLY = 1, 0
    now = timezone.now()
    old = done_backup(instance, "s-old.dump", when=now - timedelta(days=3))
    new = done_backup(instance, "s-new.dump", when=now)
    manual = done_backup(instance, "m-old.dump", when=now - timedelta(days=30), kind=Backup.Kind.MANUAL)
    reset = done_backup(instance, "r-old.dump", when=now - timedelta(days=30), kind=Backup.Kind.BEFORE_RESET)
    failed_before = Backup.objects.create(instance=instance, instance_name=instance.name, kind=Backup.Kind.SCHEDULED,
                                          status=Backup.Status.FAILED, created_at=now - timedelta(days=2))
    assert schedule.prune(instance) == 2
    assert set(Backup.objects.values_list("pk", flat=True)) == {new.pk, manual.pk, reset.pk}
    assert not old.path.exists() and new.path.exists() and manual.path.exists()
    assert not Backup.objects.filter(pk=failed_before.pk).exists()


def test_backups_page_flags_overdue_and_failed_and_shows_only_ones_own(instance, live_release, settings, boss, ann,
                                                                       bob):
    settings.LAB_BACKUP_INTERVAL, settings.LAB_BACKUP_CHECK_SECONDS = 3600, 60
    now = timezone.now()
    done_backup(instance, "ann-study-old.dump", when=now - timedelta(hours=2))
    Backup.objects.create(instance=instance, instance_name=instance.name, kind=Backup.Kind.SCHEDULED,
                          status=Backup.Status.FAILED, created_at=now - timedelta(minutes=5))

    def row(user):
        client = Client()
        client.force_login(user)
        page = client.get("/backups/").content.decode()
        start = page.find('id="schedule-ann-study"')
        return page[start:page.find("</tr>", start)] if start >= 0 else None

    html = row(ann)
    assert 'data-overdue="true"' in html and "last scheduled backup failed" in html and "every 1 h" in html
    assert row(bob) is None  # not bob's
    assert "ann-study-old.dump" not in Client().get("/backups/").content.decode()  # anonymous: the login
    done_backup(instance, "ann-study-new.dump", when=now - timedelta(minutes=1))
    html = row(boss)
    assert 'data-overdue="false"' in html and "failed" not in html
    instance.backup_interval_minutes = 0
    instance.save()
    assert 'data-overdue="false"' in row(boss) and ">off<" in row(boss)


def test_a_stopped_instance_is_neither_due_nor_overdue_until_it_starts(instance, live_release, settings, ann):
    settings.LAB_BACKUP_INTERVAL, settings.LAB_BACKUP_CHECK_SECONDS = 3600, 60
    now = timezone.now()
    done_backup(instance, "ann-study-stale.dump", when=now - timedelta(hours=5))
    assert instance in schedule.due_instances(now)
    instance.desired_running = False
    instance.save()
    assert instance not in schedule.due_instances(now)
    client = Client()
    client.force_login(ann)
    page = client.get("/backups/").content.decode()
    row = page[page.find('id="schedule-ann-study"'):]
    row = row[:row.find("</tr>")]
    assert 'data-overdue="false"' in row and "stopped: not backed up until it starts" in row
    instance.desired_running = True  # started again: due at once (its last backup is 5 h old)
    instance.save()
    assert instance in schedule.due_instances(now)


def test_api_patch_of_the_schedule_lab_managers_only(instance, boss, ann):
    def patch(user, body):
        token = create_token(user, name="t")[1]
        return Client(HTTP_AUTHORIZATION=f"Bearer {token}").patch(
            f"/api/v1/instances/{instance.name}", body, content_type="application/json")

    generation = instance.generation
    response = patch(ann, {"backup_interval_minutes": 0})
    assert response.status_code == 403 and "lab managers" in response.json()["detail"]
    response = patch(boss, {"backup_interval_minutes": 120, "backup_keep_weekly": 0})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["backup_interval_minutes"] == 120 and body["backup_keep_daily"] is None
    assert body["backup_schedule"]["interval_seconds"] == 7200 and body["backup_schedule"]["keep_weekly"] == 0
    instance.refresh_from_db()
    assert instance.generation == generation  # nothing restarts
    assert patch(boss, {"backup_keep_daily": -1}).status_code == 422
    # a wrong schedule value changes nothing else of the same call
    response = patch(boss, {"production": False, "backup_keep_daily": 5000})
    assert response.status_code == 422
    instance.refresh_from_db()
    assert instance.production is True and instance.backup_keep_daily is None
    response = patch(boss, {"backup_interval_minutes": None})
    assert response.status_code == 200 and response.json()["backup_interval_minutes"] is None


def test_the_readmes_example():
    """One backup a day since November, keep 7 daily and 4 weekly, on Wednesday 2026-12-23."""
    pairs = [(day, at("2026-11-01 03:00") + timedelta(days=day)) for day in range(53)]
    kept = schedule.to_keep(pairs, 7, 4, UTC)
    assert sorted(f"{when:%a %d}" for key, when in pairs if key in kept) == sorted(
        ["Thu 17", "Fri 18", "Sat 19", "Sun 20", "Mon 21", "Tue 22", "Wed 23", "Sun 13", "Sun 06"])


def test_the_pass_starts_one_job_at_a_time_the_longest_waiting_first(boss, ann, settings):
    """Jobs recorded, not sent (a `db` test never commits): what run_pass starts and skips."""
    from instances import services, state
    from manager.jobs.models import Job

    settings.LAB_BACKUP_INTERVAL = 3600
    now = timezone.now()
    names = ["sp-a", "sp-b", "sp-c", "sp-off", "sp-new", "sp-gone", "sp-tried"]
    made = {}
    for name in names:
        made[name] = services.create_instance(boss, name=name, owner=ann)
        if name != "sp-new":  # still provisioning: no database to back up yet
            state.set_status(made[name], "running", notify=False)
    done_backup(made["sp-a"], "sp-a.dump", when=now - timedelta(hours=2))
    done_backup(made["sp-b"], "sp-b.dump", when=now - timedelta(hours=5))  # waited longest
    done_backup(made["sp-c"], "sp-c.dump", when=now - timedelta(minutes=5), kind=Backup.Kind.MANUAL)  # not due
    schedule.update(boss, made["sp-off"], backup_interval_minutes=0)
    made["sp-gone"].delete_requested = True
    made["sp-gone"].save()
    Backup.objects.create(instance=made["sp-tried"], instance_name="sp-tried", kind=Backup.Kind.SCHEDULED,
                          status=Backup.Status.FAILED, created_at=now - timedelta(minutes=10))  # retried after 1 h
    for name in ("sp-off", "sp-new", "sp-gone", "sp-tried"):
        done_backup(made[name], f"{name}.dump", when=now - timedelta(days=3), kind=Backup.Kind.MANUAL)
    assert [i.name for i in schedule.due_instances(now)] == ["sp-b", "sp-a"]

    assert schedule.run_pass(now)["started"] == ["sp-b"]
    assert schedule.run_pass(now)["started"] == []  # one in flight at a time
    Job.objects.filter(kind=schedule.JOB_KIND).update(status="succeeded")
    assert schedule.run_pass(now)["started"] == ["sp-b"]  # still due: its job was skipped (busy lock)
    # a job queued longer than its time limit and a minute (its message lost) is not waited for
    Job.objects.filter(kind=schedule.JOB_KIND, status="queued").update(created_at=now - timedelta(minutes=20))
    assert schedule.run_pass(now)["started"] == ["sp-b"]
    with locks.lock("backup-schedule"):
        assert schedule.run_pass(now) == {"skipped": "another pass is running"}
