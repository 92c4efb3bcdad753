"""Bot experiments against the real oTree app of the bot tests (deployed once for this
module: tests/bots_otree.py) and the fake OpenAI-compatible server (tests/fake_llm.py), with
a real Celery worker (a subprocess on the `bots` queue, as the lab runs it): the experiment's
scheduler releases runs to the worker, every run's end releases the next.

What a user would notice: a 2 x 2 x 2 design with 2 repetitions, made on the page, plays
every run with the requested models, temperatures and instructions, never more than
`max_parallel` at once, and shows its progress; a worker killed in the middle of an
experiment is replaced and the experiment goes on without answering anything twice; Stop
stops the playing run and the waiting ones; Run again repeats the design with the same
seeds; the API refuses a bad design with the field's own error.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client

from bots import experiments, llm, services
from bots.models import Answer, Bot, BotExperiment, BotRun, ModelCall, Provider
from bots.tasks import sweep
from manager import locks
from manager.accounts.models import User
from manager.accounts.services import create_token
from tests import bots_otree
from tests.db_helpers import database_url
from tests.fake_llm import FakeLLM
from tests.waits import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

NAME = "bots-exp"
KEY_A, KEY_B = "sk-fake-a-1111", "sk-fake-b-2222"


@pytest.fixture(scope="module")
def deployed(redis_server, django_db_setup, django_db_blocker):
    with bots_otree.deployed_for_module(django_db_blocker, NAME, "exp-deployer") as found:
        yield found


class Worker:
    """A Celery worker on the `bots` queue in its own process group (killable whole)."""

    def __init__(self, folder: Path, env: dict, concurrency: int = 3):
        self.log_path = folder / f"worker-{os.urandom(3).hex()}.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "manager", "worker", "-Q", "bots", "-l", "INFO",
             "-c", str(concurrency), "-P", "prefork", "-n", f"experiments-test-{os.getpid()}-{os.urandom(2).hex()}@%h"],
            cwd=settings.BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def fake():
    with FakeLLM(slow_seconds=2.5) as server:
        yield server


@pytest.fixture
def lab(deployed, fake, monkeypatch, boss, ann, tmp_path):
    from manager.celery import app

    monkeypatch.setattr(llm, "BACKOFF_BASE", 0.02)
    app.control.purge()  # nothing an earlier test enqueued
    instance = bots_otree.attach(deployed, ann)
    a = Provider.objects.create(name="Alpha", base_url=fake.url, api_key=KEY_A, timeout_seconds=5,
                                offered_models=[{"name": "alpha-1", "input_per_million": 1.0,
                                                 "output_per_million": 2.0}])
    b = Provider.objects.create(name="Beta", base_url=fake.url, api_key=KEY_B, timeout_seconds=5,
                                offered_models=[{"name": "beta-7", "input_per_million": 3.0,
                                                 "output_per_million": 4.0}])
    env = {**os.environ, "DATABASE_URL": database_url(), "LAB_LOCK_TTL": "2", "LAB_BOT_RUNS": "3"}
    workers = []

    def start_worker():
        workers.append(Worker(tmp_path, env))
        return workers[-1]

    start_worker()
    try:
        yield {"boss": boss, "ann": ann, "instance": instance, "alpha": a, "beta": b, "workers": workers,
               "start_worker": start_worker, "app_url": deployed.app_url}
    finally:
        for worker in workers:
            worker.stop()


def ended(experiment: BotExperiment, lab, timeout: float = 240) -> BotExperiment:
    def done():
        experiment.refresh_from_db()
        return not experiment.is_active

    wait_until(done, timeout, 0.3, lambda: f"the experiment to end: {experiments.progress(experiment)}\n"
                                           + lab["workers"][-1].tail())
    return experiment


def design(**changes) -> dict:
    base = {"session_config": "survey", "num_participants": 1, "num_bots": 1,
            "models": [{"provider": "Alpha", "model": "alpha-1"}], "temperatures": [0.5], "repetitions": 1,
            "max_parallel": 1}
    return {**base, **changes}


def max_overlap(runs) -> int:
    """The most runs playing at the same moment, from their recorded start and end times."""
    edges = sorted([(r.started_at, 1) for r in runs] + [(r.finished_at, -1) for r in runs],
                   key=lambda e: (e[0], e[1]))
    most = now = 0
    for _t, step in edges:
        now += step
        most = max(most, now)
    return most


def no_answer_twice(runs) -> None:
    for run in runs:
        keys = list(Answer.objects.filter(run=run, status="accepted").values_list("bot_id", "page_index", "field"))
        assert len(keys) == len(set(keys)), f"run #{run.number} answered a field twice"
        asked = list(ModelCall.objects.filter(run=run, error="", kind="answer").values_list("bot_id", "page_index"))
        assert len(asked) == len(set(asked)), f"run #{run.number} asked the model twice for a page"
        assert not Answer.objects.filter(run=run, status="pending").exists()


def test_a_2x2x2_design_with_repetitions_made_on_the_page_plays_every_run(lab, fake):
    client = Client()
    client.force_login(lab["ann"])
    base = f"/instances/{NAME}/bot-runs/experiments/"
    page = client.get(f"/instances/{NAME}/bot-runs/").content.decode()
    assert f'href="{base}"' in page  # the bot runs page leads to the experiments
    form = client.get(base).content.decode()
    choices = {m: f"{p.pk}:{m}" for p, m in ((lab["alpha"], "alpha-1"), (lab["beta"], "beta-7"))}
    assert all(f'value="{v}"' in form for v in choices.values())
    response = client.post(base, {
        "title": "two models, two temperatures, two framings", "session_config": "survey",
        "num_participants": 1, "num_bots": 1, "models": list(choices.values()), "temperatures": "0, 0.7",
        "instructions": "plain:\nrisky: You love taking risks.", "memory": ["summary"], "repetitions": 2,
        "max_parallel": 2, "rate_limit": 600, "concurrency": 5, "time_limit_minutes": 10})
    assert response.status_code == 302, response.content.decode()[-2000:]
    experiment = BotExperiment.objects.get(instance=lab["instance"])
    assert response["Location"] == f"{base}{experiment.number}/"
    assert experiment.runs.count() == 16 and experiment.max_parallel == 2

    experiment = ended(experiment, lab)
    runs = list(experiment.runs.order_by("number"))
    assert experiment.status == "finished" and experiment.status_reason == "16 of 16 runs finished", [
        (r.number, r.status, r.status_reason) for r in runs if r.status != "finished"]
    assert [r.status for r in runs] == ["finished"] * 16, [(r.number, r.status, r.status_reason) for r in runs]
    # Every cell of the design, twice, recorded as the run's factors; the seeds are recorded and distinct.
    cells = sorted((r.factors["provider"], r.factors["model"], r.factors["temperature"], r.factors["instructions"],
                    r.factors["memory"], r.factors["repetition"]) for r in runs)
    assert cells == sorted((p, m, t, v, "summary", rep) for p, m in (("Alpha", "alpha-1"), ("Beta", "beta-7"))
                           for t in (0.0, 0.7) for v in ("plain", "risky") for rep in (1, 2))
    assert len({r.seed for r in runs}) == 16 and all(r.seed is not None for r in runs)
    assert all(r.instructions == ("You love taking risks." if r.factors["instructions"] == "risky" else "")
               for r in runs)
    # The fake server saw exactly those models, keys, temperatures and instructions: 2 pages a run.
    seen = {}
    for request in fake.completions():
        body, key = request["body"], request["headers"]["authorization"]
        risky = "You love taking risks." in body["messages"][0]["content"]
        combo = (key, body["model"], body["temperature"], risky)
        seen[combo] = seen.get(combo, 0) + 1
    assert seen == {(f"Bearer {k}", m, t, r): 4 for k, m in ((KEY_A, "alpha-1"), (KEY_B, "beta-7"))
                    for t in (0, 0.7) for r in (False, True)}
    # Never more than max_parallel runs at once (the worker could play 3).
    assert max_overlap(runs) <= 2
    no_answer_twice(runs)
    progress = experiments.progress(experiment)
    assert progress["finished"] == 16 and progress["failed"] == progress["waiting"] == progress["running"] == 0
    assert progress["tokens"] == sum(b.prompt_tokens + b.completion_tokens
                                     for b in Bot.objects.filter(run__experiment=experiment)) > 0
    # The page: progress, the runs with their factors and links, Run again.
    detail = client.get(f"{base}{experiment.number}/").content.decode()
    assert "16 of 16 runs finished" in detail and detail.count('<tr data-run="') == 16
    assert f'href="/instances/{NAME}/bot-runs/{runs[0].number}/"' in detail and "risky" in detail
    assert f"{base}{experiment.number}/rerun/" in detail and f"{base}{experiment.number}/stop/" not in detail
    assert f'href="{base}{experiment.number}/results.csv"' in detail  # the analysis-ready download


def test_a_worker_killed_mid_experiment_is_replaced_and_nothing_is_answered_twice(lab, fake, monkeypatch):
    experiment = experiments.create_experiment(lab["ann"], lab["instance"], design(
        session_config="guess", num_participants=3, num_bots=3, repetitions=3, max_parallel=1))
    first = experiment.runs.order_by("number").first()
    fake.hold(at=4)  # round 2 of the first run: a bot is asking the model when its worker dies
    try:
        assert fake.held.wait(timeout=120), "the worker never reached the held request\n" + lab["workers"][0].tail()
        lab["workers"][0].kill()
    finally:
        fake.release()
    first.refresh_from_db()
    assert first.status == "running" and first.deliveries == 1
    assert experiment.runs.filter(status="waiting").count() == 2  # nothing else was released meanwhile
    lab["start_worker"]()
    # The dead worker's lock expires (LAB_LOCK_TTL=2); the minute sweep sees the stale heartbeat.
    wait_until(lambda: not locks.held(f"botrun:{first.pk}"), 30, 0.2, "the dead worker's lock to expire")
    monkeypatch.setattr(services, "STALE_SECONDS", 0)
    swept = sweep()  # the beat's task, run here
    assert swept["resumed"] == [first.pk] and swept["experiments"] == [experiment.pk]
    experiment = ended(experiment, lab)
    runs = list(experiment.runs.order_by("number"))
    assert experiment.status == "finished" and experiment.status_reason == "3 of 3 runs finished"
    assert [r.status for r in runs] == ["finished"] * 3 and runs[0].deliveries == 2
    assert [b.answers for r in runs for b in r.bots.all()] == [3] * 9
    no_answer_twice(runs)
    assert max_overlap(runs) == 1

    # Run again (API): the same design, factors and seeds; it plays to the end too.
    token = create_token(lab["ann"], name="exp")[1]
    api = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    response = api.post(f"/api/v1/instances/{NAME}/bot-experiments/{experiment.number}/rerun")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["source"] == experiment.number and body["design"] == experiment.design
    assert response["Location"] == f"/api/v1/instances/{NAME}/bot-experiments/{body['id']}"
    again = BotExperiment.objects.get(instance=lab["instance"], number=body["id"])
    pairs = [(r.factors, r.seed, r.source_id) for r in again.runs.order_by("number")]
    assert pairs == [(r.factors, r.seed, r.pk) for r in runs]
    again = ended(again, lab)
    assert again.status == "finished" and again.status_reason == "3 of 3 runs finished"
    progress = api.get(f"/api/v1/instances/{NAME}/bot-experiments/{again.number}").json()["progress"]
    assert (progress["runs"], progress["finished"], progress["seconds_left"]) == (3, 3, 0)


def test_stop_stops_the_playing_run_and_the_waiting_ones(lab):
    # Random bots in a 3-player game with 2 bots: they wait for the human who never comes.
    experiment = experiments.create_experiment(lab["ann"], lab["instance"], design(
        session_config="guess", num_participants=3, num_bots=2, models=["random"], repetitions=3, max_parallel=1))
    first = experiment.runs.order_by("number").first()
    wait_until(lambda: Bot.objects.filter(run=first, status="wait_page").count() == 2, 90, 0.2,
               lambda: "both bots on the wait page\n" + lab["workers"][0].tail())
    client = Client()
    client.force_login(lab["ann"])
    page = client.get(f"/instances/{NAME}/bot-runs/experiments/{experiment.number}/").content.decode()
    assert "Stop" in page and 'data-p="running">1<' in page and 'data-p="waiting">2<' in page
    response = client.post(f"/instances/{NAME}/bot-runs/experiments/{experiment.number}/stop/")
    assert response.status_code == 302
    experiment = ended(experiment, lab, timeout=90)
    runs = list(experiment.runs.order_by("number"))
    assert experiment.status == "stopped"
    assert experiment.status_reason == "the experiment was stopped: 0 of 3 runs finished, 3 stopped"
    assert [(r.status, r.status_reason) for r in runs] == [("stopped", "stopped on request")] + [
        ("stopped", "the experiment was stopped")] * 2
    assert not runs[1].session_code and not runs[2].session_code  # never started


def test_the_api_refuses_a_bad_design_with_the_field_and_creates_nothing(lab, bob):
    token = create_token(lab["ann"], name="exp")[1]
    api = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    url = f"/api/v1/instances/{NAME}/bot-experiments"

    def post(**changes):
        return api.post(url, json.dumps(design(**changes)), content_type="application/json")

    cases = [
        ({"models": [{"provider": "Gamma", "model": "x"}]},
         "models: model 1: there is no such model provider (providers: Alpha, Beta)."),
        ({"models": [{"provider": "Alpha", "model": "beta-7"}]},
         "models: model 1: Alpha offers no model 'beta-7' (models: alpha-1)."),
        ({"models": []}, 'models: name at least one model'),
        ({"temperatures": [0.5, 3]}, "temperatures: each temperature must be a number from 0 to 2."),
        ({"temperatures": [0.5, 0.5]}, "temperatures: a temperature is listed twice."),
        ({"instructions": [{"name": "a", "text": "x"}, {"name": "a", "text": "y"}]},
         "instructions: variant 2: the name 'a' is used twice."),
        ({"memory": ["everything"]}, "memory: name at least one memory mode of summary, history."),
        ({"max_parallel": 9}, "max_parallel: must be a whole number from 1 to 2"),
        ({"num_bots": 2}, "num_bots: at most the number of participants (1)."),
        ({"session_config": "nope"}, "session_config: no session config 'nope' in the live release"),
        ({"budget_usd": -1}, "budget_usd: must be an amount in USD above 0, at most 100000"),
        ({"repetitions": 100, "temperatures": [0, 0.5, 1], "models": [{"provider": "Alpha", "model": "alpha-1"},
                                                                        {"provider": "Beta", "model": "beta-7"}]},
         "repetitions: the design makes 600 runs (2 models x 3 temperatures x 1 instruction variants x 1 memory "
         "modes x 100 repetitions); at most 500."),
    ]
    for changes, detail in cases:
        response = post(**changes)
        assert response.status_code == 422, (changes, response.content)
        assert response.json()["detail"].startswith(detail), (changes, response.json()["detail"])
    assert api.post(url, "{not json", content_type="application/json").status_code == 400
    assert post(colour="blue").status_code == 422  # an unknown field is not ignored
    User.objects.filter(pk=lab["ann"].pk).update(bot_monthly_budget_usd=0)  # a lab manager's cap, spent
    refused = post()
    assert refused.status_code == 422 and refused.json()["detail"].startswith(
        "budget_usd: ann's monthly bot budget of $0 is spent"), refused.content
    assert not BotExperiment.objects.exists() and not BotRun.objects.exists()

    # A good one: 201 with its progress; listed; bob (not the owner) sees nothing of it.
    response = post(models=[{"model": "random"}], session_config="guess", num_participants=3, num_bots=2,
                    repetitions=2)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["progress"]["runs"] == 2 and body["design"]["models"] == [{"provider": "", "model": "random"}]
    assert [e["id"] for e in api.get(url).json()] == [body["id"]]
    bob_api = Client(HTTP_AUTHORIZATION=f"Bearer {create_token(bob, name='b')[1]}")
    assert bob_api.get(f"{url}/{body['id']}").status_code == 404
    stopped = api.post(f"{url}/{body['id']}/stop")
    assert stopped.status_code == 202
    experiment = ended(BotExperiment.objects.get(number=body["id"]), lab, timeout=90)
    assert experiment.status == "stopped", (experiment.status_reason, [
        (r.status, r.status_reason) for r in experiment.runs.all()], lab["workers"][-1].tail())


def test_at_the_experiment_budget_no_further_run_starts(lab):
    """The experiment's cap (budget_usd) is checked by every scheduler pass: the waiting
    runs are stopped with the reason; the playing one ends (here: stopped, as its engine
    would at its own check), then the experiment is stopped with the same reason."""
    experiment = experiments.create_experiment(lab["ann"], lab["instance"], design(
        session_config="guess", num_participants=3, num_bots=2, models=["random"], repetitions=3, max_parallel=1,
        budget_usd=0.01))
    first = experiment.runs.order_by("number").first()
    wait_until(lambda: Bot.objects.filter(run=first, status="wait_page").count() == 2, 90, 0.2,
               lambda: "both bots on the wait page\n" + lab["workers"][0].tail())
    bot = first.bots.first()
    ModelCall.objects.create(run=first, bot=bot, page="Guess", prompt=[], cost_usd=0.012)  # spent: $0.012
    assert sweep()["experiments"] == [experiment.pk]
    experiment.refresh_from_db()
    reason = "the experiment's budget of $0.01 was reached ($0.0120 spent)"
    assert (experiment.status, experiment.status_reason) == ("stopping", reason)
    assert [(r.status, r.status_reason) for r in experiment.runs.order_by("number")][1:] == [("stopped", reason)] * 2
    services.stop_run(lab["ann"], first)
    experiment = ended(experiment, lab, timeout=90)
    assert experiment.status == "stopped"
    assert experiment.status_reason == f"{reason}: 0 of 3 runs finished, 3 stopped"
    assert experiments.progress(experiment)["cost_usd"] == 0.012
