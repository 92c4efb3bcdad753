"""Bot runs against a real oTree 6 app on Docker (deployed once for this module through the
instance pipeline: tests/bots_otree.py) and the fake OpenAI-compatible server
(tests/fake_llm.py). Runs go through the real Celery task (`run_bots.apply`), the real
Redis (locks, rate limiter, channel layer) and the database.

What a user would notice: the 3-player guessing game with wait pages completes with all
bots through 429s, a 500, a timeout, unusable output and oTree's own validation error; the
answers are in oTree's data and in the downloads; human seats play beside the bots;
"stop" stops every bot; a bot that gives up is marked and the others finish; a worker
killed in the middle is resumed by the sweep without answering anything twice.
"""

import csv
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import threading

import httpx2
import pytest
from django.conf import settings
from django.db import connection
from django.test import Client

from bots import engine, llm, services
from bots.models import Answer, Bot, BotRun, ModelCall, Provider
from bots.tasks import run_bots
from manager import locks
from tests import bots_otree
from tests.fake_llm import FakeLLM
from tests.http_helpers import StandIn
from tests.db_helpers import database_url
from tests.waits import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

NAME = "bots-game"
KEY = "sk-fake-provider-key-4242"


class ManagerStandIn(StandIn):
    """A page on the lab machine's loopback, where the manager (or any local service)
    would answer: it records every request and answers with a secret."""

    def __init__(self):
        self.secret = f"MANAGER-SECRET-{secrets.token_hex(8)}"
        super().__init__(lambda request: f"<html><body><p>{self.secret}</p></body></html>".encode())
        self.url += "/"


@pytest.fixture(scope="module")
def manager_port():
    stand_in = ManagerStandIn()
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def deployed(redis_server, django_db_setup, django_db_blocker, manager_port):
    # Its app redirects one participant of the "escape" config to the stand-in's page.
    with bots_otree.deployed_for_module(django_db_blocker, NAME, "deployer",
                                        config_vars={"ESCAPE_TO": manager_port.url}) as found:
        yield found


@pytest.fixture
def fake():
    with FakeLLM(slow_seconds=2.5) as server:
        yield server


@pytest.fixture
def lab(deployed, fake, monkeypatch, boss, ann):
    monkeypatch.setattr(llm, "BACKOFF_BASE", 0.02)
    enqueued = []
    monkeypatch.setattr(run_bots, "apply_async", lambda args, **kw: enqueued.append(list(args)))
    instance = bots_otree.attach(deployed, ann, public_port=int(deployed.app_url.rsplit(":", 1)[1]))
    provider = Provider.objects.create(name="Fake", base_url=fake.url, api_key=KEY, timeout_seconds=1,
                                       offered_models=[{"name": "fake-1", "input_per_million": 1.0,
                                                        "output_per_million": 2.0}])
    return {"boss": boss, "ann": ann, "instance": instance, "provider": provider, "enqueued": enqueued,
            "app_url": deployed.app_url, "rest_key": deployed.rest_key}


def start(lab, config="guess", participants=3, bots=3, model="fake-1", **kwargs) -> BotRun:
    provider = None if model == "random" else lab["provider"]
    return services.create_run(lab["ann"], lab["instance"], session_config=config, num_participants=participants,
                               num_bots=bots, provider=provider, model=model, **kwargs)


def run_task(run: BotRun) -> BotRun:
    run_bots.apply(args=[run.pk])
    run.refresh_from_db()
    return run


def in_background(run: BotRun) -> threading.Thread:
    thread = threading.Thread(target=lambda: (run_bots.apply(args=[run.pk]), connection.close()), daemon=True)
    thread.start()
    return thread


def otree_csv(lab, path: str) -> list[dict]:
    response = httpx2.get(lab["app_url"] + path, headers={"otree-rest-key": lab["rest_key"]}, timeout=30)
    assert response.status_code == 200, response.text[:300]
    return list(csv.DictReader(io.StringIO(response.text)))


def accepted(run: BotRun) -> list[Answer]:
    return list(Answer.objects.filter(run=run, status="accepted").select_related("bot"))


def download(lab, run: BotRun, kind: str) -> str:
    client = Client()
    client.force_login(lab["ann"])
    response = client.get(f"/instances/{NAME}/bot-runs/{run.number}/{kind}")
    assert response.status_code == 200
    return response.content.decode()


def test_three_llm_bots_finish_the_game_through_every_kind_of_fault(lab, fake):
    fake.script("429", "429", "500", "timeout", "bad_json", "unknown_field", "fifty")
    run = start(lab, config="guess_survey", temperature=0.7, instructions="You are a careful student.")
    assert lab["enqueued"] == [[run.pk]]  # the task gets the run's id only: never the key
    run = run_task(run)

    assert run.status == "finished" and run.status_reason == "3 of 3 bots finished", run.status_reason
    bots = list(run.bots.all())
    assert [b.status for b in bots] == ["finished"] * 3 and all(b.reason == "" for b in bots)
    assert [b.answers for b in bots] == [10, 10, 10]  # 3 guesses + 6 survey fields + "again"
    # Every fault was met, retried within bounds and counted.
    errors = list(ModelCall.objects.filter(run=run).exclude(error="").values_list("error", flat=True))
    assert sum(e.startswith("HTTP 429") for e in errors) == 2 and sum(e.startswith("HTTP 500") for e in errors) == 1
    assert errors.count("the request timed out") == 1
    corrections = ModelCall.objects.filter(run=run, kind="correction")
    assert corrections.count() == 2 and "could not be used" in corrections.first().prompt[-1]["content"]
    rejected = Answer.objects.get(run=run, status="rejected")
    assert (rejected.field, rejected.value) == ("guess", "50")
    resubmit = ModelCall.objects.get(run=run, kind="resubmit")
    assert "50 is not allowed in this game: choose another number." in resubmit.prompt[-1]["content"]
    assert sum(b.retries for b in bots) == 4 + 2 + 1  # transport retries, corrections, the rejection

    # The answers are oTree's data: each player's guess per round, as the bots recorded them.
    ours = {(a.bot.participant_code, a.round_number): a.value for a in accepted(run) if a.field == "guess"}
    theirs = {(r["participant.code"], int(r["subsession.round_number"])): r["player.guess"]
              for r in otree_csv(lab, f"/api/export_app?app=guess&session_code={run.session_code}")}
    assert len(ours) == 9 and ours == theirs
    survey = {r["participant.code"]: r for r in otree_csv(lab, f"/api/export_app?app=survey&session_code="
                                                              f"{run.session_code}")}
    as_stored = {"True": "1", "False": "0", "true": "1", "false": "0"}  # oTree exports booleans as 1/0
    for a in accepted(run):
        if a.app == "survey":
            stored = survey[a.bot.participant_code][f"player.{a.field}"]
            assert stored == as_stored.get(a.value, a.value) or float(stored) == float(a.value), (a.field, a.value)

    # What the model was sent: the key in the header only, the parameters, the instructions,
    # the results pages it read, its own notes (memory = summary).
    requests = fake.completions()
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in requests)
    assert {r["body"]["model"] for r in requests} == {"fake-1"} and {r["body"]["temperature"] for r in requests} == {0.7}
    assert all("You are a careful student." in r["body"]["messages"][0]["content"] for r in requests)
    later = [m["content"] for r in requests for m in r["body"]["messages"] if m["role"] == "user"
             and "Pages you read since your last answer" in m["content"]]
    assert later and any("Two thirds of the average was" in text for text in later)
    assert any("Your notes from earlier pages:\nnotes after" in text for text in later)
    assert all(b.memory.startswith("notes after") for b in bots)

    # Downloads: one CSV row per answered field with the reason; conversations; summary.
    rows = list(csv.DictReader(io.StringIO(download(lab, run, "responses.csv"))))
    assert len(rows) == 30 and list(rows[0]) == ["session", "participant", "app", "round", "page", "field", "answer",
                                                 "reason", "cached"]
    first = bots[0].participant_code
    assert sorted(r["round"] for r in rows if r["field"] == "guess" and r["participant"] == first) == ["1", "2", "3"]
    assert all(r["reason"].startswith("because ") for r in rows) and {r["session"] for r in rows} == {run.session_code}
    conversations = json.loads(download(lab, run, "conversations.json"))
    assert len(conversations["bots"]) == 3 and sum(len(b["calls"]) for b in conversations["bots"]) == len(requests)
    summary = json.loads(download(lab, run, "summary.json"))
    assert summary["model"] == "fake-1" and summary["provider"] == "Fake" and summary["status"] == "finished"
    assert summary["parameters"]["temperature"] == 0.7 and summary["tokens"]["prompt"] > 0
    assert summary["estimated_cost_usd"] > 0 and summary["failed_model_calls"] == 4
    assert summary["answers"] == 30 and summary["rejected_answers"] == 1 and summary["duration_seconds"] > 0
    for text in (json.dumps(conversations), json.dumps(summary), download(lab, run, "responses.csv")):
        assert KEY not in text

    # The run page shows every bot, the totals and the session monitor link.
    client = Client()
    client.force_login(lab["ann"])
    page = client.get(f"/instances/{NAME}/bot-runs/{run.number}/").content.decode()
    assert f"SessionMonitor/{run.session_code}" in page and "3 of 3 bots finished" in page
    assert page.count('<tr data-bot="') == 3 and KEY not in page


def test_history_memory_sends_the_whole_conversation(lab, fake):
    run = run_task(start(lab, config="survey", participants=1, bots=1, memory="history"))
    assert run.status == "finished", run.status_reason
    first, second = [r["body"]["messages"] for r in fake.completions()]
    assert [m["role"] for m in first] == ["system", "user"] and "memory" not in first[0]["content"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[1]["content"] == first[1]["content"] and "Would you play again?" in second[3]["content"]


def test_a_bot_that_gives_up_is_marked_and_the_others_finish(lab, fake):
    fake.poison_first()
    run = run_task(start(lab, config="survey", participants=3, bots=3))
    bots = list(run.bots.all())
    gave_up = [b for b in bots if b.status == "gave_up"]
    assert len(gave_up) == 1 and sum(b.status == "finished" for b in bots) == 2
    assert gave_up[0].reason.startswith("the model's reply on Survey stayed unusable after 3 corrections: "
                                        "the reply is not valid JSON")
    assert fake.poisoned == 1 + engine.MAX_CORRECTIONS
    assert run.status == "finished" and f"1 gave up (bot {gave_up[0].index}: the model's reply" in run.status_reason
    assert not Answer.objects.filter(bot=gave_up[0]).exists()


def test_a_redirect_out_of_the_instance_stops_that_bot_with_the_reason(lab, fake, manager_port):
    """The instance's code (settings.py wraps oTree's app) redirects one participant's page
    to the lab machine's loopback: that bot stops with the reason, before anything is
    fetched there; the other bots finish; nothing of that answer is in any export."""
    run = run_task(start(lab, config="escape", participants=3, bots=3))
    bots = list(run.bots.all())
    stopped = [b for b in bots if b.status == "gave_up"]
    assert len(stopped) == 1, [(b.status, b.reason) for b in bots]
    assert stopped[0].reason == (f"the instance redirected to {manager_port.url}secret-page, outside the "
                                 "instance; the bot stopped")
    assert sorted(b.status for b in bots) == ["finished", "finished", "gave_up"]
    assert run.status == "finished" and "2 of 3 bots finished; 1 gave up" in run.status_reason
    assert manager_port.requests == []  # never asked
    for kind in ("responses.csv", "conversations.json", "summary.json"):
        assert manager_port.secret not in download(lab, run, kind)
    assert all(manager_port.secret not in json.dumps(r["body"]) for r in fake.completions())


def test_human_seats_play_beside_the_bots(lab):
    run = start(lab, config="guess", participants=3, bots=2, model="random")
    worker = in_background(run)
    wait_until(lambda: BotRun.objects.get(pk=run.pk).session_code, 60, 0.2, "the session")
    client = Client()
    client.force_login(lab["ann"])
    page = client.get(f"/instances/{NAME}/bot-runs/{run.number}/").content.decode()
    run.refresh_from_db()
    [seat] = run.human_seats
    assert seat["id_in_session"] == 3  # the link the experimenter hands out: at the instance's address
    assert f"{lab['instance'].url}InitializeParticipant/{seat['code']}" in page
    link = f"{lab['app_url']}/InitializeParticipant/{seat['code']}"  # (the same app, reached directly)
    # The human plays: a guess per round, then the results page.
    human = httpx2.Client(follow_redirects=True, timeout=30)
    response = human.get(link)
    for _round in range(3):
        assert "/Guess/" in str(response.url), response.url
        response = human.post(str(response.url), data={"guess": "10"})
        response = wait_until(lambda r=response: _next_page(human, r), 60, 0.2, "the results page")
        response = human.post(str(response.url), data={})
    assert "OutOfRangeNotification" in str(response.url)
    worker.join(timeout=90)
    run.refresh_from_db()
    assert run.status == "finished" and run.status_reason == "2 of 2 bots finished"
    assert [b.answers for b in run.bots.all()] == [3, 3]
    assert all(a.reason == "random choice (offline random policy)" for a in accepted(run))
    assert not ModelCall.objects.filter(run=run).exists()  # no model, no cost


def _next_page(client, response):
    """The page after a wait page (None while oTree still waits)."""
    if response.headers.get("otree-wait-page") != "1":
        return response
    again = client.get(str(response.url))
    return again if again.headers.get("otree-wait-page") != "1" else None


def test_stop_stops_every_bot(lab):
    run = start(lab, config="guess", participants=3, bots=2, model="random")
    worker = in_background(run)
    wait_until(lambda: Bot.objects.filter(run=run, status="wait_page").count() == 2, 60, 0.2,
               "both bots waiting for the human who never comes")
    client = Client()
    client.force_login(lab["ann"])
    response = client.post(f"/instances/{NAME}/bot-runs/{run.number}/stop/")
    assert response.status_code == 302
    worker.join(timeout=30)
    assert not worker.is_alive()
    run.refresh_from_db()
    assert run.status == "stopped" and run.status_reason == "stopped on request"
    assert [(b.status, b.reason) for b in run.bots.all()] == [("stopped", "stopped on request")] * 2
    assert not Answer.objects.filter(run=run, status="pending").exists()
    assert not locks.held(f"botrun:{run.pk}")


def test_pending_answers_of_a_crashed_worker_are_sent_again_not_asked_again(lab, fake):
    """A worker that recorded its answers and died before sending them: the next worker
    sends exactly those answers (no second model call for the page)."""
    fake.poison_first()  # the first worker's only bot gets nothing usable: it stops on the first page
    run = run_task(start(lab, config="survey", participants=1, bots=1))
    bot = run.bots.get()
    assert bot.status == "gave_up" and bot.page == "Survey"
    calls_before = len(fake.completions())
    values = {"nickname": "Kim", "age": "33", "height": "1.7", "colour": "green", "fairness": "3",
              "newsletter": "false"}
    Answer.objects.bulk_create([Answer(run=run, bot=bot, app="survey", page="Survey", page_index=bot.page_index,
                                       field=k, value=v, reason="recorded before the crash") for k, v in values.items()])
    Bot.objects.filter(pk=bot.pk).update(status="playing", reason="")
    BotRun.objects.filter(pk=run.pk).update(status="running", finished_at=None)
    run = run_task(run)
    assert run.status == "finished", run.status_reason
    asked = [r["body"]["messages"][-1]["content"] for r in fake.completions()[calls_before:]]
    assert len(asked) == 1 and "Would you play again?" in asked[0]  # only the next page was asked
    [row] = otree_csv(lab, f"/api/export_app?app=survey&session_code={run.session_code}")
    assert (row["player.nickname"], row["player.age"], row["player.colour"], row["player.fairness"]) == (
        "Kim", "33", "green", "3")
    assert Answer.objects.filter(run=run, page="Survey", status="accepted").count() == 6


def test_a_worker_killed_mid_run_is_resumed_and_nothing_is_answered_twice(lab, fake, monkeypatch):
    run = start(lab, config="guess", participants=3, bots=3)
    fake.hold(at=4)  # round 2: a bot is asking the model when its worker dies
    env = {**os.environ, "DATABASE_URL": database_url(), "LAB_LOCK_TTL": "2"}
    code = ("import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); django.setup();"
            f"from bots.tasks import run_bots; run_bots.apply(args=[{run.pk}])")
    worker = subprocess.Popen([sys.executable, "-c", code], cwd=settings.BASE_DIR, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert fake.held.wait(timeout=90), "the worker never reached the held request"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
        fake.release()
    run.refresh_from_db()
    assert run.status == "running" and run.deliveries == 1
    answered_before = Answer.objects.filter(run=run, status__in=["accepted", "pending"]).count()
    assert answered_before >= 3
    # The lock of the dead worker expires (LAB_LOCK_TTL); the sweep sees the stale heartbeat.
    wait_until(lambda: not locks.held(f"botrun:{run.pk}"), 30, 0.2, "the dead worker's lock to expire")
    monkeypatch.setattr(services, "STALE_SECONDS", 0)
    assert services.sweep()["resumed"] == [run.pk] and lab["enqueued"][-1] == [run.pk]
    run = run_task(run)
    assert run.status == "finished" and run.deliveries == 2, run.status_reason
    rows = accepted(run)
    keys = [(a.bot_id, a.page_index, a.field) for a in rows]
    assert len(keys) == len(set(keys)) == 9  # 3 bots x 3 rounds, each once
    assert not Answer.objects.filter(run=run, status="pending").exists()
    # One usable model answer per bot and page; oTree has the same guesses.
    answered = ModelCall.objects.filter(run=run, error="", kind="answer").values_list("bot_id", "page_index")
    assert len(answered) == len(set(answered)) == 9
    theirs = {(r["participant.code"], int(r["subsession.round_number"])): r["player.guess"]
              for r in otree_csv(lab, f"/api/export_app?app=guess&session_code={run.session_code}")}
    assert theirs == {(a.bot.participant_code, a.round_number): a.value for a in rows}
