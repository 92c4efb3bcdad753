"""Budgets, the manifest, "Run again" and the replay cache, on a real oTree 6 app on Docker
(its own deployment for this module: tests/bots_otree.py) with the fake OpenAI-compatible
server (tests/fake_llm.py), through the real Celery task, Redis and the database.

What a user would notice: a run stops at its budget (stopped, the reason names it, what it
spent is at the cap and over it by at most the calls in flight); an experimenter whose
monthly budget is spent cannot start a model run and their running run stops; a run of an
experiment whose budget is spent stops before its first call; a re-run from the replay
cache asks the model nothing and gives every bot the same answers, marked cached in the
downloads; the manifest says which model answered (not only which was asked for), the
seed, fingerprint, prompts and oTree release, and never the provider's key; lab managers
set the monthly budget on the account page and through the API.
"""

import csv
import io
import json
import re
import threading

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test import Client

from bots import budget, llm, manifest, policy
from bots.models import Answer, Bot, BotExperiment, BotRun, CachedReply, ModelCall, Provider
from bots.tasks import run_bots
from manager.accounts.models import User
from manager.accounts.services import create_token
from manager.version import full_version
from tests import bots_otree
from tests.fake_llm import FakeLLM
from tests.waits import wait_until

pytestmark = [pytest.mark.django_db(transaction=True)]
docker = pytest.mark.docker  # the tests on the deployed app

NAME = "bots-budget"
KEY = "sk-fake-budget-key-7373"
RETURNED = "fake-1-2026-11-30"  # the snapshot the fake provider says answered
FINGERPRINT = "fp_budget_42"
PRICES = {"input_per_million": 10.0, "output_per_million": 20.0}  # ~$0.004 a call here


@pytest.fixture(scope="module")
def deployed(redis_server, django_db_setup, django_db_blocker):
    with bots_otree.deployed_for_module(django_db_blocker, NAME, "budget-deployer") as found:
        yield found


@pytest.fixture
def fake():
    with FakeLLM(slow_seconds=2.5, model_id=RETURNED, fingerprint=FINGERPRINT) as server:
        yield server


@pytest.fixture
def lab(deployed, fake, monkeypatch, boss, ann):
    monkeypatch.setattr(llm, "BACKOFF_BASE", 0.02)
    monkeypatch.setattr(run_bots, "apply_async", lambda args, **kw: None)
    instance = bots_otree.attach(deployed, ann, public_port=int(deployed.app_url.rsplit(":", 1)[1]))
    provider = Provider.objects.create(name="Fake", base_url=fake.url, api_key=KEY, timeout_seconds=5,
                                       offered_models=[{"name": "fake-1", **PRICES}])
    return {"boss": boss, "ann": ann, "instance": instance, "provider": provider}


def start(lab, config="guess", participants=3, bots=3, **kwargs) -> BotRun:
    return BotRun.objects.get(pk=_create(lab, config, participants, bots, **kwargs).pk)


def _create(lab, config, participants, bots, **kwargs):
    from bots import services

    return services.create_run(lab["ann"], lab["instance"], session_config=config, num_participants=participants,
                               num_bots=bots, provider=lab["provider"], model="fake-1", **kwargs)


def run_task(run: BotRun) -> BotRun:
    run_bots.apply(args=[run.pk])
    run.refresh_from_db()
    return run


def in_background(run: BotRun) -> threading.Thread:
    thread = threading.Thread(target=lambda: (run_bots.apply(args=[run.pk]), connection.close()), daemon=True)
    thread.start()
    return thread


def download(user, run: BotRun, kind: str) -> str:
    client = Client()
    client.force_login(user)
    response = client.get(f"/instances/{NAME}/bot-runs/{run.number}/{kind}")
    assert response.status_code == 200, kind
    return response.content.decode()


def max_call_cost(run: BotRun) -> float:
    return max(ModelCall.objects.filter(run=run).values_list("cost_usd", flat=True))


@docker
def test_a_run_stops_at_its_budget(lab, fake):
    run = run_task(start(lab, budget_usd=0.01, concurrency=3))

    spent = budget.run_spent(run)
    assert run.status == "stopped", run.status_reason
    assert run.status_reason == f"the run's budget of $0.01 was reached (${spent:.4f} spent)"
    # At the cap, and over it by at most the calls in flight when it was reached.
    assert 0.01 <= spent <= 0.01 + run.concurrency * max_call_cost(run)
    calls = list(ModelCall.objects.filter(run=run))
    assert len(calls) == len(fake.completions()) < 9  # 3 bots x 3 rounds would be 9
    for call in calls:  # every call costs its tokens at the run's prices
        assert call.cost_usd == pytest.approx(budget.call_cost(call.prompt_tokens, call.completion_tokens, 10.0, 20.0))
        assert call.cost_usd > 0 and not call.cached
    bots = list(run.bots.all())
    assert {(b.status, b.reason) for b in bots if b.status != "finished"} == {("stopped", run.status_reason)}
    assert not Answer.objects.filter(run=run, status="pending").exists()  # what oTree took is settled
    summary = json.loads(download(lab["ann"], run, "summary.json"))
    assert summary["spent_usd"] == pytest.approx(spent) and summary["budget_usd"] == 0.01

    # "Run again" on the run page: a new run with the same parameters and budget.
    client = Client()
    client.force_login(lab["ann"])
    response = client.post(f"/instances/{NAME}/bot-runs/{run.number}/rerun/")
    again = BotRun.objects.get(instance=lab["instance"], number=run.number + 1)
    assert response.status_code == 302 and response["Location"] == f"/instances/{NAME}/bot-runs/{again.number}/"
    assert (again.source_id, again.budget_usd, again.concurrency, again.model, again.status) == (
        run.pk, 0.01, 3, "fake-1", "queued")
    page = client.get(response["Location"]).content.decode()
    assert f"runs <a href=\"/instances/{NAME}/bot-runs/{run.number}/\">#{run.number}</a> again" in page


@docker
def test_the_monthly_budget_refuses_new_runs_and_stops_a_running_one(lab, fake):
    ann = lab["ann"]
    fake.hold(at=3)  # round 2 of the first bot: the run is busy while a lab manager sets the cap
    run = start(lab)
    worker = in_background(run)
    assert fake.held.wait(timeout=90), "the run never reached the held request"
    assert budget.month_spent(ann.pk) > 0.01  # round 1 cost more than the cap about to be set
    User.objects.filter(pk=ann.pk).update(bot_monthly_budget_usd=0.01)
    wait_until(lambda: BotRun.objects.get(pk=run.pk).status in ("stopping", "stopped"), 30, 0.2,
               "the heartbeat to see the monthly budget spent")
    fake.release()
    worker.join(timeout=60)
    run.refresh_from_db()
    ann.refresh_from_db()
    spent = budget.month_spent(ann.pk)
    assert run.status == "stopped", run.status_reason
    match = re.fullmatch(r"ann's monthly bot budget of \$0\.01 was reached \(\$([0-9.]+) spent this month\)",
                         run.status_reason)
    assert match, run.status_reason
    seen = float(match.group(1))  # when the heartbeat looked; calls in flight then may have added a little
    assert 0.01 <= seen <= spent <= seen + run.concurrency * max_call_cost(run)
    assert budget.run_spent(run) == pytest.approx(spent)
    assert {(b.status, b.reason) for b in run.bots.all()} == {("stopped", run.status_reason)}  # none finished

    # Now a new model run is refused with the reason (form and API); the random policy is free.
    with pytest.raises(ValidationError) as refused:
        _create(lab, "guess", 3, 3)
    assert refused.value.message_dict["budget_usd"] == [
        f"ann's monthly bot budget of $0.01 is spent (${spent:.4f} this month); a lab manager can raise it on the "
        "account's page"]
    _token, raw = create_token(ann, name="budget test")
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    response = api.post(f"/api/v1/instances/{NAME}/bot-runs", {"session_config": "guess", "num_participants": 3,
                                                               "num_bots": 3, "provider": "Fake", "model": "fake-1"},
                        content_type="application/json")
    assert response.status_code == 422 and "monthly bot budget of $0.01 is spent" in response.json()["detail"]
    response = api.post(f"/api/v1/instances/{NAME}/bot-runs", {"session_config": "guess", "num_participants": 3,
                                                               "num_bots": 3, "model": "random", "budget_usd": 0},
                        content_type="application/json")
    assert response.status_code == 422 and "budget_usd: must be a positive number" in response.json()["detail"]
    response = api.post(f"/api/v1/instances/{NAME}/bot-runs", {"session_config": "guess", "num_participants": 3,
                                                               "num_bots": 3, "model": "random"},
                        content_type="application/json")
    assert response.status_code == 201
    page = Client()
    page.force_login(ann)
    text = page.get(f"/instances/{NAME}/bot-runs/").content.decode()
    assert f"${spent:.4f} of $0.01 spent this month" in text and "new model runs are refused" in text
    response = page.post(f"/instances/{NAME}/bot-runs/", {
        "session_config": "guess", "num_participants": 3, "num_bots": 3, "model": f"{lab['provider'].pk}:fake-1",
        "temperature": 1, "memory": "summary", "rate_limit": 60, "concurrency": 10, "time_limit_minutes": 5,
        "budget_usd": "2", "use_cache": "on"})
    assert response.status_code == 422 and "monthly bot budget of $0.01 is spent" in response.content.decode()
    assert BotRun.objects.filter(instance=lab["instance"], provider__isnull=False).count() == 1  # nothing new


@docker
def test_a_run_of_an_experiment_whose_budget_is_spent_stops_before_its_first_call(lab, fake):
    experiment = BotExperiment.objects.create(instance=lab["instance"], number=1, created_by=lab["ann"],
                                              budget_usd=1.0)
    first = start(lab)
    BotRun.objects.filter(pk=first.pk).update(experiment=experiment)
    first = run_task(first)
    assert first.status == "finished", first.status_reason
    spent = budget.experiment_spent(experiment)
    assert spent == pytest.approx(budget.run_spent(first)) and spent > 0.01
    BotExperiment.objects.filter(pk=experiment.pk).update(budget_usd=0.01)  # its budget is now spent

    second = start(lab)
    BotRun.objects.filter(pk=second.pk).update(experiment=experiment)
    asked = len(fake.completions())
    second = run_task(second)
    reason = f"the experiment's budget of $0.01 was reached (${spent:.4f} spent)"
    assert budget.exhausted(second) == reason
    assert (second.status, second.status_reason, second.session_code) == ("stopped", reason, "")
    assert len(fake.completions()) == asked and not ModelCall.objects.filter(run=second).exists()


@docker
def test_manifest_and_a_rerun_from_the_replay_cache(lab, fake):
    run = run_task(start(lab, config="guess_survey", use_cache=True, seed=42, temperature=0.4,
                         instructions="You are a careful student.", budget_usd=5.0))
    assert run.status == "finished", run.status_reason
    requests = fake.completions()
    assert requests and {r["body"].get("seed") for r in requests} == {42}  # the seed reaches the provider
    assert CachedReply.objects.filter(run=run).count() == len(requests)

    # The manifest: the model that answered, not only the one asked for; fingerprint, seed,
    # prompts, the oTree release and config; never the key.
    assert (run.returned_model, run.system_fingerprint) == (RETURNED, FINGERPRINT)
    assert set(ModelCall.objects.filter(run=run).values_list("returned_model", "system_fingerprint")) == {
        (RETURNED, FINGERPRINT)}
    data = json.loads(download(lab["ann"], run, "manifest.json"))
    assert data["product_version"] == full_version() and data["model"] == "fake-1"
    assert data["provider"] == {"name": "Fake", "base_url": fake.url}
    assert data["returned_models"] == [RETURNED] and data["system_fingerprints"] == [FINGERPRINT]
    assert data["seed"] == 42 and data["use_cache"] is True
    assert data["parameters"]["temperature"] == 0.4 and data["parameters"]["max_tokens"] == llm.MAX_TOKENS
    assert data["parameters"]["response_format"] == "json_object"
    assert data["parameters"]["instructions"] == "You are a careful student."
    assert data["prompts"]["version"] == policy.TEMPLATE_VERSION
    assert data["prompts"]["system"] == requests[0]["body"]["messages"][0]["content"]
    assert "Fields to fill in (JSON):" in data["prompts"]["page_message"]
    release = lab["instance"].live_release
    assert data["otree"]["release"] == release.number and data["otree"]["commit"] == release.commit
    assert data["otree"]["session_config"]["name"] == "guess_survey"
    assert data["session"] == run.session_code and data["started_at"] and data["ended_at"]
    assert data["budgets_usd"] == {"run": 5.0, "experiment": None, "monthly": None}
    summary = json.loads(download(lab["ann"], run, "summary.json"))
    assert summary["manifest"]["returned_models"] == [RETURNED]
    assert manifest.public_url("https://user:sk-secret@api.example.com/v1?key=sk-x") == "https://api.example.com/v1"

    # Run again through the API with the replay cache: no model call, the same answers.
    _token, raw = create_token(lab["ann"], name="rerun test")
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    response = api.post(f"/api/v1/instances/{NAME}/bot-runs/{run.number}/rerun", {"use_cache": True},
                        content_type="application/json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["rerun_of"] == run.number and body["use_cache"] is True and body["seed"] == 42
    assert response["Location"] == f"/api/v1/instances/{NAME}/bot-runs/{body['id']}"
    again = run_task(BotRun.objects.get(instance=lab["instance"], number=body["id"]))
    assert again.status == "finished", again.status_reason
    assert len(fake.completions()) == len(requests)  # the fake server was not asked again

    def answers(r):
        return {(a.bot.index, a.page_index, a.field): a.value for a in
                Answer.objects.filter(run=r, status="accepted").select_related("bot")}

    assert answers(again) == answers(run) and len(answers(run)) == 30
    assert again.session_code != run.session_code  # a new oTree session, the same play
    assert not Answer.objects.filter(run=again, cached=False).exists()
    calls = ModelCall.objects.filter(run=again)
    assert calls.count() > 0 and set(calls.values_list("cached", "cost_usd")) == {(True, 0.0)}
    assert budget.run_spent(again) == 0
    assert sum(b.prompt_tokens + b.completion_tokens for b in Bot.objects.filter(run=again)) == 0
    rows = list(csv.DictReader(io.StringIO(download(lab["ann"], again, "responses.csv"))))
    assert len(rows) == 30 and {r["cached"] for r in rows} == {"true"}
    original_rows = list(csv.DictReader(io.StringIO(download(lab["ann"], run, "responses.csv"))))
    assert {r["cached"] for r in original_rows} == {"false"}
    conversations = json.loads(download(lab["ann"], again, "conversations.json"))
    assert {c["cached"] for b in conversations["bots"] for c in b["calls"]} == {True}
    again_manifest = json.loads(download(lab["ann"], again, "manifest.json"))
    assert again_manifest["rerun_of"] == {"run": run.number, "session": run.session_code}
    assert again_manifest["returned_models"] == [RETURNED]

    # The provider's key is in no manifest, export or API answer.
    for r in (run, again):
        for kind in ("manifest.json", "summary.json", "conversations.json", "responses.csv"):
            assert KEY not in download(lab["ann"], r, kind)
        assert KEY not in json.dumps(r.manifest)
    assert KEY not in response.content.decode()


def test_lab_managers_set_the_monthly_budget_on_the_account_page_and_the_api(boss, ann, bob):
    page = Client()
    page.force_login(boss)
    url = f"/users/{ann.pk}/"
    form = {"name": ann.name, "username": ann.username, "email": ann.email}
    for bad, message in (("-1", "greater than or equal to 0"), ("lots", "Enter a number.")):
        response = page.post(url, {**form, "bot_monthly_budget_usd": bad})
        assert message in response.content.decode() and response.status_code in (200, 422)
        ann.refresh_from_db()
        assert ann.bot_monthly_budget_usd is None
    assert page.post(url, {**form, "bot_monthly_budget_usd": "12.5"}).status_code == 302
    ann.refresh_from_db()
    assert ann.bot_monthly_budget_usd == 12.5
    assert 'value="12.5"' in page.get(url).content.decode()
    assert page.post(url, {**form, "bot_monthly_budget_usd": ""}).status_code == 302  # empty: the lab's default
    ann.refresh_from_db()
    assert ann.bot_monthly_budget_usd is None

    _t, boss_key = create_token(boss, name="t")
    _t, ann_key = create_token(ann, name="t")
    as_boss = Client(HTTP_AUTHORIZATION=f"Bearer {boss_key}")
    target = f"/api/v1/users/{ann.username}"
    for bad in (-1, "7", True, {}):
        response = as_boss.patch(target, {"bot_monthly_budget_usd": bad}, content_type="application/json")
        assert response.status_code == 422, (bad, response.content)
    response = as_boss.patch(target, {}, content_type="application/json")
    assert response.status_code == 422  # the field is required (null: the lab's default)
    response = as_boss.patch(target, {"bot_monthly_budget_usd": 3}, content_type="application/json")
    assert response.status_code == 200 and response.json()["bot_monthly_budget_usd"] == 3.0
    assert as_boss.get(target).json()["bot_monthly_budget_usd"] == 3.0
    response = as_boss.patch(target, {"bot_monthly_budget_usd": None}, content_type="application/json")
    assert response.status_code == 200 and response.json()["bot_monthly_budget_usd"] is None
    as_ann = Client(HTTP_AUTHORIZATION=f"Bearer {ann_key}")
    assert as_ann.patch(target, {"bot_monthly_budget_usd": 1000}, content_type="application/json").status_code == 403
    ann.refresh_from_db()
    assert ann.bot_monthly_budget_usd is None
