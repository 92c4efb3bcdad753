"""Bot runs without oTree: the page reader on oTree-style HTML, checking the model's output,
the model client against the fake OpenAI-compatible server (429s, 5xx, timeouts, refused
keys), the rate limiter on the real Redis, the rules of runs and providers (pages, API,
audit, encryption) and the run's realtime topic (real ASGI app and channel layer).

The games themselves, played against a real oTree 6 app, are in test_bots_run.py."""

import json
import random

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import Client

from bots import llm, policy, services
from bots.models import Bot, BotRun, Provider
from bots.page import parse
from bots.ratelimit import RateLimiter
from instances.models import Instance
from manager.accounts.services import create_token
from manager.audit.models import AuditEvent
from tests.fake_llm import FakeLLM
from tests.http_helpers import StandIn
from tests.manager.test_realtime import connect

SECRET = "sk-unit-secret-0123456789"

FORM_PAGE = """<html><body><div class="otree-body container">
<h2 class="otree-title page-header" id="_otree-title">Choices</h2>
<div class="otree-form-errors alert alert-danger">Your offer must not exceed your budget.</div>
<form class="otree-form" id="form" method="post">
<p>You have a budget of <b>10</b> points.</p>
<input type="hidden" name="secret_token" value="abc">
<div class="mb-3 _formfield has-errors"><label class="col-form-label" for="id_offer">Your offer</label>
 <div class="controls"><input type="number" class="form-control" id="id_offer" max="10" min="0" name="offer" required value="12"></div>
 <div class="form-control-errors">Number must be between 0 and 10.<br/></div></div>
<div class="mb-3 _formfield"><label class="col-form-label" for="id_price">Price</label>
 <input type="text" class="form-control" inputmode="decimal" id="id_price" name="price" min="0.5" required></div>
<div class="mb-3 _formfield"><label class="col-form-label" for="id_why">Why?</label>
 <textarea class="form-control" id="id_why" name="why" maxlength="40"></textarea></div>
<label for="id_mood">Mood</label><select class="form-select" id="id_mood" name="mood" required><option value="">--------</option><option value="1">Happy</option><option value="2">Sad</option></select>
<div id="id_side" required><div class="form-check"><input class="form-check-input" type="radio" id="id_side-0" name="side" required value="L"> <label for="id_side-0">Left</label></div><div class="form-check"><input class="form-check-input" type="radio" id="id_side-1" name="side" required value="R"> <label for="id_side-1">Right</label></div></div>
<div class="form-check"><input type="checkbox" class="form-check-input" id="id_agree" name="agree" value="y"><label class="form-check-label" for="id_agree">I agree</label></div>
<button name="accept" value="True">Accept</button> <button name="accept" value="False">Reject</button>
<button class="otree-btn-next btn btn-primary">Next</button>
<script>var x = "<b>not text</b>";</script>
</form></div></body></html>"""


def test_the_page_reader_finds_every_kind_of_field_and_the_errors():
    page = parse(FORM_PAGE, url="http://x/p/abc/market/Offer/4", path="/p/abc/market/Offer/4",
                 headers={"oTree-Redisplay-With-Errors": "1"})
    assert (page.app, page.name, page.index, page.redisplayed_with_errors) == ("market", "Offer", 4, True)
    assert page.title == "Choices" and "You have a budget of 10 points." in page.text and "not text" not in page.text
    kinds = {f.name: (f.kind, f.widget) for f in page.fields}
    assert kinds == {"offer": ("integer", "input"), "price": ("float", "input"), "why": ("text", "textarea"),
                     "mood": ("choice", "select"), "side": ("choice", "radio"), "agree": ("checkbox", "checkbox"),
                     "accept": ("choice", "buttons")}
    offer = page.field("offer")
    assert (offer.label, offer.min, offer.max, offer.required) == ("Your offer", 0, 10, True)
    assert offer.errors == ["Number must be between 0 and 10."]
    assert page.errors == ["Your offer must not exceed your budget."]
    assert page.field("mood").choices == [("1", "Happy"), ("2", "Sad")] and page.field("mood").label == "Mood"
    assert page.field("side").choices == [("L", "Left"), ("R", "Right")]
    assert page.field("accept").choices == [("True", "Accept"), ("False", "Reject")]
    assert page.field("why").max_length == 40 and page.field("price").min == 0.5
    assert page.hidden == {"secret_token": "abc"}
    assert "Number must be between 0 and 10." not in page.text  # errors are reported apart from the text


def test_wait_pages_and_the_end_are_recognised():
    wait = parse("<h4 class='otree-wait-page__title card-header' id='_otree-title'>Please wait</h4><script>"
                 'socket = makeReconnectingWebSocket("/wait_page?session_pk=1&page_index=2&group_id=7");</script>',
                 url="u", path="/p/c/game/ResultsWaitPage/2", headers={"otree-wait-page": "1"})
    assert wait.is_wait and wait.title == "Please wait" and wait.fields == []
    assert wait.socket_path == "/wait_page?session_pk=1&page_index=2&group_id=7"  # where oTree says "ready"
    end = parse("<p>No more pages left</p>", url="u", path="/OutOfRangeNotification/c")
    assert end.is_end and not end.name


def test_model_output_is_checked_against_the_fields():
    page = parse(FORM_PAGE, url="u", path="/p/abc/market/Offer/4")
    good = {"answers": [{"field": "offer", "value": 7, "reason": "fair"}, {"field": "price", "value": "1,5"},
                        {"field": "why", "value": "because"}, {"field": "mood", "value": "Sad"},
                        {"field": "side", "value": "L"}, {"field": "agree", "value": "yes"},
                        {"field": "accept", "value": False}], "memory": "m"}
    choices, memory, problems = policy.parse_output("```json\n" + json.dumps(good) + "\n```", page, True)
    assert problems == [] and memory == "m"
    assert policy.form_data(page, choices) == {"secret_token": "abc", "offer": "7", "price": "1.5", "why": "because",
                                               "mood": "2", "side": "L", "agree": "y", "accept": "False"}
    assert {c.field: c.value for c in choices}["agree"] == "true"
    bad = {"answers": [{"field": "offer", "value": 11}, {"field": "price", "value": "cheap"},
                       {"field": "mood", "value": "Angry"}, {"field": "nope", "value": 1},
                       {"field": "agree", "value": "maybe"}]}
    _choices, _memory, problems = policy.parse_output(json.dumps(bad), page, True)
    text = " | ".join(problems)
    for expected in ("offer: 11 is above the maximum 10", "price: 'cheap' is not a number",
                     "mood: 'Angry' is not one of the choices", "there is no field 'nope'",
                     "no answer for the field 'side'", "agree: answer true or false", "\"memory\""):
        assert expected in text, text
    assert policy.parse_output("Sure, 7!", page, False)[2][0].startswith("the reply is not valid JSON")


def test_the_random_policy_gives_valid_answers():
    page = parse(FORM_PAGE, url="u", path="/p/abc/market/Offer/4")
    rng = random.Random(7)
    for _ in range(50):
        choices = policy.random_choices(page, rng)
        assert all(c is not None for c in choices) and len(choices) == len(page.fields)
        data = policy.form_data(page, choices)
        assert 0 <= int(data["offer"]) <= 10 and data["mood"] in ("1", "2") and data["accept"] in ("True", "False")
        assert len(data["why"]) <= 40


# --- the model client against the fake server --------------------------------------------------

def client_for(fake, limiter=None, timeout=1.0):
    return llm.LLMClient(base_url=fake.url, api_key=SECRET, model="fake-1", temperature=0.3,
                         response_format="json_object", timeout=timeout, limiter=limiter or RateLimiter([]))


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(llm, "BACKOFF_BASE", 0.01)


MESSAGES = [{"role": "system", "content": "x"}, {"role": "user", "content": 'Fields to fill in (JSON):\n'
                                                  '[{"field": "guess", "type": "integer", "min": 0, "max": 100}]'}]


async def test_rate_limits_server_errors_and_timeouts_are_retried(fast_backoff):
    with FakeLLM(slow_seconds=2) as fake:
        fake.script("429", "500", "timeout")
        client = client_for(fake)
        attempts = []

        async def seen(attempt):
            attempts.append(attempt)

        reply = await client.complete(MESSAGES, on_attempt=seen)
        await client.close()
    assert json.loads(reply.text)["answers"][0]["field"] == "guess" and reply.number == 4
    assert [a.error.split(":")[0] for a in attempts] == ["HTTP 429", "HTTP 500", "the request timed out", ""]
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0
    request = fake.completions()[0]
    assert request["headers"]["authorization"] == f"Bearer {SECRET}"
    assert request["body"]["temperature"] == 0.3 and request["body"]["response_format"] == {"type": "json_object"}


async def test_retries_are_bounded_in_attempts_and_time(fast_backoff, monkeypatch):
    monkeypatch.setattr(llm, "MAX_ATTEMPTS", 3)
    with FakeLLM() as fake:
        fake.script(*["503"] * 3)
        client = client_for(fake)
        with pytest.raises(llm.ModelError, match=r"gave up after 3 attempts \(HTTP 503"):
            await client.complete(MESSAGES)
        assert len(fake.completions()) == 3
        monkeypatch.setattr(llm, "MAX_ATTEMPTS", 50)
        monkeypatch.setattr(llm, "MAX_TOTAL_SECONDS", 2.5)

        class RequestClock:
            """The client's clock: one second per request the provider has received (no wall clock)."""

            @staticmethod
            def monotonic() -> float:
                return float(len(fake.completions()))

        monkeypatch.setattr(llm, "time", RequestClock)
        fake.script(*["timeout"] * 10)
        with pytest.raises(llm.ModelError, match=r"^gave up after 3 attempts in 3 s \(the request timed out\)"):
            await client.complete(MESSAGES)  # after 1 and 2 s it tries again; at 3 s (+ backoff) it would pass 2.5 s
        await client.close()
        assert len(fake.completions()) - 3 == 3


async def test_a_refused_key_is_not_retried(fast_backoff):
    with FakeLLM() as fake:
        fake.script("401")
        client = client_for(fake)
        with pytest.raises(llm.ModelError, match="the provider refused the request \\(HTTP 401"):
            await client.complete(MESSAGES)
        await client.close()
        assert len(fake.completions()) == 1


# --- the rate limiter (real Redis) ----------------------------------------------------------

async def test_the_rate_limiter_spaces_requests_across_workers():
    """Two limiters on the same key (two workers) hand out slots 60/rate seconds apart: at 6
    a minute the n-th reservation is n slots of 10 s away, whichever worker asks (the calls
    take milliseconds, far less than half a slot)."""
    key = f"lab:bots:rate:test:{random.random()}"
    first, second = RateLimiter([(key, 6)]), RateLimiter([(key, 6)])
    waits = [await (first if i % 2 else second).reserve() for i in range(10)]
    await first.close()
    await second.close()
    assert [round(wait / 10) for wait in waits] == list(range(10)), waits
    assert waits == sorted(waits) and 0 <= waits[0] < 10, waits
    assert await RateLimiter([(key, 0)]).reserve() == 0  # 0 = no limit


# --- runs and providers: rules, pages, API ------------------------------------------------------

@pytest.fixture
def lab(boss, ann, bob, instance, live_release, monkeypatch):
    """ann's instance with its live release (session config guess, 3 participants)."""
    enqueued = []
    monkeypatch.setattr(services, "enqueue", lambda run: enqueued.append(run.pk))
    provider = Provider.objects.create(name="Fake", base_url="http://127.0.0.1:9/v1", api_key=SECRET,
                                       offered_models=[{"name": "fake-1", "input_per_million": 2,
                                                        "output_per_million": 4}])
    return {"boss": boss, "ann": ann, "bob": bob, "instance": instance, "provider": provider, "enqueued": enqueued}


def api(user, method, path, body=None):
    _token, raw = create_token(user, name="t", throttled=False)  # the harness, not a user
    client = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    kwargs = {"data": json.dumps(body), "content_type": "application/json"} if body is not None else {}
    return getattr(client, method)(path, **kwargs)


def test_api_starts_lists_and_stops_runs_and_explains_bad_input(lab):
    url = "/api/v1/instances/ann-study/bot-runs"
    body = {"session_config": "guess", "num_participants": 3, "num_bots": 2, "model": "fake-1", "provider": "Fake",
            "temperature": 0.5, "instructions": "Be brief.", "rate_limit": 30, "concurrency": 2}
    response = api(lab["ann"], "post", url, body)
    assert response.status_code == 201, response.content
    run = response.json()
    assert run["id"] == 1 and run["status"] == "queued" and run["provider"] == "Fake" and run["model"] == "fake-1"
    assert response["Location"] == f"{url}/1" and lab["enqueued"] == [BotRun.objects.get().pk]
    assert SECRET not in response.content.decode()
    cases = [
        ({"session_config": "nope"}, "session_config: no session config 'nope' in the live release (configs: guess)"),
        ({"num_bots": 4}, "num_bots: at most the number of participants (3)"),
        ({"model": "gpt-9"}, "model: Fake offers no model 'gpt-9' (models: fake-1)"),
        ({"provider": "Nobody"}, "provider: there is no such model provider (providers: Fake)"),
        ({"provider": None}, "provider: name the provider of the model"),
        ({"temperature": 3}, "temperature: must be a number from 0 to 2"),
        ({"rate_limit": 0}, "rate_limit: must be a whole number from 1 to 6000"),
        ({"memory": "forever"}, "memory: must be one of summary, history"),
        ({"colour": "red"}, "colour: unknown field"),
    ]
    for change, detail in cases:
        response = api(lab["ann"], "post", url, {**body, **change})
        assert response.status_code == 422 and detail in response.json()["detail"], (change, response.json())
    assert api(lab["ann"], "post", url, {**body, "model": "random", "provider": None}).status_code == 201
    assert [r["id"] for r in api(lab["boss"], "get", url).json()] == [2, 1]
    assert api(lab["bob"], "get", url).status_code == 404
    assert api(lab["bob"], "post", f"{url}/1/stop").status_code == 404
    stopped = api(lab["ann"], "post", f"{url}/1/stop")
    assert stopped.status_code == 202 and stopped.json()["status"] == "stopped"  # no worker held it: at once
    assert stopped.json()["status_reason"] == "stopped on request"
    providers = api(lab["bob"], "get", "/api/v1/bot-providers").json()
    assert providers == [{"name": "Fake", "base_url": "http://127.0.0.1:9/v1", "models": ["fake-1"], "enabled": True}]


def test_the_new_run_form_shows_configs_models_and_errors(lab):
    client = Client()
    client.force_login(lab["ann"])
    page = client.get("/instances/ann-study/bot-runs/").content.decode()
    assert "guess — Guess" in page and "Fake · fake-1" in page and "offline random policy" in page
    response = client.post("/instances/ann-study/bot-runs/", {
        "session_config": "guess", "num_participants": 3, "num_bots": 5, "model": f"{lab['provider'].pk}:fake-1",
        "temperature": 1, "memory": "summary", "rate_limit": 60, "concurrency": 5, "time_limit_minutes": 10})
    assert response.status_code == 422 and "at most the number of participants (3)" in response.content.decode()
    response = client.post("/instances/ann-study/bot-runs/", {
        "session_config": "guess", "num_participants": 3, "num_bots": 3, "model": f"{lab['provider'].pk}:fake-1",
        "temperature": 0.2, "memory": "history", "rate_limit": 60, "concurrency": 5, "time_limit_minutes": 10,
        "instructions": "Play fair."})
    assert response.status_code == 302 and response["Location"] == "/instances/ann-study/bot-runs/1/"
    run = BotRun.objects.get()
    assert (run.model, run.provider, run.memory, run.temperature, run.instructions) == (
        "fake-1", lab["provider"], "history", 0.2, "Play fair.")
    assert (run.price_input, run.price_output) == (2, 4)
    page = client.get("/instances/ann-study/bot-runs/1/").content.decode()
    assert "Stop all bots" in page and "Fake" in page and "Play fair." in page
    event = AuditEvent.objects.filter(action="bots.run_start").get()
    assert "bot run #1" in event.summary and SECRET not in event.summary


def test_providers_keep_the_key_encrypted_and_never_show_it(lab):
    client = Client()
    client.force_login(lab["boss"])
    response = client.post("/bot-providers/", {
        "name": "OpenRouter", "base_url": "https://openrouter.ai/api/v1", "api_key": "sk-or-very-secret",
        "models": "openai/gpt-4o-mini 0.15 0.6\nmeta/llama-3 # free", "response_format": "json_object",
        "timeout_seconds": 30, "requests_per_minute": 100, "enabled": "on"})
    assert response.status_code == 302
    provider = Provider.objects.get(name="OpenRouter")
    assert provider.api_key == "sk-or-very-secret" and provider.price("openai/gpt-4o-mini") == (0.15, 0.6)
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key FROM bots_provider WHERE id = %s", [provider.pk])
        stored = cursor.fetchone()[0]
    assert "sk-or-very-secret" not in stored
    for url in ("/bot-providers/", f"/bot-providers/{provider.pk}/"):
        assert "sk-or-very-secret" not in client.get(url).content.decode()
    # Saving without a key keeps it; a bad model line is explained.
    response = client.post(f"/bot-providers/{provider.pk}/", {
        "name": "OpenRouter", "base_url": "https://openrouter.ai/api/v1", "api_key": "",
        "models": "openai/gpt-4o-mini cheap", "response_format": "json_object", "timeout_seconds": 30,
        "requests_per_minute": 0})
    assert response.status_code == 422 and "line 1: prices must be numbers" in response.content.decode()
    client.post(f"/bot-providers/{provider.pk}/", {
        "name": "OpenRouter", "base_url": "https://openrouter.ai/api/v1", "api_key": "",
        "models": "openai/gpt-4o-mini", "response_format": "prompt", "timeout_seconds": 30,
        "requests_per_minute": 0})
    provider.refresh_from_db()
    assert provider.api_key == "sk-or-very-secret" and provider.response_format == "prompt" and not provider.enabled
    summaries = " ".join(AuditEvent.objects.filter(action__startswith="bots.provider").values_list("summary", flat=True))
    assert "OpenRouter" in summaries and "sk-or" not in summaries
    ann = Client()
    ann.force_login(lab["ann"])
    assert ann.post("/bot-providers/", {"name": "x"}).status_code == 403


def test_the_sweep_resumes_runs_whose_worker_died_and_ends_stopped_ones(lab, settings):
    from datetime import timedelta

    from django.utils import timezone

    old = timezone.now() - timedelta(minutes=5)
    make = lambda number, **kw: BotRun.objects.create(  # noqa: E731
        instance=lab["instance"], number=number, session_config="guess", num_participants=3, num_bots=3,
        model="random", created_at=old, **kw)
    dead = make(1, status="running", heartbeat_at=old, started_at=old)
    lost = make(2, status="queued")
    alive = make(3, status="running", heartbeat_at=timezone.now(), started_at=old)
    stop = make(4, status="running", heartbeat_at=old, started_at=old, stop_requested=True)
    tired = make(5, status="running", heartbeat_at=old, started_at=old, deliveries=services.MAX_DELIVERIES)
    Bot.objects.create(run=stop, index=1, participant_code="p1", id_in_session=1, status="wait_page")
    result = services.sweep()
    assert sorted(result["resumed"]) == [dead.pk, lost.pk] and sorted(lab["enqueued"]) == [dead.pk, lost.pk]
    assert sorted(result["ended"]) == [stop.pk, tired.pk] and alive.pk not in result["resumed"]
    stop.refresh_from_db(), tired.refresh_from_db()
    assert stop.status == "stopped" and stop.bots.get().status == "stopped"
    assert tired.status == "failed" and "stopped 20 times" in tired.status_reason
    assert services.sweep()["resumed"] == []  # the resumed ones got a fresh heartbeat: not enqueued twice


# --- the live page's topic ------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
async def test_run_updates_reach_the_owner_and_lab_managers_only(boss, ann, bob):
    def setup():
        instance = Instance.objects.create(name="ws-bots", owner=ann)
        run = BotRun.objects.create(instance=instance, number=1, session_config="g", num_participants=1, num_bots=1,
                                    model="random", status="running")
        Bot.objects.create(run=run, index=1, participant_code="abc", id_in_session=1, status="playing", page="Guess",
                           app="guess", round_number=2, answers=3)
        return run

    run = await sync_to_async(setup)()
    tabs = {}
    for name, user in (("boss", boss), ("ann", ann), ("bob", bob)):
        tab, ok = await connect(user)
        assert ok and (await tab.receive_json_from(timeout=5))["type"] == "hello"
        await tab.send_json_to({"subscribe": f"botrun:{run.pk}"})
        tabs[name] = (tab, await tab.receive_json_from(timeout=5))
    assert tabs["ann"][1]["type"] == tabs["boss"][1]["type"] == "subscribed"
    assert tabs["bob"][1]["type"] == "error"
    for name in ("ann", "boss"):  # the run as it is now, right after subscribing (nothing missed since the page loaded)
        current = await tabs[name][0].receive_json_from(timeout=5)
        assert current["type"] == "botrun" and current["totals"]["answers"] == 3 and current["bots"][0]["page"] == "Guess"
    await tabs["ann"][0].send_json_to({"subscribe": "botrun:nonsense"})
    assert (await tabs["ann"][0].receive_json_from(timeout=5))["type"] == "error"
    await sync_to_async(services.push_run)(run)
    for name in ("ann", "boss"):
        event = await tabs[name][0].receive_json_from(timeout=5)
        assert event["type"] == "botrun" and event["status"] == "running"
        assert event["bots"][0] | {"cost": 0} == {"index": 1, "participant": "abc", "status": "playing",
                                                  "status_label": "playing", "reason": "", "app": "guess",
                                                  "page": "Guess", "round": 2, "answers": 3, "retries": 0,
                                                  "tokens": 0, "cost": 0}
    assert await tabs["bob"][0].receive_nothing(timeout=0.5)
    for tab, _ in tabs.values():
        await tab.disconnect()



def test_bot_runs_have_their_own_queue_and_labserver_worker(settings):
    """A run holds its worker process while it plays: it goes to the `bots` queue, which
    only the labserver's `bots` child (LAB_BOT_RUNS processes) consumes."""
    from manager.celery import app
    from manager.supervisor import default_specs

    settings.LAB_BOT_RUNS = 3
    assert app.amqp.router.route({}, "bots.run")["queue"].name == "bots"
    assert app.amqp.router.route({}, "instances.build_release")["queue"].name == "celery"
    specs = {spec.name: spec for spec in default_specs()}
    bots = specs["bots"].argv
    assert bots[bots.index("-Q") + 1] == "bots" and bots[bots.index("--autoscale") + 1] == "3,0"
    assert "-Q" not in specs["worker"].argv  # the main worker keeps the default queue: deploys, backups


async def test_the_engine_talks_to_the_instances_origin_only():
    from bots import engine

    outside_url = {}

    def routes(path):
        if path == "/here":
            return 302, {"Location": "/there"}, b""
        if path == "/there":
            return 200, {"Content-Type": "text/html"}, b"<p>inside</p>"
        if path == "/away":
            return 307, {"Location": outside_url["url"] + "/secret"}, b""
        if path == "/scheme":
            return 302, {"Location": "https" + outside_url["instance"][4:] + "/there"}, b""
        if path == "/loop":
            return 302, {"Location": "/loop"}, b""
        if path == "/huge":
            return 200, {}, b"x" * (engine.MAX_BODY + 1)
        return 200, {}, b"<p>LAB SECRET</p>"

    instance = StandIn(lambda request: routes(request.path))  # the instance's app
    outside = StandIn(lambda request: routes(request.path))  # another service of the lab machine
    outside_url.update(url=outside.url, instance=instance.url)
    otree = engine.OTree(instance.url, "rest-key")
    try:
        reply = await otree.request("GET", "/here")  # within the origin: followed
        assert reply.status_code == 200 and reply.url.path == "/there" and reply.text == "<p>inside</p>"
        with pytest.raises(engine.GiveUp) as stop:
            await otree.request("POST", "/away", data={"guess": "1"})
        assert str(stop.value) == (f"the instance redirected to {outside.url}/secret, outside the instance; "
                                   "the bot stopped")
        with pytest.raises(engine.GiveUp, match="redirected to https://127.0.0.1"):
            await otree.request("GET", "/scheme")  # another scheme is another origin
        with pytest.raises(engine.GiveUp, match="names http://169.254.169.254/x, outside the instance"):
            await otree.request("GET", "http://169.254.169.254/x")  # a URL a page names
        with pytest.raises(engine.GiveUp, match="names"):
            otree.websocket_url(outside.url.replace("http", "ws") + "/live")  # a wait page's socket
        assert otree.websocket_url("/wait_page/abc").path == "/wait_page/abc"
        with pytest.raises(engine.GiveUp, match="redirected more than 10 times"):
            await otree.request("GET", "/loop")
        with pytest.raises(engine.GiveUp, match="answered /huge with more than 5 MB"):
            await otree.request("GET", "/huge")
    finally:
        await otree.close()
        instance.close()
        outside.close()
    assert outside.requests == []
