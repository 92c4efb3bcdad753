"""The session guard against a real oTree 6 app on Docker: a session created through oTree's
REST API, a participant who opens the link with an HTTP client (live) and completes the
page (finished). Restart, reset, settings and the admin password are refused while it is
live (API 409 naming the session and the active participants; ?force=true overrides; the
pages ask for a confirmation); a push waits as ready to switch, the old release serving,
and switches when the session is idle (the sessions sweep) or at Switch now; an app that
does not answer blocks nothing.

One deployment shared by the module (built once); the rows that point at it are made
again per test (transactional tests empty the tables). oTree's own database keeps the
sessions of earlier tests: each test finishes the participants it started.
"""

from __future__ import annotations

import io
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from django.conf import settings
from django.test import Client

from instances import reconciler, releases, sessions
from instances.git import hooks
from instances.git.repos import repo_path
from instances.models import Instance, Release
from instances.runtime import get_runtime
from instances.tasks import sessions_sweep
from manager.accounts import services as accounts
from manager.accounts.models import User
from tests import otree_projects
from tests.conftest import need
from tests.docker_helpers import engine_ok, images_present
from tests.job_helpers import record_jobs, run_recorded

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]
NAME = "guard-live"
CONFIG = "hello_game"


@dataclass
class Deployed:
    rest_key: str
    admin_password: str
    db_password: str
    image: str
    commit: str
    checkout: otree_projects.Checkout


@pytest.fixture(scope="module")
def deployed(redis_server, django_db_setup, django_db_blocker):
    need(engine_ok() and images_present(settings.LAB_IMAGE_POSTGRES, settings.LAB_IMAGE_REDIS,
                                        settings.LAB_IMAGE_PYTHON),
         "a Docker engine with the images (python manage.py build_images)")
    runtime = get_runtime(Instance(runtime="docker"))
    runtime.remove(NAME)
    with django_db_blocker.unblock():
        owner = User.objects.create_user("guard-deployer", "guard-deployer@lab.test", "pw-guard-123456")
        try:
            instance = Instance.objects.create(name=NAME, owner=owner, runtime="docker")
            bare = otree_projects.init_bare(repo_path(NAME))
            checkout = otree_projects.Checkout(Path(tempfile.mkdtemp(prefix="guard-work-")), bare)
            commit = checkout.push(otree_projects.valid_project("v1"), "v1")
            release = Release.objects.create(instance=instance, number=1, commit=commit)
            release = releases.deploy(release.pk)
            assert release.status == Release.Status.LIVE, release.log[-3000:]
            instance.refresh_from_db()
            found = Deployed(instance.rest_key, instance.admin_password, instance.db_password, release.image, commit,
                             checkout)
        finally:
            Instance.objects.filter(name=NAME).delete()
            owner.delete()
    try:
        yield found
    finally:
        runtime.remove(NAME)
        for image in runtime.api.images(filters={"label": [f"org.otree-lab.manager={runtime.manager_id}",
                                                           f"org.otree-lab.instance={NAME}"]}):
            runtime.api.remove_image(image["Id"], force=True)


queued = {}


@pytest.fixture
def lab(deployed, monkeypatch, settings, boss, ann, bob):
    settings.LAB_RUNTIME = "docker"
    queued.clear()
    record_jobs(monkeypatch, queued)
    instance = Instance.objects.create(name=NAME, owner=ann, rest_key=deployed.rest_key,
                                       admin_password=deployed.admin_password, db_password=deployed.db_password,
                                       status=Instance.Status.RUNNING, runtime="docker")
    Release.objects.create(instance=instance, number=1, commit=deployed.commit, status=Release.Status.LIVE,
                           image=deployed.image)
    _, token = accounts.create_token(ann, name="guard")
    started: list[str] = []
    yield {"instance": instance, "ann": ann, "boss": boss, "bob": bob, "started": started,
           "api": Client(HTTP_AUTHORIZATION=f"Bearer {token}"), "deployed": deployed}
    for code in started:  # the next test starts with no live session
        finish(code)
    queued.clear()


# --- the oTree app, as participants and the experimenter use it ------------------------------

def app_url() -> str:
    url = get_runtime(Instance(runtime="docker")).state(NAME).app_url
    assert url, "the app does not run"
    return url.rstrip("/")


def rest(deployed, method, path, **kwargs):
    response = requests.request(method, app_url() + path, headers={"otree-rest-key": deployed.rest_key}, timeout=30,
                                **kwargs)
    assert response.status_code == 200, response.text[:300]
    return response.json()


def new_session(lab, participants: int = 2) -> tuple[str, list[str]]:
    """A session of `participants` (oTree's REST API) and their participant codes."""
    code = rest(lab["deployed"], "POST", "/api/sessions",
                json={"session_config_name": CONFIG, "num_participants": participants})["code"]
    detail = rest(lab["deployed"], "GET", f"/api/sessions/{code}")
    return code, [p["code"] for p in sorted(detail["participants"], key=lambda p: p["id_in_session"])]


def start(lab, participant: str) -> None:
    """The participant opens the link: oTree shows the first page (the session is live)."""
    response = requests.get(f"{app_url()}/InitializeParticipant/{participant}", timeout=30)
    assert response.status_code == 200 and "MyPage" in response.url, response.url
    lab["started"].append(participant)


def finish(participant: str) -> None:
    """The participant completes the only page (finished: past the last page)."""
    page = requests.get(f"{app_url()}/InitializeParticipant/{participant}", timeout=30)
    if "MyPage" not in page.url:
        return
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
    done = requests.post(page.url, data=hidden, timeout=30)
    assert done.status_code == 200 and "OutOfRange" in done.url, (done.status_code, done.url)


def push(lab, version: str) -> Release:
    commit = lab["deployed"].checkout.push(otree_projects.valid_project(version), version)
    return releases.record_push(lab["instance"], commit=commit, branch="main", pushed_by=lab["ann"])


def run_deploys() -> list:
    return run_recorded(queued, "instance.deploy")


def serving() -> str:
    """The id of the image the instance's app runs now (release tags are numbered per test:
    compared by id)."""
    runtime = get_runtime(Instance(runtime="docker"))
    return runtime.api.inspect_container(runtime.container_name(NAME, "app"))["Image"]


def image_id(release: Release) -> str:
    return get_runtime(Instance(runtime="docker")).api.inspect_image(release.image)["Id"]


def containers() -> set[str]:
    runtime = get_runtime(Instance(runtime="docker"))
    return {c["Names"][0].lstrip("/") for c in runtime.api.containers(all=True, filters={"label": [
        f"org.otree-lab.manager={runtime.manager_id}", f"org.otree-lab.instance={NAME}"]})}


def expire_cache(instance) -> None:
    Instance.objects.filter(pk=instance.pk).update(sessions_checked_at=None)
    instance.refresh_from_db()


# --- the tests ---------------------------------------------------------------------------------

def test_a_live_session_holds_back_restart_reset_and_settings_until_forced(lab):
    instance, api = lab["instance"], lab["api"]
    code, participants = new_session(lab)
    start(lab, participants[0])

    listed = api.get(f"/api/v1/instances/{NAME}/sessions")
    assert listed.status_code == 200 and "X-Sessions-Stale" not in listed
    mine = next(s for s in listed.json() if s["code"] == code)
    assert mine == {"code": code, "config": CONFIG, "participants": 2, "started": 1, "finished": 0,
                    "last_activity": mine["last_activity"], "live": True}
    assert mine["last_activity"]

    for method, path, body in [("post", "restart", None), ("post", "reset-database", None),
                               ("patch", "", {"auth_level": "DEMO"}), ("post", "admin-password", {})]:
        url = f"/api/v1/instances/{NAME}" + (f"/{path}" if path else "")
        response = getattr(api, method)(url, data=body, content_type="application/json")
        assert response.status_code == 409, (path, response.content)
        detail = response.json()["detail"]
        assert f"session {code} ({CONFIG}) is live with 1 active participant" in detail, detail
        assert "?force=true" in detail
    instance.refresh_from_db()
    assert instance.auth_level == "STUDY" and instance.restart_generation == 0  # nothing was done

    # The lab manager's delete is held back too (it ends the data collection).
    boss_token = accounts.create_token(lab["boss"], name="guard-boss")[1]
    boss = Client(HTTP_AUTHORIZATION=f"Bearer {boss_token}")
    assert boss.delete(f"/api/v1/instances/{NAME}").status_code == 409

    assert api.post(f"/api/v1/instances/{NAME}/restart?force=true").status_code == 202
    assert api.patch(f"/api/v1/instances/{NAME}?force=true", data={"auth_level": "DEMO"},
                     content_type="application/json").status_code == 200
    instance.refresh_from_db()
    assert instance.auth_level == "DEMO" and instance.restart_generation == 1

    # The pages: the action asks for a confirmation naming the session; "Do it anyway" does it.
    page = Client()
    page.force_login(lab["ann"])
    asked = page.post(f"/instances/{NAME}/restart/")
    assert asked.status_code == 409
    text = asked.content.decode()
    assert code in text and CONFIG in text and "1 active participant" in text and "Do it anyway" in text
    assert 'name="force" value="1"' in text
    assert page.post(f"/instances/{NAME}/restart/", {"force": "1"}).status_code == 302
    instance.refresh_from_db()
    assert instance.restart_generation == 2

    asked = page.post(f"/instances/{NAME}/settings/", {"auth_level": "STUDY", "env": "COLOR=blue"})
    assert asked.status_code == 409 and 'name="env" value="COLOR=blue"' in asked.content.decode()
    instance.refresh_from_db()
    assert instance.config_vars == {}
    done = page.post(f"/instances/{NAME}/settings/", {"auth_level": "STUDY", "env": "COLOR=blue", "force": "1"})
    assert done.status_code == 302
    instance.refresh_from_db()
    assert instance.config_vars == {"COLOR": "blue"} and instance.auth_level == "STUDY"

    shown = page.get(f"/instances/{NAME}/").content.decode()
    assert f'data-code="{code}"' in shown and "live · 1 active" in shown and "1 started · 0 finished · of 2" in shown
    board = page.get("/").content.decode()
    assert re.search(r'class="badge text-bg-danger live-session" data-instance="guard-live"', board), board

    # The participant finishes: nobody is active, the session is not live, nothing is held back.
    finish(participants[0])
    expire_cache(instance)
    mine = next(s for s in api.get(f"/api/v1/instances/{NAME}/sessions").json() if s["code"] == code)
    assert (mine["started"], mine["finished"], mine["live"]) == (1, 1, False)
    assert api.post(f"/api/v1/instances/{NAME}/restart").status_code == 202
    board = page.get("/").content.decode()
    assert 'live-session d-none" data-instance="guard-live"' in board


def test_a_push_during_a_live_session_waits_until_the_session_is_idle(lab, settings):
    instance = lab["instance"]
    code, participants = new_session(lab)
    start(lab, participants[0])
    before = serving()

    release = push(lab, "v2")
    run_deploys()
    release.refresh_from_db()
    assert release.status == Release.Status.READY, release.log[-2000:]
    out = io.StringIO()
    assert hooks.follow(release, out, poll=0.01, timeout=10) == 0  # the push succeeded: it waits
    said = out.getvalue()
    assert (f"Ready to switch: session {code} ({CONFIG}) is live with 1 active participant; it switches when the "
            f"session is idle, or click Switch now on {settings.LAB_PUBLIC_URL}/instances/{NAME}/releases/2/") in said
    assert said.count("Ready to switch:") == 1
    # The old release still serves; the candidate app was stopped.
    assert serving() == before
    runtime = get_runtime(instance)
    assert containers() == {runtime.container_name(NAME, c) for c in ("app", "db", "redis")}
    instance.refresh_from_db()
    assert instance.status == Instance.Status.RUNNING and "ready to switch" in instance.status_reason

    # The minute sweeps leave it while the session is live (the stuck-release sweep too);
    # the instance says it waits.
    assert releases.sweep() == 0
    reconciler.reconcile(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Instance.Status.RUNNING
    assert f"release #{release.number} is ready to switch" in instance.status_reason
    sessions_sweep.apply()
    assert run_deploys() == []
    release.refresh_from_db()
    assert release.status == Release.Status.READY

    # The participant pauses longer than LAB_SESSION_LIVE_MINUTES (a fraction of a minute
    # here): the session is idle, the sweep switches to the release.
    settings.LAB_SESSION_LIVE_MINUTES = 0.02  # 1.2 s
    time.sleep(1.5)
    expire_cache(instance)
    result = sessions_sweep.apply().get()
    assert result["ready_releases_switched"] == 1, result
    run_deploys()
    release.refresh_from_db()
    assert release.status == Release.Status.LIVE, release.log[-2000:]
    assert serving() == image_id(release) != before
    assert Release.objects.get(instance=instance, number=1).status == Release.Status.SUPERSEDED
    assert "version v2" in requests.get(f"{app_url()}/InitializeParticipant/{participants[1]}", timeout=30).text
    lab["started"].append(participants[1])


def test_switch_now_and_a_newer_push_during_a_live_session(lab):
    instance, api = lab["instance"], lab["api"]
    code, participants = new_session(lab)
    start(lab, participants[0])
    before = serving()

    first = push(lab, "v3")
    run_deploys()
    first.refresh_from_db()
    assert first.status == Release.Status.READY
    # A newer push supersedes the one that waits, and waits in turn.
    newer = push(lab, "v4")
    first.refresh_from_db()
    assert first.status == Release.Status.SUPERSEDED
    run_deploys()
    newer.refresh_from_db()
    assert newer.status == Release.Status.READY
    assert serving() == before

    # The pages offer Switch now; others than the owner and lab managers see nothing.
    page = Client()
    page.force_login(lab["ann"])
    assert "Switch now" in page.get(f"/instances/{NAME}/releases/{newer.number}/").content.decode()
    assert "Switch now" in page.get(f"/instances/{NAME}/").content.decode()
    stranger = Client(HTTP_AUTHORIZATION=f"Bearer {accounts.create_token(lab['bob'], name='x')[1]}")
    assert stranger.post(f"/api/v1/instances/{NAME}/releases/{newer.number}/switch").status_code == 404

    switched = api.post(f"/api/v1/instances/{NAME}/releases/{newer.number}/switch")
    assert switched.status_code == 202, switched.content
    [job] = run_deploys()
    newer.refresh_from_db()
    assert newer.status == Release.Status.LIVE, newer.log[-2000:]
    assert job.status == "succeeded", job.output if hasattr(job, "output") else job
    assert serving() == image_id(newer) != before
    expire_cache(instance)  # the session goes on under the new release
    mine = next(s for s in api.get(f"/api/v1/instances/{NAME}/sessions").json() if s["code"] == code)
    assert (mine["started"], mine["live"]) == (1, True)
    # Switching again is refused: it is live already.
    assert api.post(f"/api/v1/instances/{NAME}/releases/{newer.number}/switch").status_code == 409


def test_an_app_that_does_not_answer_holds_nothing_back(lab):
    instance, api = lab["instance"], lab["api"]
    code, participants = new_session(lab)
    start(lab, participants[0])
    assert api.post(f"/api/v1/instances/{NAME}/restart").status_code == 409

    runtime = get_runtime(instance)
    app = runtime.container_name(NAME, "app")
    runtime.api.pause(app)  # it accepts connections and answers nothing
    try:
        expire_cache(instance)
        response = api.post(f"/api/v1/instances/{NAME}/restart")
        assert response.status_code == 202, response.content
        listed = api.get(f"/api/v1/instances/{NAME}/sessions")
        assert "did not answer" in listed["X-Sessions-Stale"]
        mine = next(s for s in listed.json() if s["code"] == code)
        assert mine["live"] is False and mine["started"] == 1  # the last read, not live
        page = Client()
        page.force_login(lab["ann"])
        assert "The app does not answer" in page.get(f"/instances/{NAME}/").content.decode()
    finally:
        runtime.api.unpause(app)
    expire_cache(instance)
    assert api.post(f"/api/v1/instances/{NAME}/restart").status_code == 409  # it answers again: live


def test_the_confirmation_page_in_a_browser(lab, live_server, monkeypatch):
    """Headless Chromium: Restart during a live session shows the confirmation naming the
    session; "Do it anyway" (POST with CSRF and force) restarts; Cancel leaves it alone."""
    from playwright.sync_api import sync_playwright

    from tests.conftest import CHROMIUM
    from tests.e2e.test_e2e_notifications import CHROMIUM_ARGS

    need(CHROMIUM.exists(), f"chromium ({CHROMIUM})")
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")  # the ORM beside Playwright's loop, in this thread
    instance = lab["instance"]
    code, participants = new_session(lab)
    start(lab, participants[0])
    sessions_sweep.apply()  # (the minute sweep: the pages show the stored read)
    login = Client()
    login.force_login(lab["ann"])
    cookie = login.cookies[settings.SESSION_COOKIE_NAME].value
    base = live_server.url.replace("localhost", "127.0.0.1")  # (Chromium may try ::1 first)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": cookie, "url": base}])
            page = context.new_page()
            page.goto(f"{base}/instances/{NAME}/")
            assert page.locator(f'tr.otree-session[data-code="{code}"]').inner_text().count("live · 1 active") == 1
            page.click("button:has-text('Restart')")
            page.wait_for_selector("#live-confirm")
            said = page.inner_text("#live-confirm")
            assert f"session {code} ({CONFIG}) is live with 1 active participant" in said and "Do it anyway" in said
            page.click("text=Cancel")
            page.wait_for_selector("#otree-sessions")
            instance.refresh_from_db()
            assert instance.restart_generation == 0
            page.click("button:has-text('Restart')")
            page.click("#do-it-anyway")
            page.wait_for_selector("#otree-sessions")
            assert "Restarting guard-live" in page.content()
        finally:
            browser.close()
    instance.refresh_from_db()
    assert instance.restart_generation == 1


def test_a_rollback_during_a_live_session_asks_first(lab):
    """Roll back (page) while a session is live: the confirmation; "Do it anyway" queues the
    rollback, which supersedes a release that waits as ready to switch and switches without
    waiting."""
    instance = lab["instance"]
    Release.objects.filter(instance=instance, number=1).update(status=Release.Status.SUPERSEDED)
    Release.objects.create(instance=instance, number=2, commit=lab["deployed"].commit, status=Release.Status.LIVE,
                           image=lab["deployed"].image)
    waiting = Release.objects.create(instance=instance, number=3, commit=lab["deployed"].commit,
                                     status=Release.Status.READY, image=lab["deployed"].image)
    code, participants = new_session(lab)
    start(lab, participants[0])
    page = Client()
    page.force_login(lab["ann"])
    asked = page.post(f"/instances/{NAME}/releases/1/rollback/")
    assert asked.status_code == 409 and code in asked.content.decode() and "Do it anyway" in asked.content.decode()
    assert not Release.objects.filter(instance=instance, rollback_of__isnull=False).exists()
    done = page.post(f"/instances/{NAME}/releases/1/rollback/", {"force": "1"})
    assert done.status_code == 302
    rollback = Release.objects.get(instance=instance, rollback_of__number=1)
    waiting.refresh_from_db()
    assert waiting.status == Release.Status.SUPERSEDED and f"#{rollback.number}" in waiting.status_reason
    [(task, args)] = queued.values()
    assert args == (rollback.pk, True)  # the switch does not wait for the session either
