"""The experiment's data in one click, with a real oTree 6 app on Docker: a project with two
apps (one with a `custom_export`) is pushed and deployed once for the module; sessions are
played through oTree's own participant pages by an HTTP client; then

- *Download data* (the instance page and `GET /api/v1/instances/{name}/data.zip`) gives
  oTree's CSVs: all_apps_wide.csv byte for byte what `/api/export_wide` gives, one file
  per app, the custom export, page times, chat, and a manifest; others get 404;
- the download is rate-limited;
- an app that is not running gives 409 with the reason;
- a reset stores the zip beside its dump (the session's rows inside, the database empty
  after), and when the app cannot export the reset still happens and the job says why;
- a delete stores the zip beside the final backup; the Backups pages and the API offer it.

The tests run in this order and share the instance (building it takes a pip install of
oTree); the rows it lives on are committed by the module's fixture.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import zipfile
from urllib.parse import urlsplit

import pytest
import requests
from django.test import Client

from bots.page import parse
from instances import releases, services
from instances.backups import remove_files
from instances.git.repos import repo_path
from instances.models import Backup, Instance, Release
from instances.runtime import backend_class
from manager import locks, throttle
from manager.accounts import services as accounts
from manager.accounts.models import User
from tests import backends, otree_projects
from tests.job_helpers import record_jobs, run_recorded
from tests.waits import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.django_db]

NAME = "data-export"
CONFIG = "data_game"

SETTINGS = otree_projects.SETTINGS.replace(
    'dict(name="hello_game", display_name="Hello game", app_sequence=["hello"], num_demo_participants=2),',
    f'dict(name="{CONFIG}", display_name="Survey, then hello", app_sequence=["survey", "hello"], '
    'num_demo_participants=2),')

SURVEY = '''\
from otree.api import *


class C(BaseConstants):
    NAME_IN_URL = "survey"
    PLAYERS_PER_GROUP = None
    NUM_ROUNDS = 1


class Subsession(BaseSubsession):
    pass


class Group(BaseGroup):
    pass


class Player(BasePlayer):
    age = models.IntegerField(min=0, max=150, label="Your age")


class Ask(Page):
    form_model = "player"
    form_fields = ["age"]


page_sequence = [Ask]


def custom_export(players):
    yield ["participant_code", "age_doubled"]
    for p in players:
        yield [p.participant.code, (p.field_maybe_none("age") or 0) * 2]
'''

ASK = '''\
{{ block title }}Survey{{ endblock }}
{{ block content }}
{{ formfields }}
{{ next_button }}
{{ endblock }}
'''


def project() -> dict[str, str]:
    files = otree_projects.valid_project("data")
    files.update({"settings.py": SETTINGS, "survey/__init__.py": SURVEY, "survey/Ask.html": ASK})
    return files


@pytest.fixture(scope="module")
def live(django_db_setup, django_db_blocker, tmp_path_factory):
    """The instance, deployed once: {pk, owner (pk), app_url, rest_key, commit}."""
    backends.require("docker")
    runtime = backend_class("docker")()
    with django_db_blocker.unblock():
        owner = User.objects.create_user("exporter", "exporter@lab.test", "pw-export-123456")
        instance = Instance.objects.create(name=NAME, owner=owner, runtime="docker")
        shutil.rmtree(repo_path(NAME), ignore_errors=True)
        bare = otree_projects.init_bare(repo_path(NAME))
        checkout = otree_projects.Checkout(tmp_path_factory.mktemp("data-export-work"), bare)
        commit = checkout.push(project(), "a survey with a custom export, then hello")
        release = Release.objects.create(instance=instance, number=1, commit=commit, status=Release.Status.QUEUED)
        try:
            release = releases.deploy(release.pk)
            assert release.status == Release.Status.LIVE, (release.status_reason, release.log[-3000:])
            yield {"pk": instance.pk, "owner": owner.pk, "rest_key": instance.rest_key, "commit": commit,
                   "app_url": runtime.state(NAME).app_url}
        finally:
            for backup in Backup.objects.filter(instance_name=NAME):
                backup.path.unlink(missing_ok=True)
                if backup.data_path is not None:
                    backup.data_path.unlink(missing_ok=True)
            Backup.objects.filter(instance_name=NAME).delete()
            Instance.objects.filter(name=NAME).delete()
            owner.delete()
            runtime.remove(NAME)
            for image in runtime.api.images(filters={"label": [f"org.otree-lab.manager={runtime.manager_id}",
                                                               f"org.otree-lab.instance={NAME}"]}):
                runtime.api.remove_image(image["Id"], force=True)
            shutil.rmtree(repo_path(NAME), ignore_errors=True)


@pytest.fixture(autouse=True)
def no_download_budget(settings):
    """The download budget is tested on its own (test_downloads_are_rate_limited)."""
    settings.LAB_THROTTLE_EXPORT = "off"


queued: dict = {}


@pytest.fixture
def jobs(monkeypatch):
    record_jobs(monkeypatch, queued)
    yield lambda kind: run_recorded(queued, kind)
    queued.clear()


def owner_of(live) -> User:
    return User.objects.get(pk=live["owner"])


def page_client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def api_client(user) -> Client:
    _, raw = accounts.create_token(user, name="data export test")
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


def rest(live, method: str, path: str, **kwargs) -> requests.Response:
    response = requests.request(method, live["app_url"] + path, headers={"otree-rest-key": live["rest_key"]},
                                timeout=60, allow_redirects=False, **kwargs)
    assert response.status_code == 200, (path, response.status_code, response.text[:300])
    return response


def play_session(live, ages: list[int]) -> tuple[str, list[str]]:
    """Create a session through oTree's REST API and play it to the end through the
    participant pages, as a browser would (each participant enters an age): its code and
    the participants' codes."""
    code = rest(live, "post", "/api/sessions", json={"session_config_name": CONFIG,
                                                     "num_participants": len(ages)}).json()["code"]
    participants = rest(live, "post", f"/api/get_session/{code}", json={}).json()["participants"]
    for participant, age in zip(participants, ages):
        browser = requests.Session()
        answer = browser.get(f"{live['app_url']}/InitializeParticipant/{participant['code']}", timeout=30)
        for _ in range(10):
            page = parse(answer.text, url=answer.url, path=urlsplit(answer.url).path, status_code=answer.status_code)
            if page.is_end:
                break
            assert answer.status_code == 200 and page.name, (answer.status_code, answer.url, answer.text[:300])
            data = dict(page.hidden)
            if page.field("age") is not None:
                data["age"] = str(age)
            answer = browser.post(answer.url, data=data, timeout=30)
        else:
            raise AssertionError(f"participant {participant['code']} did not reach the end: {answer.url}")
    return code, [p["code"] for p in participants]


def rows(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


def content(response) -> bytes:
    return b"".join(response.streaming_content)


def test_download_data_from_the_page_and_the_api(live, bob, boss):
    owner = owner_of(live)
    code, participants = play_session(live, [31, 42])
    direct = rest(live, "get", "/api/export_wide").content

    page = page_client(owner).get(f"/instances/{NAME}/")
    assert page.status_code == 200 and f'href="/instances/{NAME}/data.zip"'.encode() in page.content
    download = page_client(owner).get(f"/instances/{NAME}/data.zip")
    assert download.status_code == 200, download.content[:300]
    assert re.fullmatch(rf'attachment; filename="{NAME}-data-\d{{8}}-\d{{6}}Z\.zip"',
                        download["Content-Disposition"]), download["Content-Disposition"]
    assert download["Cache-Control"] == "no-store" and download["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(content(download))) as zf:
        assert sorted(zf.namelist()) == ["ChatMessages.csv", "PageTimes.csv", "all_apps_wide.csv", "hello.csv",
                                         "manifest.json", "survey.csv", "survey_custom.csv"]
        assert zf.read("all_apps_wide.csv") == direct  # oTree's own export, byte for byte
        wide = rows(zf.read("all_apps_wide.csv"))
        survey = rows(zf.read("survey.csv"))
        custom = rows(zf.read("survey_custom.csv"))
        page_times = rows(zf.read("PageTimes.csv"))
        manifest = json.loads(zf.read("manifest.json"))
    assert {(r["participant.code"], r["survey.1.player.age"]) for r in wide if r["session.code"] == code} == \
        {(participants[0], "31"), (participants[1], "42")}
    assert {(r["participant.code"], r["player.age"]) for r in survey} >= {(participants[0], "31"),
                                                                           (participants[1], "42")}
    assert {(r["participant_code"], r["age_doubled"]) for r in custom} >= {(participants[0], "62"),
                                                                           (participants[1], "84")}
    assert {r["participant_code"] for r in page_times} >= set(participants)
    assert manifest["instance"] == NAME and manifest["otree_version"] == "6.0.15"
    assert manifest["release"] == {"number": 1, "commit": live["commit"]}
    assert manifest["exported_at"].endswith("Z")
    assert {f["name"]: f["bytes"] for f in manifest["files"]}["all_apps_wide.csv"] == len(direct)
    assert manifest["notes"] == ["hello: no custom export (the app answered HTTP 500)"]

    # The same by API, with the owner's token; a lab manager may, bob may not even see it.
    by_api = api_client(owner).get(f"/api/v1/instances/{NAME}/data.zip")
    assert by_api.status_code == 200 and by_api["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(content(by_api))) as zf:
        assert zf.read("all_apps_wide.csv") == direct
    assert api_client(boss).get(f"/api/v1/instances/{NAME}/data.zip").status_code == 200
    assert page_client(bob).get(f"/instances/{NAME}/data.zip").status_code == 404
    refused = api_client(bob).get(f"/api/v1/instances/{NAME}/data.zip")
    assert refused.status_code == 404 and "zip" not in refused["Content-Type"]


def test_downloads_are_rate_limited(live, settings):
    settings.LAB_THROTTLE_EXPORT = "1/10m/instance"
    throttle._redis()[0].delete(throttle.key("export", "instance", live["pk"]))
    owner = owner_of(live)
    assert api_client(owner).get(f"/api/v1/instances/{NAME}/data.zip").status_code == 200
    again = api_client(owner).get(f"/api/v1/instances/{NAME}/data.zip")
    assert again.status_code == 429 and int(again["Retry-After"]) > 0
    assert again.json()["detail"].startswith(f"Too many data downloads of {NAME}: at most 1 per 10 minutes.")
    page = page_client(owner).get(f"/instances/{NAME}/data.zip")
    assert page.status_code == 429 and b"Too many data downloads" in page.content
    throttle._redis()[0].delete(throttle.key("export", "instance", live["pk"]))


def test_one_download_per_instance_at_a_time(live):
    owner = owner_of(live)
    with locks.lock(f"export:{live['pk']}"):  # as a download being prepared holds it
        busy = api_client(owner).get(f"/api/v1/instances/{NAME}/data.zip")
    assert busy.status_code == 409
    assert busy.json()["detail"] == (f"Could not export the data of {NAME}: a data download of {NAME} is being "
                                     "prepared already; try again when it is done.")
    assert api_client(owner).get(f"/api/v1/instances/{NAME}/data.zip").status_code == 200  # free again


def test_an_app_that_is_not_running_gives_409_with_the_reason(live):
    runtime = backend_class("docker")()
    owner = owner_of(live)
    runtime.api.stop(runtime.container_name(NAME, "app"), timeout=5)
    try:
        refused = api_client(owner).get(f"/api/v1/instances/{NAME}/data.zip")
        assert refused.status_code == 409
        reason = f"Could not export the data of {NAME}: the oTree app of {NAME} is not running (it has stopped: exit code"
        assert refused.json()["detail"].startswith(reason), refused.json()
        page = page_client(owner).get(f"/instances/{NAME}/data.zip", follow=True)
        assert page.redirect_chain == [(f"/instances/{NAME}/", 302)]
        assert reason in page.content.decode()
    finally:
        runtime.api.start(runtime.container_name(NAME, "app"))
        wait_until(lambda: _answers(runtime), timeout=90, message="the app answering again")


def _answers(runtime) -> bool:
    url = runtime.state(NAME).app_url
    if not url:
        return False
    try:
        return requests.get(url + "/api/otree_version", timeout=5).status_code in (200, 403)
    except requests.RequestException:
        return False


def test_a_reset_stores_the_data_beside_its_dump(live, jobs, boss, settings, tmp_path):
    settings.LAB_BACKUP_COPY_DIR = str(tmp_path / "second-folder")  # the lab's second folder (a share)
    (tmp_path / "second-folder").mkdir()
    owner = owner_of(live)
    code, participants = play_session(live, [25])
    services.reset_database(owner, Instance.objects.get(pk=live["pk"]))
    [job] = jobs("instance.reset")
    assert job.status == "succeeded", job.message
    backup = Backup.objects.get(instance_id=live["pk"], kind=Backup.Kind.BEFORE_RESET)
    assert backup.data_filename == backup.filename.removesuffix(".dump") + "-data.zip"
    assert f"oTree's data export {backup.data_filename} ({backup.data_size} bytes) is stored beside it" in job.message
    stored = backup.data_path.read_bytes()
    assert len(stored) == backup.data_size and backup.data_path.stat().st_mode & 0o777 == 0o600
    with zipfile.ZipFile(io.BytesIO(stored)) as zf:
        wide = rows(zf.read("all_apps_wide.csv"))
        assert "survey_custom.csv" in zf.namelist()
    assert (code, participants[0], "25") in {(r["session.code"], r["participant.code"], r["survey.1.player.age"])
                                             for r in wide}
    # The database is empty now: oTree lists no session, its export has no row.
    assert wait_until(lambda: _answers(backend_class("docker")()), timeout=90, message="the app after the reset")
    assert rest(live, "get", "/api/sessions").json() == []
    assert rows(rest(live, "get", "/api/export_wide").content) == []

    # Offered for download: the instance page, the Backups page, the API; others get 404.
    listed = api_client(owner).get(f"/api/v1/instances/{NAME}/backups").json()
    [entry] = [b for b in listed if b["id"] == backup.pk]
    assert entry["data_size"] == backup.data_size and entry["data_problem"] == ""
    assert entry["data_url"].endswith(f"/api/v1/instances/{NAME}/backups/{backup.pk}/data.zip")
    by_api = api_client(owner).get(urlsplit(entry["data_url"]).path)
    assert by_api.status_code == 200 and content(by_api) == stored
    detail = page_client(owner).get(f"/instances/{NAME}/").content.decode()
    assert f'href="/instances/{NAME}/backups/{backup.pk}/data.zip"' in detail
    from_page = page_client(owner).get(f"/instances/{NAME}/backups/{backup.pk}/data.zip")
    assert from_page.status_code == 200 and content(from_page) == stored
    assert from_page["Content-Disposition"] == f'attachment; filename="{backup.data_filename}"'
    assert f'href="/backups/{backup.pk}/data.zip"' in page_client(boss).get("/backups/").content.decode()
    assert page_client(owner).get(f"/backups/{backup.pk}/data.zip").status_code == 403  # lab managers' URL
    # The owner's Backups page links to the instance's own download.
    assert f'href="/instances/{NAME}/backups/{backup.pk}/data.zip"' in page_client(owner).get("/backups/").content.decode()
    # The zip travels with its backup: copied to the second folder with the dump, removed with it.
    copies = tmp_path / "second-folder" / NAME
    assert (copies / backup.data_filename).read_bytes() == stored and (copies / backup.filename).exists()
    remove_files(backup)  # what retention does with a backup it drops
    assert not backup.data_path.exists() and not (copies / backup.data_filename).exists()
    assert not backup.path.exists()


def test_a_reset_whose_data_cannot_be_exported_still_resets_and_says_why(live, jobs, settings):
    owner = owner_of(live)
    play_session(live, [50])
    settings.LAB_EXPORT_MAX_MB = 0  # below any data (start-up refuses it; the export's size limit is what counts)
    services.reset_database(owner, Instance.objects.get(pk=live["pk"]))
    [job] = jobs("instance.reset")
    assert job.status == "succeeded", job.message  # the dump is the authoritative copy: the reset happened
    backup = Backup.objects.filter(instance_id=live["pk"], kind=Backup.Kind.BEFORE_RESET).first()
    assert backup.data_filename == "" and backup.size > 0
    assert backup.data_problem.startswith("the data are larger than LAB_EXPORT_MAX_MB (0 MB)")
    assert f"oTree's data export could not be stored ({backup.data_problem})" in job.message
    assert [p.name for p in backup.path.parent.iterdir() if p.name.endswith(".part")] == []  # nothing half-written
    assert wait_until(lambda: _answers(backend_class("docker")()), timeout=90, message="the app after the reset")
    assert rest(live, "get", "/api/sessions").json() == []  # reset all the same
    listed = api_client(owner).get(f"/api/v1/instances/{NAME}/backups").json()
    [entry] = [b for b in listed if b["id"] == backup.pk]
    assert entry["data_url"] is None and entry["data_size"] == 0 and entry["data_problem"] == backup.data_problem
    page = page_client(owner).get(f"/instances/{NAME}/").content.decode()
    assert "data export not stored: the data are larger than LAB_EXPORT_MAX_MB" in page


def test_a_delete_stores_the_data_beside_the_final_backup(live, jobs, boss):
    code, participants = play_session(live, [67, 68])
    services.delete_instance(boss, Instance.objects.get(pk=live["pk"]))
    [job] = jobs("instance.delete")
    assert job.status == "succeeded", job.message
    assert not Instance.objects.filter(name=NAME).exists()
    final = Backup.objects.get(instance_name=NAME, kind=Backup.Kind.FINAL)
    assert final.data_filename and f"oTree's data export {final.data_filename}" in job.message
    stored = final.data_path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(stored)) as zf:
        wide = rows(zf.read("all_apps_wide.csv"))
        manifest = json.loads(zf.read("manifest.json"))
    assert {(r["participant.code"], r["survey.1.player.age"]) for r in wide if r["session.code"] == code} == \
        {(participants[0], "67"), (participants[1], "68")}
    assert manifest["instance"] == NAME and manifest["release"]["commit"] == live["commit"]
    # The lab manager finds it on the Backups page and downloads it.
    assert f'href="/backups/{final.pk}/data.zip"' in page_client(boss).get("/backups/").content.decode()
    download = page_client(boss).get(f"/backups/{final.pk}/data.zip")
    assert download.status_code == 200 and content(download) == stored
