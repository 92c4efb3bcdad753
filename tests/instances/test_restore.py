"""Restoring backups, on every runtime with a real oTree 6 app (pushed with git, built,
live): participants play pages of a real session over HTTP, the data are backed up, the
database is reset or changed, the backup is restored through the API's job, and oTree's
own export (`GET /api/export_wide`, with the REST key) is byte for byte what it was.
Broken backups (an upload that is a PGDMP header and garbage, a dump cut short that only
fails half-way into pg_restore) are refused or fail with the instance's data unchanged and
its app answering; wrong kinds are refused before anything happens. The process runtime's
SQLite instances restore too; a lab manager restores into a new instance.

One live instance per runtime (builds are slow): each story is one test."""

import io
import shutil
import sqlite3

import pytest
import requests
from django.test import Client

from bots.page import parse
from instances import otree_api, reconciler, releases, services
from instances.git.repos import repo_path
from instances.models import Backup, Instance
from instances.runtime import backend_class
from manager.accounts import services as accounts
from manager.jobs.models import Job
from tests import backends, otree_projects
from tests.job_helpers import record_jobs, run_recorded

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

APP = otree_projects.APP.replace('''class Player(BasePlayer):
    pass


class MyPage(Page):
    pass


page_sequence = [MyPage]''', '''class Player(BasePlayer):
    answer = models.IntegerField(min=0, max=1000)


class MyPage(Page):
    form_model = "player"
    form_fields = ["answer"]


class Results(Page):
    pass


page_sequence = [MyPage, Results]''')
assert "form_fields" in APP


def project() -> dict[str, str]:
    files = otree_projects.valid_project("restore")
    files["hello/__init__.py"] = APP
    files["hello/Results.html"] = "{{ block title }}Thanks{{ endblock }}\n{{ block content }}{{ next_button }}{{ endblock }}\n"
    files["hello/MyPage.html"] = ("{{ block title }}Hello{{ endblock }}\n{{ block content }}{{ formfields }}"
                                  "{{ next_button }}{{ endblock }}\n")
    return files


@pytest.fixture(scope="module", params=["docker", "process", "swarm"])
def runtime(request):
    backends.require(request.param)
    rt = backends.make(request.param)
    yield rt
    for name in rt.owned_instances():
        rt.remove(name)
    if rt.name in ("docker", "swarm"):
        for image in rt.api.images(filters={"label": [f"org.otree-lab.manager={rt.manager_id}"]}):
            rt.api.remove_image(image["Id"], force=True)


queued = {}


@pytest.fixture(autouse=True)
def capture_jobs(monkeypatch):
    record_jobs(monkeypatch, queued)
    yield
    queued.clear()


def go_live(owner, name, tmp_path, files=None) -> Instance:
    instance = Instance.objects.create(name=name, owner=owner, public_port=None, runtime="")
    shutil.rmtree(repo_path(name), ignore_errors=True)
    bare = otree_projects.init_bare(repo_path(name))
    checkout = otree_projects.Checkout(tmp_path / f"{name}-work", bare)
    commit = checkout.push(files or project(), "the restore test project")
    release = releases.record_push(instance, commit=commit, branch="main", pushed_by=owner)
    run_recorded(queued, "instance.deploy")
    release.refresh_from_db()
    assert release.status == "live", (release.status_reason, release.log[-3000:])
    instance.refresh_from_db()
    return instance


def play(instance: Instance, answers: list[int]) -> str:
    """A session of len(answers) participants; each opens its start link, submits its
    answer on MyPage (a real form POST) and goes on past Results (finished: the session is
    not live for the session guard). Returns the session's code."""
    base = otree_api.app_url(instance)
    headers = {otree_api.REST_KEY_HEADER: instance.rest_key}
    made = requests.post(f"{base}/api/sessions", json={"session_config_name": "hello_game",
                                                        "num_participants": len(answers)},
                         headers=headers, timeout=60)
    assert made.status_code in (200, 201), made.text[:300]
    code = made.json()["code"]
    info = requests.get(f"{base}/api/sessions/{code}", headers=headers, timeout=30).json()
    participants = sorted(p["code"] for p in info["participants"])
    assert len(participants) == len(answers)
    for participant, answer in zip(participants, answers):
        with requests.Session() as browser:
            reply = browser.get(f"{base}/InitializeParticipant/{participant}", timeout=30)
            page = parse(reply.text, url=reply.url, path=requests.utils.urlparse(reply.url).path,
                         status_code=reply.status_code)
            assert page.field("answer") is not None, (reply.status_code, reply.text[:300])
            reply = browser.post(page.url, data={**page.hidden, "answer": str(answer)}, timeout=30)
            assert reply.status_code == 200 and "Thanks" in reply.text, reply.text[:300]
            # past the last page: finished (a session whose participants all finished is not live)
            results = parse(reply.text, url=reply.url, path=requests.utils.urlparse(reply.url).path,
                            status_code=reply.status_code)
            reply = browser.post(results.url, data=dict(results.hidden), timeout=30)
            assert reply.status_code == 200 and "Thanks" not in reply.text, reply.text[:300]
    return code


def export(instance: Instance) -> bytes:
    return otree_api.get_bytes(instance, "/api/export_wide", limit=2**24)


def answers_up(instance: Instance) -> bool:
    """oTree answers its start page (a redirect to the login or the demo page)."""
    code = requests.get(otree_api.app_url(instance) + "/", timeout=10, allow_redirects=False).status_code
    assert code < 400, code
    return True


def api(user) -> Client:
    _, raw = accounts.create_token(user, name="restore-test")
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


def run_restore_jobs() -> list[Job]:
    return run_recorded(queued, "instance.restore")


def test_backup_reset_restore_and_what_is_refused(runtime, tmp_path, boss, ann, bob, settings):
    settings.LAB_RUNTIME = runtime.name
    name = f"rs-{runtime.name[:4]}"
    instance = go_live(ann, name, tmp_path)
    client = api(ann)

    # 1. Data of a real session, backed up.
    play(instance, [11, 12])
    before = export(instance)
    assert b"11" in before and b"12" in before
    kept = reconciler.backup_only(instance.pk, ann)
    assert kept.status == "done" and kept.filename.endswith(".dump")

    # 2. More data, then a reset: the export no longer has the first session.
    play(instance, [21])
    reconciler.backup_and_reset(instance.pk, ann)
    assert export(instance) != before

    # 3. Restore through the API: 202 and a job; the export is byte for byte the backed-up one.
    response = client.post(f"/api/v1/instances/{name}/restore", {"backup": kept.pk}, content_type="application/json")
    assert response.status_code == 202, response.content
    assert "a fresh backup first" in response.json()["detail"]
    [job] = run_restore_jobs()
    assert job.status == "succeeded", job.message
    assert export(instance) == before
    fresh = Backup.objects.filter(instance=instance, kind=Backup.Kind.BEFORE_RESTORE).get()
    assert fresh.status == "done" and fresh.filename in job.message and fresh.size > 0
    assert fresh.data_filename and not fresh.data_problem  # oTree's export of the replaced data beside it
    instance.refresh_from_db()
    assert instance.status == "running"

    # 4. What the caller may not see is 404: bob's token, a backup id that does not exist.
    assert api(bob).post(f"/api/v1/instances/{name}/restore", {"backup": kept.pk},
                         content_type="application/json").status_code == 404
    assert client.post(f"/api/v1/instances/{name}/restore", {"backup": 10**9},
                       content_type="application/json").status_code == 404

    # 5. Wrong kinds are refused before anything happens (422, with the reason).
    bundle = Backup.objects.create(instance=None, instance_name=name, owner=ann, kind=Backup.Kind.REPOSITORY,
                                   status="done", filename=f"{name}-history.bundle", size=4)
    bundle.path.write_bytes(b"# v2 git bundle\n")
    failed = Backup.objects.create(instance=instance, instance_name=name, owner=ann, kind="manual", status="failed",
                                   filename=f"{name}-failed.dump")
    missing = Backup.objects.create(instance=instance, instance_name=name, owner=ann, kind="manual", status="done",
                                    filename=f"{name}-gone.dump", size=10)
    lite = tmp_path / "other.sqlite3"
    with sqlite3.connect(lite) as db:
        db.execute("CREATE TABLE t (v)")
    for row, words in ((bundle, "git history"), (failed, "only a complete backup"), (missing, "is missing")):
        refused = client.post(f"/api/v1/instances/{name}/restore", {"backup": row.pk}, content_type="application/json")
        assert refused.status_code == 422 and words in refused.json()["detail"], refused.content
    upload = client.post(f"/api/v1/instances/{name}/backups", {"file": io.BytesIO(lite.read_bytes())})
    assert upload.status_code == 422 and "an SQLite database" in upload.json()["detail"], upload.content
    assert not run_restore_jobs()

    # 6. A corrupt upload (PGDMP and garbage) is kept as an upload, but its restore is refused
    # after pg_restore read it in the database's sandbox: the data are unchanged, the app answers.
    garbage = io.BytesIO(b"PGDMP" + bytes(range(256)) * 64)
    garbage.name = "x.dump"
    upload = client.post(f"/api/v1/instances/{name}/backups", {"file": garbage})
    assert upload.status_code == 201, upload.content
    row = Backup.objects.get(pk=upload.json()["id"])
    assert row.kind == "upload" and row.status == "done" and row.size == 5 + 256 * 64
    assert "x.dump" not in row.filename and (row.path.stat().st_mode & 0o777) == 0o600
    assert client.post(f"/api/v1/instances/{name}/restore", {"backup": row.pk},
                       content_type="application/json").status_code == 202
    [job] = run_restore_jobs()
    assert job.status == "failed" and "restore refused" in job.message and "was not changed" in job.message, \
        job.message
    assert Backup.objects.filter(instance=instance, kind=Backup.Kind.BEFORE_RESTORE).count() == 1  # none taken
    assert answers_up(instance) and export(instance) == before

    # 7. A dump cut short passes the check (its table of contents is whole) and fails inside
    # pg_restore: the live database was never touched.
    cut = Backup.objects.create(instance=instance, instance_name=name, owner=ann, kind="manual", status="done",
                                filename=f"{name}-cut.dump")
    data = kept.path.read_bytes()
    cut.path.write_bytes(data[:len(data) - 200])
    with pytest.raises(reconciler.ReconcileError) as failure:
        reconciler.restore(instance.pk, cut.pk, ann)
    text = str(failure.value)
    assert text.startswith(f"restore failed; {name} is as it was (the backup ") and "pg_restore failed" in text, text
    assert answers_up(instance) and export(instance) == before
    instance.refresh_from_db()
    assert instance.status == "running", instance.status_reason

    # 8. The backup's content with the app changed meanwhile: a new session, then a restore of
    # the upload of the real dump (as a lab would upload a pg_dump made elsewhere).
    play(instance, [31])
    assert export(instance) != before
    real = io.BytesIO(data)
    real.name = "from-elsewhere.dump"
    uploaded = client.post(f"/api/v1/instances/{name}/backups", {"file": real})
    assert uploaded.status_code == 201, uploaded.content
    services.restore_backup(ann, instance, Backup.objects.get(pk=uploaded.json()["id"]))
    [job] = run_restore_jobs()
    assert job.status == "succeeded", job.message
    assert export(instance) == before

    if runtime.name != "docker":
        return
    # 9. Into a new instance (lab managers): created, restored, then deployed with a push;
    # its export is the backed-up one.
    with pytest.raises(services.NotAllowed):
        services.restore_into_new(ann, kept, name="rs-copy", owner=ann)
    copy, job_row = services.restore_into_new(boss, kept, name="rs-copy", owner=bob)
    [job] = run_restore_jobs()
    assert job.pk == job_row.pk and job.status == "succeeded", job.message
    copy.refresh_from_db()
    assert copy.owner == bob and copy.backups.filter(kind=Backup.Kind.BEFORE_RESTORE).exists()
    bare = otree_projects.init_bare(repo_path("rs-copy"))
    commit = otree_projects.Checkout(tmp_path / "copy-work", bare).push(project(), "the same project")
    release = releases.record_push(copy, commit=commit, branch="main", pushed_by=bob)
    run_recorded(queued, "instance.deploy")
    release.refresh_from_db()
    assert release.status == "live", release.status_reason
    copy.refresh_from_db()
    assert export(copy) == before


def test_sqlite_instance_restores_its_own_backups(tmp_path, ann, settings):
    """The process runtime's SQLite instances (no PostgreSQL programs): a copy made by
    its backup restores byte for byte; a damaged SQLite file and a PostgreSQL dump are
    refused and the data stay."""
    backends.require("process")
    settings.LAB_RUNTIME = "process"
    settings.LAB_PG_BIN = str(tmp_path / "no-postgres")
    assert backend_class("process")().pg_bin is None
    try:
        _sqlite_story(tmp_path, ann)
    finally:
        backend_class("process")().remove("rs-lite")


def _sqlite_story(tmp_path, ann):
    instance = go_live(ann, "rs-lite", tmp_path)
    assert backend_class("process")().database_kind("rs-lite") == "sqlite"
    client = api(ann)
    play(instance, [41, 42])
    before = export(instance)
    kept = reconciler.backup_only(instance.pk, ann)
    assert kept.filename.endswith(".sqlite3")
    reconciler.backup_and_reset(instance.pk, ann)
    assert export(instance) != before

    assert client.post("/api/v1/instances/rs-lite/restore", {"backup": kept.pk},
                       content_type="application/json").status_code == 202
    [job] = run_restore_jobs()
    assert job.status == "succeeded", job.message
    assert export(instance) == before

    # A PostgreSQL dump into SQLite: refused (upload and restore).
    dump = io.BytesIO(b"PGDMP" + b"\0" * 100)
    upload = client.post("/api/v1/instances/rs-lite/backups", {"file": dump})
    assert upload.status_code == 422 and "PostgreSQL dump" in upload.json()["detail"]
    # A damaged SQLite file: refused by the integrity check the tenant runs; nothing changes.
    damaged = bytearray(kept.path.read_bytes())
    damaged[200:4096] = b"\xff" * (4096 - 200)
    upload = client.post("/api/v1/instances/rs-lite/backups", {"file": io.BytesIO(bytes(damaged))})
    assert upload.status_code == 201, upload.content
    with pytest.raises(reconciler.ReconcileError) as refused:
        reconciler.restore(instance.pk, upload.json()["id"], ann)
    assert "restore refused" in str(refused.value), refused.value
    assert answers_up(instance) and export(instance) == before
