"""Restoring and uploading backups through the pages and the API, as each persona: who may
restore which backup (the owner's own, a deleted instance's included; lab managers any;
others 404), the confirmation page's words, restore into a new instance (lab managers),
uploads (stored 0600 under a generated name, the header checked, refused over
LAB_BACKUP_UPLOAD_MAX_MB with nothing kept). The jobs themselves run against real
instances in tests/instances/test_restore.py."""

import io

import pytest
from django.test import Client

from instances.backups import backup_dir
from instances.git import webcap
from instances.models import Backup, Instance
from manager.accounts import services as accounts
from manager.audit.models import AuditEvent
from manager.jobs.models import Job

pytestmark = pytest.mark.django_db


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def api(user) -> Client:
    _, raw = accounts.create_token(user, name="restore-pages")
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


def dump_backup(instance, owner, name="ann-study-kept.dump", **fields) -> Backup:
    row = Backup.objects.create(instance=instance, instance_name=instance.name if instance else "gone",
                                owner=owner, kind="manual", status="done", filename=name, size=6, **fields)
    row.path.write_bytes(b"PGDMP\x01")
    return row


def leftovers() -> list[str]:
    return sorted(p.name for p in backup_dir().iterdir() if p.name.startswith(".upload-"))


def test_the_restore_page_says_what_happens_and_starts_the_job(instance, ann, bob):
    kept = dump_backup(instance, ann)
    page = logged_in(ann).get(f"/instances/ann-study/backups/{kept.pk}/restore/")
    text = page.content.decode()
    assert page.status_code == 200
    for words in ("fresh backup", "replaced", "restarts", "stays as it was"):
        assert words in text, words
    detail = logged_in(ann).get("/instances/ann-study/").content.decode()
    assert f"/instances/ann-study/backups/{kept.pk}/restore/" in detail and 'id="backup-upload"' in detail
    done = logged_in(ann).post(f"/instances/ann-study/backups/{kept.pk}/restore/")
    assert done.status_code == 302
    job = Job.objects.get(kind="instance.restore")
    assert job.user == ann and kept.filename in job.label
    assert AuditEvent.objects.filter(action="instance.restore", actor=ann).exists()
    # bob sees neither the instance nor the backup
    assert logged_in(bob).get(f"/instances/ann-study/backups/{kept.pk}/restore/").status_code == 404


def test_who_may_restore_which_backup(instance, boss, ann, bob):
    """The owner: her own instances' backups and those of her deleted instances (via the
    backup's owner); bob's backup is 404 to her; lab managers any."""
    mine_deleted = dump_backup(None, ann, name="ann-old-final.dump")
    bobs = dump_backup(None, bob, name="bob-old-final.dump")
    url = "/api/v1/instances/ann-study/restore"
    assert api(ann).post(url, {"backup": mine_deleted.pk}, content_type="application/json").status_code == 202
    refused = api(ann).post(url, {"backup": bobs.pk}, content_type="application/json")
    assert refused.status_code == 404 and "no backup" in refused.json()["detail"]
    assert api(boss).post(url, {"backup": bobs.pk}, content_type="application/json").status_code == 202
    assert api(bob).post(url, {"backup": bobs.pk}, content_type="application/json").status_code == 404
    forced = api(ann).post(url + "?force=true", {"backup": mine_deleted.pk}, content_type="application/json")
    assert forced.status_code == 202
    assert AuditEvent.objects.filter(action="instance.restore", data__force=True).count() == 1
    assert Job.objects.filter(kind="instance.restore").count() == 3


def test_a_wrong_kind_is_refused_with_its_reason_on_the_page_and_in_the_api(instance, ann):
    lite = Backup.objects.create(instance=instance, instance_name="ann-study", owner=ann, kind="manual",
                                 status="done", filename="ann-study-x.sqlite3", size=16)
    lite.path.write_bytes(b"SQLite format 3\x00" + b"\0" * 100)
    page = logged_in(ann).post(f"/instances/ann-study/backups/{lite.pk}/restore/")
    assert page.status_code == 422 and "is an SQLite database, but the instance has a PostgreSQL database" \
        in page.content.decode()
    answer = api(ann).post("/api/v1/instances/ann-study/restore", {"backup": lite.pk}, content_type="application/json")
    assert answer.status_code == 422 and answer.json()["detail"].startswith("backup: ann-study-x.sqlite3 is an SQLite")
    assert not Job.objects.filter(kind="instance.restore").exists()


def test_restore_into_a_new_instance_is_for_lab_managers(instance, boss, ann):
    kept = dump_backup(instance, ann)
    page = logged_in(boss).get(f"/backups/{kept.pk}/restore/")
    assert page.status_code == 200 and "Restore into a new instance" in page.content.decode()
    assert logged_in(ann).get(f"/backups/{kept.pk}/restore/").status_code == 403
    taken = logged_in(boss).post(f"/backups/{kept.pk}/restore/", {"target": "new", "name": "ann-study",
                                                                  "owner": ann.pk})
    assert taken.status_code == 422 and "already exists" in taken.content.decode()
    made = logged_in(boss).post(f"/backups/{kept.pk}/restore/", {"target": "new", "name": "ann-copy",
                                                                 "owner": ann.pk})
    assert made.status_code == 302 and made["Location"] == "/instances/ann-copy/"
    copy = Instance.objects.get(name="ann-copy")
    assert copy.owner == ann
    # one job creates it and restores (no separate creation job)
    [job] = Job.objects.filter(link="/instances/ann-copy/")
    assert job.kind == "instance.restore"


def test_upload_stores_a_dump_under_a_generated_name(instance, ann):
    upload = io.BytesIO(b"PGDMP" + b"\x01" * 1000)
    upload.name = "../../etc/evil name.dump"
    answer = logged_in(ann).post("/instances/ann-study/backups/upload/", {"file": upload})
    assert answer.status_code == 302
    row = Backup.objects.get(kind="upload")
    assert row.status == "done" and row.size == 1005 and row.owner == ann and row.created_by == ann
    assert row.filename.startswith("ann-study-") and row.filename.endswith("-upload-" + row.filename[-11:-5] + ".dump")
    assert "evil" not in row.filename and (row.path.stat().st_mode & 0o777) == 0o600
    assert row.path.read_bytes() == b"PGDMP" + b"\x01" * 1000
    assert leftovers() == []
    # Not a backup: the page again with the reason, nothing kept
    text = io.BytesIO(b"hello, I am a CSV\n")
    refused = logged_in(ann).post("/instances/ann-study/backups/upload/", {"file": text})
    assert refused.status_code == 422 and "neither a PostgreSQL dump" in refused.content.decode()
    assert Backup.objects.filter(kind="upload").count() == 1 and leftovers() == []


def test_an_upload_over_the_limit_is_refused_as_it_arrives(instance, boss, ann, settings):
    settings.LAB_BACKUP_UPLOAD_MAX_MB = 1
    big = b"PGDMP" + b"\0" * (1024 * 1024)
    answer = api(ann).post("/api/v1/instances/ann-study/backups", {"file": io.BytesIO(big)})
    assert answer.status_code == 413 and "LAB_BACKUP_UPLOAD_MAX_MB" in answer.json()["detail"], answer.content
    page = logged_in(ann).post("/instances/ann-study/backups/upload/", {"file": io.BytesIO(big)})
    assert page.status_code == 413 and "larger than the 1 MB" in page.content.decode()
    managers = logged_in(boss).post("/backups/upload/", {"instance": "ann-study", "file": io.BytesIO(big)})
    assert managers.status_code == 413
    assert not Backup.objects.filter(kind="upload").exists() and leftovers() == []
    # just under: taken
    ok = api(ann).post("/api/v1/instances/ann-study/backups", {"file": io.BytesIO(big[:1024 * 1024])})
    assert ok.status_code == 201 and ok.json()["kind"] == "upload" and ok.json()["size"] == 1024 * 1024


def test_the_web_server_lets_uploads_through_up_to_the_limit(settings):
    settings.LAB_BACKUP_UPLOAD_MAX_MB = 300
    cap = 300 * 1024 * 1024 + 1024 * 1024
    for path in (b"/api/v1/instances/ann-study/backups", b"/instances/ann-study/backups/upload/",
                 b"/backups/upload/"):
        assert webcap.body_cap(b"POST", path) == cap
    assert webcap.body_cap(b"POST", b"/api/v1/instances/ann-study/restore") == webcap.OTHER_MAX_BYTES
    assert b"LAB_BACKUP_UPLOAD_MAX_MB" in webcap.too_large(cap, b"POST", b"/backups/upload/")


def test_a_live_session_asks_first_and_force_goes_ahead(instance, ann):
    """The session guard (instances.sessions): a restore while a session is live is 409 in
    the API and a confirmation on the page; forced, the job starts and the audit log says so."""
    from django.utils import timezone

    Instance.objects.filter(pk=instance.pk).update(sessions_checked_at=timezone.now(), otree_sessions=[
        {"code": "live1", "config": "guess", "participants": 3, "started": 3, "finished": 0, "active": 2,
         "last_activity": "2026-12-03T10:00:00+00:00", "live": True}])
    kept = dump_backup(instance, ann)
    url = "/api/v1/instances/ann-study/restore"
    refused = api(ann).post(url, {"backup": kept.pk}, content_type="application/json")
    assert refused.status_code == 409 and "live1" in refused.json()["detail"], refused.content
    assert "restoring a backup" in refused.json()["detail"].lower()
    page = logged_in(ann).post(f"/instances/ann-study/backups/{kept.pk}/restore/")
    assert page.status_code == 409 and 'id="do-it-anyway"' in page.content.decode()
    assert not Job.objects.filter(kind="instance.restore").exists()
    forced = logged_in(ann).post(f"/instances/ann-study/backups/{kept.pk}/restore/", {"force": "1"})
    assert forced.status_code == 302
    assert api(ann).post(url + "?force=true", {"backup": kept.pk}, content_type="application/json").status_code == 202
    assert Job.objects.filter(kind="instance.restore").count() == 2
    assert AuditEvent.objects.filter(action="instance.restore", summary__contains="forced while").count() == 2


def test_an_upload_nobody_keeps_leaves_no_file(instance, bob):
    """Posted where it is not kept (bob may not see the instance: 404; an API call that takes
    no file): the temporary file goes with the request."""
    dump = io.BytesIO(b"PGDMP" + b"\x02" * 5000)
    assert api(bob).post("/api/v1/instances/ann-study/backups", {"file": dump}).status_code == 404
    dump.seek(0)
    assert logged_in(bob).post("/instances/ann-study/backups/upload/", {"file": dump}).status_code == 404
    dump.seek(0)
    assert logged_in(bob).post("/settings/keys/", {"file": dump, "key": "x"}).status_code in (200, 422)
    assert leftovers() == [] and not Backup.objects.exists()


def test_the_sweep_removes_uploads_a_killed_web_process_left():
    import os
    import time

    from instances import uploads

    stale, fresh = backup_dir() / ".upload-old.partial", backup_dir() / ".upload-new.partial"
    for path in (stale, fresh):
        path.write_bytes(b"PGDMP")
    os.utime(stale, (time.time() - uploads.STALE_SECONDS - 60,) * 2)
    assert uploads.sweep_stale() == 1
    assert not stale.exists() and fresh.exists()
    fresh.unlink()
