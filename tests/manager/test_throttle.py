"""Rate limits of destructive and costly actions (manager/throttle.py), in the suite's real
Redis: what a caller of the API and a user of the pages see when a budget is spent, that
nothing was done then, and who else is (not) affected."""

import html
import json
import re
import subprocess
import sys
import time

import pytest
from django.core.management import call_command
from django.test import Client

from bots import services as bot_services
from bots.models import BotRun
from instances import services as instance_services
from instances.models import Instance, Release
from manager import throttle
from manager.accounts.models import AccessToken
from manager.accounts.services import create_token
from manager.audit.models import AuditEvent
from manager.jobs.models import Job

pytestmark = pytest.mark.django_db


@pytest.fixture
def lab(boss, ann, bob, monkeypatch):
    enqueued = []
    monkeypatch.setattr(bot_services, "enqueue", lambda run: enqueued.append(run.pk))
    study = Instance.objects.create(name="ann-study", owner=ann, public_port=18700)
    pilot = Instance.objects.create(name="ann-pilot", owner=ann, public_port=18701)
    bobs = Instance.objects.create(name="bob-study", owner=bob, public_port=18702)
    Release.objects.create(instance=study, number=1, commit="c" * 40, status="live", session_configs=[
        {"name": "guess", "display_name": "Guess", "num_demo_participants": 3}])
    tokens = {u.username: create_token(u, name="harness", throttled=False)[1] for u in (boss, ann, bob)}
    return {"boss": boss, "ann": ann, "bob": bob, "study": study, "pilot": pilot, "bobs": bobs,
            "tokens": tokens, "enqueued": enqueued}


def api(lab, who, path, body=None):
    client = Client(HTTP_AUTHORIZATION=f"Bearer {lab['tokens'][who]}")
    return client.post(f"/api/v1/instances/{path}", data=json.dumps(body) if body is not None else None,
                       content_type="application/json")


def web(lab, who) -> Client:
    client = Client()
    client.force_login(lab[who])
    return client


def alerts(response) -> list[str]:
    """The error alerts of a page, as text."""
    found = re.findall(r'<div class="alert alert-danger[^"]*"[^>]*>(.*?)<button', response.content.decode(), re.S)
    return [" ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split()) for text in found]


def text(response) -> str:
    """A page's text, as a reader sees it."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", response.content.decode())).split())


def jobs(kind) -> int:
    return Job.objects.filter(kind=kind).count()


def test_resets_over_an_instances_budget_get_429_with_retry_after_and_nothing_is_done(lab):
    for _ in range(3):
        assert api(lab, "ann", "ann-study/reset-database").status_code == 202
    response = api(lab, "ann", "ann-study/reset-database")
    assert response.status_code == 429
    assert response["Content-Type"].startswith("application/json")
    assert 590 <= int(response["Retry-After"]) <= 600
    assert re.fullmatch(r"Too many database resets of ann-study: at most 3 per 10 minutes\. "
                        r"Try again in (9|10) minutes\.", response.json()["detail"]), response.json()
    assert jobs("instance.reset") == 3  # the refused reset made no job, no backup, no audit entry
    assert AuditEvent.objects.filter(action="instance.reset_database").count() == 3
    # The instance's budget holds for lab managers too (it protects the instance's data) …
    boss = api(lab, "boss", "ann-study/reset-database")
    assert boss.status_code == 429 and "database resets of ann-study" in boss.json()["detail"]
    # … and is the instance's own: the owner's other instance and another user's are not affected.
    assert api(lab, "ann", "ann-pilot/reset-database").status_code == 202
    assert api(lab, "bob", "bob-study/reset-database").status_code == 202
    assert jobs("instance.reset") == 5


def test_a_users_budget_spans_their_instances_and_does_not_bind_lab_managers(lab, settings):
    settings.LAB_THROTTLE_BACKUP = "10/h/instance,2/h/user"
    ann = web(lab, "ann")
    assert ann.post("/instances/ann-study/backup/").status_code == 302
    assert ann.post("/instances/ann-pilot/backup/").status_code == 302
    response = ann.post("/instances/ann-study/backup/")
    # The page again with the reason, HTTP 429, and no backup started.
    assert response.status_code == 429 and int(response["Retry-After"]) > 3500
    assert len(alerts(response)) == 1 and re.fullmatch(
        r"Too many backups by you: at most 2 per hour across your instances\. Try again in (1 hour|59 minutes)\.",
        alerts(response)[0]), alerts(response)
    assert "Back up now" in response.content.decode()  # the instance's page, its buttons there
    assert jobs("instance.backup") == 2
    # Another experimenter has their own budget; a lab manager has none per user.
    assert web(lab, "bob").post("/instances/bob-study/backup/").status_code == 302
    boss = web(lab, "boss")
    for name in ("ann-study", "ann-pilot", "bob-study", "ann-study"):
        assert boss.post(f"/instances/{name}/backup/").status_code == 302, name
    assert jobs("instance.backup") == 7


def test_after_the_window_the_action_works_again(lab, settings):
    settings.LAB_THROTTLE_RESTART = "2/1s/instance"
    assert [api(lab, "ann", "ann-study/restart").status_code for _ in range(2)] == [202, 202]
    refused = api(lab, "ann", "ann-study/restart")
    assert refused.status_code == 429 and refused["Retry-After"] == "1"
    assert refused.json()["detail"] == ("Too many restarts of ann-study: at most 2 per second. "
                                        "Try again in 1 second.")
    deadline = time.monotonic() + 20
    while (response := api(lab, "ann", "ann-study/restart")).status_code == 429:
        assert time.monotonic() < deadline, "the budget never came back"
        time.sleep(0.2)
    assert response.status_code == 202
    assert jobs("instance.restart") == 3


def test_the_restart_button_shows_the_reason(lab, settings):
    settings.LAB_THROTTLE_RESTART = "1/h/instance"
    ann = web(lab, "ann")
    assert ann.post("/instances/ann-study/restart/").status_code == 302
    response = ann.post("/instances/ann-study/restart/")
    assert response.status_code == 429
    assert alerts(response) and alerts(response)[0].startswith(
        "Too many restarts of ann-study: at most 1 per hour. Try again in")
    assert jobs("instance.restart") == 1


def patch(lab, who, name, body):
    client = Client(HTTP_AUTHORIZATION=f"Bearer {lab['tokens'][who]}")
    return client.patch(f"/api/v1/instances/{name}", data=json.dumps(body), content_type="application/json")


def test_settings_changes_that_restart_the_app_spend_the_restart_budget(lab, settings):
    """A settings change restarts the app as *Restart* does: the same budget, the same 429
    with Retry-After, the same words on the page and in the API; nothing is stored then."""
    settings.LAB_THROTTLE_RESTART = "3/h/instance"
    assert patch(lab, "ann", "ann-study", {"env": {"ROUND": "1"}}).status_code == 200
    assert api(lab, "ann", "ann-study/restart").status_code == 202
    assert patch(lab, "ann", "ann-study", {"env": {"ROUND": "1"}}).status_code == 200  # no change: no restart
    assert api(lab, "ann", "ann-study/admin-password", {"password": "a-new-password"}).status_code == 200
    refused = patch(lab, "ann", "ann-study", {"env": {"ROUND": "2"}})
    assert refused.status_code == 429 and refused["Content-Type"].startswith("application/json")
    assert 3500 < int(refused["Retry-After"]) <= 3600
    sentence = refused.json()["detail"]
    assert re.fullmatch(r"Too many restarts of ann-study: at most 3 per hour\. Try again in (1 hour|59 minutes)\.",
                        sentence), sentence
    assert api(lab, "ann", "ann-study/restart").json()["detail"] == sentence  # one budget
    password = api(lab, "ann", "ann-study/admin-password", {"password": "another-password"})
    assert password.status_code == 429 and password.json()["detail"] == sentence
    boss = patch(lab, "boss", "ann-study", {"memory_mb": 1024})  # an instance's budget binds lab managers too
    assert boss.status_code == 429 and boss.json()["detail"] == sentence
    # The page: the form again with the same sentence, HTTP 429, Retry-After.
    page = web(lab, "ann").post("/instances/ann-study/settings/", {"auth_level": "DEMO", "env": "ROUND=3"})
    assert page.status_code == 429 and int(page["Retry-After"]) > 3500
    assert text(page).count(sentence) == 1
    page = web(lab, "ann").post("/instances/ann-study/admin-password/", {"password": "a-third-password"})
    assert page.status_code == 429 and int(page["Retry-After"]) > 3500 and text(page).count(sentence) == 1
    page = web(lab, "boss").post("/instances/ann-study/limits/", {"memory_mb": "1024", "cpus": "1"})
    assert page.status_code == 429 and text(page).count(sentence) == 1
    # Nothing of the refused changes was stored or queued.
    study = Instance.objects.get(name="ann-study")
    assert study.config_vars == {"ROUND": "1"} and study.auth_level == "STUDY" and study.memory_mb == 512
    assert study.admin_password == "a-new-password"
    assert jobs("instance.apply") == 2 and jobs("instance.restart") == 1
    assert AuditEvent.objects.filter(action__in=["instance.settings", "instance.admin_password"]).count() == 2
    # Before the first deploy nothing restarts: a change of an instance without an app is not counted.
    for n in range(5):
        assert patch(lab, "ann", "ann-pilot", {"env": {"ROUND": str(n)}}).status_code == 200


BOT_RUN = {"session_config": "guess", "num_participants": 3, "num_bots": 2, "model": "random", "provider": None}


def test_only_accepted_bot_runs_count_and_a_refused_one_is_not_recorded(lab, settings):
    settings.LAB_THROTTLE_BOT_RUN = "1/h/instance"
    for _ in range(3):  # invalid runs are refused by their own rules and use no budget
        assert api(lab, "ann", "ann-study/bot-runs", {**BOT_RUN, "num_bots": 9}).status_code == 422
    assert api(lab, "ann", "ann-study/bot-runs", BOT_RUN).status_code == 201
    refused = api(lab, "ann", "ann-study/bot-runs", BOT_RUN)
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 3500
    assert refused.json()["detail"].startswith("Too many bot runs started on ann-study: at most 1 per hour. "
                                               "Try again in ")
    assert BotRun.objects.count() == 1 and len(lab["enqueued"]) == 1
    assert AuditEvent.objects.filter(action="bots.run_start").count() == 1
    # The page's form says the same, with HTTP 429.
    page = web(lab, "ann").post("/instances/ann-study/bot-runs/", {
        "session_config": "guess", "num_participants": 3, "num_bots": 3, "model": "random", "temperature": 1,
        "memory": "summary", "rate_limit": 60, "concurrency": 5, "time_limit_minutes": 10})
    assert page.status_code == 429 and int(page["Retry-After"]) > 3500
    assert "Too many bot runs started on ann-study: at most 1 per hour." in html.unescape(page.content.decode())
    assert BotRun.objects.count() == 1


def test_an_action_that_fails_gives_its_slot_back(lab, settings, monkeypatch):
    settings.LAB_THROTTLE_RESTART = "1/h/instance"
    real = instance_services._reconcile_job

    def broken(*args, **kwargs):
        raise RuntimeError("the job table is gone")

    monkeypatch.setattr(instance_services, "_reconcile_job", broken)
    with pytest.raises(RuntimeError):
        instance_services.restart(lab["ann"], lab["study"])
    monkeypatch.setattr(instance_services, "_reconcile_job", real)
    instance_services.restart(lab["ann"], lab["study"])  # the failed one used no budget
    with pytest.raises(throttle.Throttled):
        instance_services.restart(lab["ann"], lab["study"])


def test_token_creation_is_limited_per_account_but_not_on_the_command_line(lab, settings):
    settings.LAB_THROTTLE_TOKEN = "2/h/user"
    ann = web(lab, "ann")
    for name in ("laptop", "script"):
        assert ann.post("/settings/tokens/", {"name": name}).status_code == 302
    response = ann.post("/settings/tokens/", {"name": "third"})
    assert response.status_code == 429 and int(response["Retry-After"]) > 3500
    assert "Too many access tokens created for your account: at most 2 per hour." in html.unescape(
        response.content.decode())
    assert not AccessToken.objects.filter(user=lab["ann"], name="third").exists()
    assert web(lab, "bob").post("/settings/tokens/", {"name": "laptop"}).status_code == 302
    call_command("create_token", "ann", "--name", "from the server", stdout=open("/dev/null", "w"))
    assert AccessToken.objects.filter(user=lab["ann"], name="from the server").exists()


def test_without_redis_the_action_is_let_through(lab, settings, monkeypatch, caplog):
    settings.LAB_THROTTLE_RESTART = "1/h/instance"
    monkeypatch.setattr(throttle, "_client", None)
    monkeypatch.setattr(throttle, "_script", None)
    settings.REDIS_URL = "unix:///nonexistent/redis.sock"
    try:
        for _ in range(2):
            instance_services.restart(lab["ann"], lab["study"])
    finally:
        throttle._client = throttle._script = None  # (monkeypatch puts the working client back)
    assert jobs("instance.restart") == 2
    assert "rate limit of restart not checked" in caplog.text


def test_settings_are_read_and_explained():
    assert throttle.parse("3/10m/instance, 10/h/user") == [throttle.Limit(3, 600, "instance"),
                                                           throttle.Limit(10, 3600, "user")]
    assert throttle.parse("off") == [] and throttle.parse("") == []
    assert throttle.parse("5/2d/user") == [throttle.Limit(5, 172800, "user")]
    for bad in ("3/10x/instance", "3/m", "0/m/user", "3/m/lab", "x/m/user"):
        with pytest.raises(ValueError):
            throttle.parse(bad, name="LAB_THROTTLE_RESET")
    with pytest.raises(ValueError, match="scope must be user"):
        throttle.parse("3/m/instance", name="LAB_THROTTLE_TOKEN", scopes=("user",))
    assert [throttle.wait_text(s) for s in (0.2, 1, 59, 60, 61, 3599, 3600, 3660, 7201)] == [
        "1 second", "1 second", "59 seconds", "1 minute", "2 minutes", "1 hour", "1 hour", "1 hour 1 minute",
        "2 hours 1 minute"]
    assert [throttle.period_text(s) for s in (1, 30, 60, 600, 3600, 7200, 86400)] == [
        "second", "30 seconds", "minute", "10 minutes", "hour", "2 hours", "day"]
    # A setting the manager cannot read stops it at start-up, naming the variable.
    out = subprocess.run([sys.executable, "-c", "import django; django.setup()"], capture_output=True, text=True,
                         env={**__import__("os").environ, "DJANGO_SETTINGS_MODULE": "manager.settings",
                              "LAB_THROTTLE_BACKUP": "6 per hour"}, timeout=60)
    assert out.returncode != 0 and "LAB_THROTTLE_BACKUP: cannot read '6 per hour'" in out.stderr
