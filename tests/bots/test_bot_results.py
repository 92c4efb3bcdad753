"""Analysis-ready results (bots/results.py) and preflight (bots/preflight.py) against a real
oTree 6 app on Docker (tests/bots_otree.py, deployed once for this module under its own
name) and the fake OpenAI-compatible server (tests/fake_llm.py).

What a user would notice: the tidy CSV of a run and of an experiment carries oTree's own
data for the same participants (equal to what oTree's wide export says), the Parquet file
reads back with the same rows and typed columns, the manifests are there, another
experimenter gets 404; when the app does not run the bot data still download with the
reason; a preflight flags the page whose field a script fills in and the live page (with
the page names and reasons) and not the plain pages.
"""

import csv
import io
import json
import zipfile

import httpx2
import pyarrow.parquet as pq
import pytest
from django.test import Client

from bots import llm, results, services
from bots.models import Answer, Bot, BotExperiment, BotRun, Provider
from bots.tasks import run_bots
from instances.models import Instance
from manager.accounts import services as accounts
from tests import bots_otree
from tests.fake_llm import FakeLLM

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

NAME = "bots-results"


@pytest.fixture(scope="module")
def deployed(redis_server, django_db_setup, django_db_blocker):
    with bots_otree.deployed_for_module(django_db_blocker, NAME, "results-deployer") as found:
        yield found


@pytest.fixture
def lab(deployed, monkeypatch, boss, ann, bob):
    monkeypatch.setattr(llm, "BACKOFF_BASE", 0.02)
    monkeypatch.setattr(run_bots, "apply_async", lambda args, **kw: None)
    instance = bots_otree.attach(deployed, ann, public_port=int(deployed.app_url.rsplit(":", 1)[1]))
    return {"ann": ann, "bob": bob, "boss": boss, "instance": instance, "app_url": deployed.app_url,
            "rest_key": deployed.rest_key}


def run_task(run: BotRun) -> BotRun:
    run_bots.apply(args=[run.pk])
    run.refresh_from_db()
    return run


def wide(lab, code: str) -> dict[str, dict]:
    """oTree's own wide export of session `code`, read here directly: participant code -> row."""
    response = httpx2.get(lab["app_url"] + "/api/export_wide", params={"session_code": code},
                          headers={"otree-rest-key": lab["rest_key"]}, timeout=30)
    assert response.status_code == 200, response.text[:300]
    return {r["participant.code"]: r for r in csv.DictReader(io.StringIO(response.text.lstrip("\ufeff")))}


def page_client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def api_client(user) -> Client:
    _token, raw = accounts.create_token(user, name="results-test")
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


def rows_of(content: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(content.decode())))


def assert_joined(lab, rows: list[dict], runs: list[BotRun]) -> None:
    """Every row's oTree columns are what oTree's wide export says for its participant."""
    exports = {run.number: wide(lab, run.session_code) for run in runs}
    assert rows
    for row in rows:
        theirs = exports[int(row["run"])][row["participant"]]
        prefix = f"{row['app']}.{row['round']}.player."
        assert row["otree_note"] == ""
        assert row["otree_participant_payoff"] == theirs["participant.payoff"]
        assert row["otree_player_payoff"] == theirs[prefix + "payoff"]
        assert row["otree_field_value"] == theirs[prefix + row["field"]]
        for key, value in theirs.items():
            if key.startswith(prefix) and key != prefix + "payoff":
                assert row["otree_player_" + key[len(prefix):]] == value, key


def test_a_runs_results_join_otree_own_data(lab):
    with FakeLLM() as fake:
        provider = Provider.objects.create(name="Fake", base_url=fake.url, api_key="sk-results",
                                           offered_models=[{"name": "fake-1"}])
        run = run_task(services.create_run(lab["ann"], lab["instance"], session_config="guess_survey",
                                           num_participants=3, num_bots=3, provider=provider, model="fake-1",
                                           temperature=0.3))
    assert run.status == "finished", run.status_reason
    client = page_client(lab["ann"])
    base = f"/instances/{NAME}/bot-runs/{run.number}"

    response = client.get(f"{base}/results.csv")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert f"{NAME}-bot-run-{run.number}-results.csv" in response["Content-Disposition"]
    rows = rows_of(response.content)
    assert len(rows) == Answer.objects.filter(run=run, status="accepted").count() == 30
    first = rows[0]
    assert list(first)[:8] == ["experiment", "run", "model", "provider", "temperature", "instructions", "memory",
                               "repetition"]
    assert (first["experiment"], first["run"], first["model"], first["provider"], first["temperature"]) == \
        ("", str(run.number), "fake-1", "Fake", "0.3")
    assert {r["session"] for r in rows} == {run.session_code}
    assert {r["app"] for r in rows} == {"guess", "survey"} and all(r["reason"].startswith("because") for r in rows)
    assert_joined(lab, rows, [run])
    guesses = [r for r in rows if r["field"] == "guess"]
    assert len(guesses) == 9 and all(r["otree_field_value"] == r["answer"] for r in guesses)
    assert all(r["otree_player_guess"] == r["answer"] for r in guesses)
    assert any(float(r["otree_player_payoff"]) == 100 for r in guesses), [r["otree_player_payoff"] for r in guesses]

    # Parquet: the same rows, typed.
    table = pq.read_table(io.BytesIO(client.get(f"{base}/results.parquet").content))
    assert table.num_rows == 30 and table.column_names == list(first)
    assert str(table.schema.field("round").type) == "int64" and str(table.schema.field("cached").type) == "bool"
    assert str(table.schema.field("otree_participant_payoff").type) == "double"
    data = table.to_pylist()
    assert [(d["participant"], d["app"], d["round"], d["field"], d["answer"]) for d in data] == \
        [(r["participant"], r["app"], int(r["round"]), r["field"], r["answer"]) for r in rows]
    assert [d["otree_participant_payoff"] for d in data] == [float(r["otree_participant_payoff"]) for r in rows]

    # Manifests (the run recorded none: its parameters), and the zip of all three.
    manifests = json.loads(client.get(f"{base}/manifests.json").content)
    assert [m["run"] for m in manifests["runs"]] == [run.number]
    assert manifests["runs"][0]["manifest"]["parameters"]["temperature"] == 0.3
    assert manifests["runs"][0]["otree_data"].startswith("joined")
    with zipfile.ZipFile(io.BytesIO(client.get(f"{base}/results.zip").content)) as zf:
        assert sorted(zf.namelist()) == ["manifests.json", "results.csv", "results.parquet"]
        assert rows_of(zf.read("results.csv")) == rows

    # Another experimenter: 404, pages and API alike; the run page links the downloads.
    assert page_client(lab["bob"]).get(f"{base}/results.csv").status_code == 404
    api = f"/api/v1/instances/{NAME}/bot-runs/{run.number}/results.csv"
    assert api_client(lab["bob"]).get(api).status_code == 404
    assert rows_of(api_client(lab["ann"]).get(api).content) == rows
    assert f"{base}/results.parquet" in client.get(f"{base}/").content.decode()


def test_an_experiments_results_have_every_run_with_its_factors(lab):
    experiment = BotExperiment.objects.create(instance=lab["instance"], number=1, created_by=lab["ann"],
                                              design={"session_config": "guess"}, status="finished")
    runs = []
    for repetition, variant in ((1, "plain"), (2, "plain")):
        run = services.create_run(lab["ann"], lab["instance"], session_config="guess", num_participants=3,
                                  num_bots=3, provider=None, model="random")
        BotRun.objects.filter(pk=run.pk).update(
            experiment=experiment, repetition=repetition, seed=40 + repetition,
            factors={"model": "random", "temperature": 1.0, "repetition": repetition, "variant": variant})
        runs.append(run_task(run))
    assert [r.status for r in runs] == ["finished", "finished"], [r.status_reason for r in runs]

    url = f"/api/v1/instances/{NAME}/bot-experiments/1/results.csv"
    response = api_client(lab["ann"]).get(url)
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    rows = rows_of(response.content)
    assert len(rows) == 18  # 2 runs x 3 bots x 3 rounds, one guess each
    assert {(r["experiment"], r["run"], r["repetition"], r["seed"], r["factor_variant"]) for r in rows} == \
        {("1", str(runs[0].number), "1", "41", "plain"), ("1", str(runs[1].number), "2", "42", "plain")}
    assert_joined(lab, rows, runs)
    assert api_client(lab["bob"]).get(url).status_code == 404
    assert api_client(lab["boss"]).get(url).status_code == 200  # lab managers see every instance

    client = page_client(lab["ann"])
    base = f"/instances/{NAME}/bot-runs/experiments/1"
    manifests = json.loads(client.get(f"{base}/manifests.json").content)
    assert [m["run"] for m in manifests["runs"]] == [r.number for r in runs]
    assert all(m["experiment"] == 1 for m in manifests["runs"])
    table = pq.read_table(io.BytesIO(client.get(f"{base}/results.parquet").content))
    assert table.num_rows == 18 and sorted(set(table.column("run").to_pylist())) == [r.number for r in runs]
    assert page_client(lab["bob"]).get(f"{base}/results.csv").status_code == 404
    assert client.get(f"/instances/{NAME}/bot-runs/experiments/2/results.csv").status_code == 404


def test_without_the_app_the_bot_data_download_with_the_reason(lab, ann):
    ghost = Instance.objects.create(name="results-ghost", owner=ann, status=Instance.Status.STOPPED,
                                    runtime="docker")
    run = BotRun.objects.create(instance=ghost, number=1, session_config="guess", num_participants=1, num_bots=1,
                                model="random", status="finished", session_code="gh0stses")
    bot = Bot.objects.create(run=run, index=1, participant_code="gh0stpar", id_in_session=1, status="finished")
    Answer.objects.create(run=run, bot=bot, app="guess", round_number=1, page="Guess", page_index=1, field="guess",
                          value="17", reason="a hunch", status="accepted")
    client = page_client(ann)
    rows = rows_of(client.get("/instances/results-ghost/bot-runs/1/results.csv").content)
    assert [(r["participant"], r["field"], r["answer"], r["reason"]) for r in rows] == \
        [("gh0stpar", "guess", "17", "a hunch")]
    assert rows[0]["otree_participant_payoff"] == "" and rows[0]["otree_field_value"] == ""
    note = rows[0]["otree_note"]
    assert note.startswith("oTree's data could not be read: ") and "results-ghost" in note
    manifests = json.loads(client.get("/instances/results-ghost/bot-runs/1/manifests.json").content)
    assert manifests["runs"][0]["otree_data"] == rows[0]["otree_note"]
    # One results table per instance at a time (each reads oTree's data from the tenant's app):
    # while one is being made, another is refused with the reason, on the page and the API.
    from manager import locks

    with locks.lock(f"results:{ghost.pk}", wait=0):
        busy = client.get("/instances/results-ghost/bot-runs/1/results.csv")
        assert busy.status_code == 409 and b"a results download of results-ghost is being made" in busy.content
        api = api_client(ann).get("/api/v1/instances/results-ghost/bot-runs/1/results.csv")
        assert api.status_code == 409 and "is being made" in api.json()["detail"]
    assert client.get("/instances/results-ghost/bot-runs/1/results.csv").status_code == 200


def test_preflight_flags_the_javascript_field_and_the_live_page(lab):
    api = api_client(lab["ann"])
    response = api.post(f"/api/v1/instances/{NAME}/bot-preflight",
                        data={"session_config": "checks", "num_participants": 2}, content_type="application/json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["purpose"] == "preflight" and body["model"] == "random" and body["num_bots"] == 2
    run = run_task(BotRun.objects.get(instance=lab["instance"], number=body["id"]))
    report = api.get(f"/api/v1/instances/{NAME}/bot-runs/{run.number}").json()["report"]

    met = {(p["app"], p["page"]) for p in report["pages"]}
    assert {("checks", "Intro"), ("checks", "Chat"), ("checks", "Slide")} <= met
    assert all(p["bots"] == [1, 2] for p in report["pages"] if p["page"] in ("Intro", "Chat"))
    problems = {(p["page"], p["kind"]) for p in report["problems"]}
    assert ("Slide", "javascript") in problems and ("Chat", "live") in problems
    slider = next(p for p in report["problems"] if p["page"] == "Slide" and p["kind"] == "javascript")
    assert "slider" in slider["detail"] and "script" in slider["detail"]
    assert ("Slide", "widget") in problems  # the range input the reader does not understand
    stuck = [p for p in report["problems"] if p["kind"] == "stuck"]
    assert len(stuck) == 2 and all(p["page"] == "Slide" for p in stuck)
    assert all("refused Slide" in p["detail"] for p in stuck)
    assert not any(p["page"] == "Intro" for p in report["problems"]) and report["ok"] is False
    assert report["flagged_pages"] == ["checks/Chat", "checks/Slide"]

    # The run page: the pages with their fields and the problems in red.
    page = page_client(lab["ann"]).get(f"/instances/{NAME}/bot-runs/{run.number}/").content.decode()
    assert 'id="preflight-problems"' in page and "Slide" in page and "live page" in page
    assert "<code>slider</code>" not in page  # not a field bots can see: the problem list names it instead


def test_preflight_of_plain_pages_finds_nothing(lab):
    client = page_client(lab["ann"])
    assert 'id="preflight-button"' in client.get(f"/instances/{NAME}/bot-runs/").content.decode()
    response = client.post(f"/instances/{NAME}/bot-runs/preflight/", {"session_config": "survey",
                                                                       "num_participants": "1"})
    run = BotRun.objects.get(instance=lab["instance"], purpose="preflight")
    assert response.status_code == 302 and response["Location"] == f"/instances/{NAME}/bot-runs/{run.number}/"
    run = run_task(run)
    assert run.status == "finished", run.status_reason
    page = client.get(f"/instances/{NAME}/bot-runs/{run.number}/").content.decode()
    assert 'id="preflight-ok"' in page and 'id="preflight-problems"' not in page
    assert "<code>nickname</code> · text · input" in page and "<code>fairness</code> · choice · radio" in page
    assert [p["page"] for p in run.report["pages"]] == ["Survey", "Again"] and run.report["problems"] == []
    # bad input: the reason, nothing started
    response = client.post(f"/instances/{NAME}/bot-runs/preflight/", {"session_config": "nope",
                                                                       "num_participants": "1"}, follow=True)
    assert "Preflight not started" in response.content.decode() and BotRun.objects.count() == 1
    assert page_client(lab["bob"]).post(f"/instances/{NAME}/bot-runs/preflight/",
                                        {"session_config": "survey", "num_participants": "1"}).status_code == 404


def test_parquet_columns_keep_their_types_whatever_the_values():
    """No database or app needed: the table's typing rules on awkward values."""
    columns = ["experiment", "run", "temperature", "seed", "cached", "answer", "otree_player_payoff",
               "otree_player_role", "otree_player_mixed", "otree_player_big"]
    rows = [{"experiment": None, "run": 1, "temperature": "0.7", "seed": None, "cached": True, "answer": "12",
             "otree_player_payoff": "100", "otree_player_role": "", "otree_player_mixed": "3",
             "otree_player_big": str(2**70)},
            {"experiment": None, "run": 2, "temperature": "warm", "seed": 7, "cached": False, "answer": "x",
             "otree_player_payoff": "2.5", "otree_player_role": "", "otree_player_mixed": "three",
             "otree_player_big": "1"}]
    table = pq.read_table(io.BytesIO(results.to_parquet(results.Results("t", columns, rows, []))))
    types = {f.name: str(f.type) for f in table.schema}
    assert types == {"experiment": "int64", "run": "int64", "temperature": "string", "seed": "int64",
                     "cached": "bool", "answer": "string", "otree_player_payoff": "double",
                     "otree_player_role": "string", "otree_player_mixed": "string", "otree_player_big": "string"}
    assert table.column("otree_player_payoff").to_pylist() == [100.0, 2.5]
    assert table.column("seed").to_pylist() == [None, 7] and table.column("otree_player_role").to_pylist() == [None] * 2
