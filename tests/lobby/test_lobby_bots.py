"""Bots in the empty seats of a lobby room, against a real oTree 6 app on Docker (the bots
project of tests/bots_projects.py, with its room "lab" of 3 participant labels, deployed
once for this module through the instance pipeline) and the real lobby (its pages, gate
and services; Redis for presence and the board's pushes).

What a user would notice: with the gate held, one participant at seat01 clicks "I am
ready"; the experimenter fills the empty seats with bots from the seat board; the session
is created in the room, the gate opens, the human enters through the lobby and the room
while the two bots enter through the room with seat02 and seat03; the three play the
3-round guessing game (groups of 3, wait pages) to the end in ONE oTree session whose
participants carry the three labels; the board shows the bot seats; the run page names
the room and which seats are bots. And every refusal says why.
"""

import re
import threading
from urllib.parse import urlsplit

import httpx2
import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.test import Client

from bots.models import Answer, Bot, BotRun
from bots.tasks import run_bots
from lobby import services as lobby
from lobby.models import LobbyRoom, Seat
from manager.audit.models import AuditEvent
from tests import bots_otree, bots_projects
from tests.conftest import CHROMIUM, need
from tests.e2e.test_e2e_notifications import CHROMIUM_ARGS, TIMEOUT_MS
from tests.lobby_helpers import lobby_instance
from tests.waits import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

NAME = "bots-lobby"
BOTS_URL = f"/instances/{NAME}/lobby/rooms/lab/bots/"
FORM = {"session_config": "guess", "num_participants": 3, "model": "random", "temperature": 1,
        "memory": "summary", "time_limit_minutes": 10}


@pytest.fixture(scope="module")
def deployed(redis_server, django_db_setup, django_db_blocker):
    with bots_otree.deployed_for_module(django_db_blocker, NAME, "deployer") as found:
        yield found


@pytest.fixture
def lab(deployed, monkeypatch, boss, ann, bob):
    enqueued = []
    monkeypatch.setattr(run_bots, "apply_async", lambda args, **kw: enqueued.append(list(args)))
    instance = bots_otree.attach(deployed, ann, public_port=int(deployed.app_url.rsplit(":", 1)[1]))
    owner = Client()
    owner.force_login(ann)
    return {"ann": ann, "bob": bob, "instance": instance, "owner": owner, "enqueued": enqueued,
            "app_url": deployed.app_url, "rest_key": deployed.rest_key}


def kiosk_ready(label: str) -> dict:
    """A lab computer at seat `label` clicks "I am ready" (anonymous, as kiosks are)."""
    kiosk = Client()
    assert kiosk.get(f"/lobby/{NAME}/lab/{label}/").status_code == 200
    return kiosk.post(f"/lobby/{NAME}/lab/{label}/", HTTP_ACCEPT="application/json").json()


def hold_gate(lab):
    assert lab["owner"].post(f"/instances/{NAME}/lobby/rooms/lab/gate/", {"gate": "hold"}).status_code == 302


def refused(lab, **changes) -> str:
    response = lab["owner"].post(BOTS_URL, {**FORM, **changes})
    assert response.status_code == 422, response.status_code
    assert not BotRun.objects.exists() and not lab["enqueued"]  # nothing recorded, nothing started
    return " ".join(response.content.decode().split())


def otree_session(lab, code: str) -> dict:
    response = httpx2.get(f"{lab['app_url']}/api/sessions/{code}", headers={"otree-rest-key": lab["rest_key"]},
                          timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_refusals_say_why(lab):
    """Each refusal of "Fill empty seats with bots", with its message; nothing is recorded."""
    hold_gate(lab)
    page = lab["owner"].get(BOTS_URL).content.decode()
    assert 'id="fill-with-bots"' in page and "csrfmiddlewaretoken" in page
    assert "No participant is ready" in refused(lab)
    assert kiosk_ready("seat01")["state"] == "ready"
    assert "the session needs 4 bots but only 2 seats are offline" in refused(lab, num_participants=5)
    assert kiosk_ready("seat02")["state"] == "ready"
    assert "2 participants are ready or in the room, more than the session&#x27;s 1 seats" in refused(
        lab, num_participants=1)
    assert "the 2 ready participants fill the session: no seat is left for bots" in refused(lab, num_participants=2)
    # every seat has a kiosk open, nobody ready: no human, no offline seat
    room = LobbyRoom.objects.get(instance=lab["instance"], name="lab")
    lobby.reset(lab["ann"], lobby.find_room(NAME, "lab"))
    for label in ("seat01", "seat02", "seat03"):
        lobby.kiosk_connected(room.pk, label, f"test-channel-{label}")
    try:
        assert "No participant is ready and no seat is offline" in refused(lab)
    finally:
        for label in ("seat01", "seat02", "seat03"):
            lobby.kiosk_disconnected(room.pk, label, f"test-channel-{label}")
    # another experimenter: the form does not exist for him
    other = Client()
    other.force_login(lab["bob"])
    assert other.get(BOTS_URL).status_code == 404 and other.post(BOTS_URL, FORM).status_code == 404


def test_refusals_of_a_room_without_labels_and_an_app_that_is_not_running(lab, boss):
    off = lobby_instance(lab["ann"], name="bots-lobby-off", labels=["seat01", "seat02"], port=18599)
    off.releases.update(session_configs=bots_projects.SESSION_CONFIGS)  # (no app runs for it)
    client = Client()
    client.force_login(lab["ann"])
    url = "/instances/bots-lobby-off/lobby/rooms/"
    response = client.post(url + "open/bots/", FORM)
    assert response.status_code == 422
    assert "has no participant label file: bots need participant labels" in response.content.decode()
    Client().post("/lobby/bots-lobby-off/lab/seat01/", HTTP_ACCEPT="application/json")  # (gate open: entered)
    response = client.post(url + "lab/bots/", {**FORM, "num_participants": 2})
    assert response.status_code == 422
    assert "The oTree app is not running or does not answer" in response.content.decode()
    assert not BotRun.objects.filter(instance=off).exists()


@pytest.mark.browser
def test_a_human_and_two_bots_play_one_session_through_the_room(lab, live_server, monkeypatch):
    """Headless Chromium is the lab computer at seat01 (its kiosk page, then oTree's pages)
    and the experimenter's browser on the new form; the bots' worker is the real task."""
    from playwright.sync_api import sync_playwright

    need(CHROMIUM.exists(), f"chromium ({CHROMIUM})")
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")  # the ORM beside Playwright's loop, in this thread
    base = live_server.url.replace("localhost", "127.0.0.1")  # (Chromium may try ::1 first)
    cookie = lab["owner"].cookies[settings.SESSION_COOKIE_NAME].value
    hold_gate(lab)
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(lobby.board_group(lab["instance"].pk), channel)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            run, worker = _play_with_bots(lab, browser, base, cookie)
        finally:
            browser.close()
    board_messages = []
    while (message := async_to_sync(_receive)(layer, channel)) is not None:
        board_messages.append(message)
    assert len(board_messages) >= 3 and all(m["event"]["room"] == "lab" for m in board_messages)
    board = lab["owner"].get(f"/instances/{NAME}/lobby/rooms/lab/").content.decode()
    assert 'data-state="bot"' not in board and "Fill empty seats with bots" in board  # the run ended

    # the room still holds that session in oTree: a second fill says so
    hold_gate(lab)
    lobby.reset(lab["ann"], lobby.find_room(NAME, "lab"))
    kiosk_ready("seat03")
    response = lab["owner"].post(BOTS_URL, FORM)
    assert response.status_code == 422
    text = " ".join(response.content.decode().split())
    assert f"oTree&#x27;s room “lab” already has session {run.session_code}: close the room" in text
    assert BotRun.objects.count() == 1


def _play_with_bots(lab, browser, base, cookie):
    # seat01's kiosk: "I am ready" behind the held gate
    kiosk = browser.new_page()
    kiosk.goto(f"{base}/lobby/{NAME}/lab/seat01/")
    kiosk.click("#ready-button")
    kiosk.wait_for_selector("#view-wait", state="visible", timeout=TIMEOUT_MS)
    wait_until(lambda: Seat.objects.filter(label="seat01", state="ready").exists(), 30, 0.1, "seat01 ready")

    # the experimenter's browser: the form shows the room, its defaults fit; fill
    context = browser.new_context()
    context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": cookie, "url": base}])
    page = context.new_page()
    page.goto(base + BOTS_URL)
    assert "seat01" in page.inner_text("#plan-humans") and "seat02" not in page.inner_text("#plan-humans")
    assert page.inner_text("#plan-offline").split(", ") == ["seat02", "seat03"]
    assert page.input_value("select[name=session_config]") == "guess"  # the config whose 3 fit the room
    assert page.input_value("input[name=num_participants]") == "3"
    page.select_option("select[name=model]", "random")
    page.fill("input[name=time_limit_minutes]", "10")
    page.click("#fill-with-bots button[type=submit]")
    page.wait_for_selector("#run-room", timeout=TIMEOUT_MS)  # the run's page
    run = BotRun.objects.get()
    assert page.url == f"{base}/instances/{NAME}/bot-runs/{run.number}/"
    assert run.room.name == "lab" and run.seat_labels == ["seat02", "seat03"] and run.num_bots == 2
    assert run.num_participants == 3 and [h["label"] for h in run.human_seats] == ["seat01"]
    assert lab["enqueued"] == [[run.pk]]
    assert AuditEvent.objects.filter(action="lobby.bots", actor=lab["ann"]).count() == 1
    # the board: the two bot seats, distinct, linked to the run; the human still ready behind the gate
    page.goto(f"{base}/instances/{NAME}/#lobby")
    assert page.locator('tr[data-state="bot"] .lobby-bot').count() == 2
    assert page.get_attribute('tr[data-seat="seat02"] a.lobby-bot-status', "href") == \
        f"/instances/{NAME}/bot-runs/{run.number}/"
    assert page.get_attribute('tr[data-seat="seat01"]', "data-state") == "ready"
    assert page.locator(".lobby-fill-bots").count() == 0 and page.locator(".lobby-bot-run").count() == 1
    # a kiosk opened at a bot's seat waits: it never enters the room as the bot's label
    assert kiosk_ready("seat02") == {"state": "ready", "url": None}
    assert not Seat.objects.filter(room=run.room, label="seat02").exclude(state="offline").exists()

    worker = threading.Thread(target=lambda: (run_bots.apply(args=[run.pk]), connection.close()), daemon=True)
    worker.start()
    try:
        # the session is created in the room, then the gate opens: the human's seat enters
        wait_until(lambda: Seat.objects.get(room=run.room, label="seat01").state == "entered", 60, 0.2,
                   "the gate opened for the ready human")
        run.refresh_from_db()
        assert run.session_code
        rooms = httpx2.get(f"{lab['app_url']}/api/rooms", headers={"otree-rest-key": lab["rest_key"]},
                           timeout=30).json()
        assert {"name": "lab", "session_code": run.session_code}.items() <= rooms[0].items()
        # The kiosk goes into the room. (This test's web server has no websockets, so the kiosk is
        # not told "go": reloaded, its seat is "entered" and "I am ready" sends it in; the push
        # itself is tested in tests/e2e/test_e2e_lobby.py.)
        kiosk.reload()
        kiosk.click("#ready-button")
        kiosk.wait_for_url(re.compile(r"/p/[^/]+/guess/Guess/1$"), timeout=TIMEOUT_MS)
        human_code = urlsplit(kiosk.url).path.split("/")[2]
        board = wait_until(lambda: (b := lab["owner"].get(f"/instances/{NAME}/lobby/rooms/lab/").content.decode())
                           .count("Guess") + b.count("Results") >= 2 and b, 60, 0.2, "the bots' pages on the board")
        assert board.count('data-state="bot"') == 2 and "bot 1:" in board and "bot 2:" in board
        assert not Seat.objects.filter(room=run.room, label="seat02").exclude(state="offline").exists()
        # the human plays 3 rounds in the browser; oTree's wait page moves on by itself
        for round_number in (1, 2, 3):
            kiosk.wait_for_url(re.compile(r"/guess/Guess/\d+$"), timeout=TIMEOUT_MS)
            assert f"Round {round_number} of 3" in kiosk.inner_text("body")
            kiosk.fill("input[name=guess]", "10")
            kiosk.click("button.otree-btn-next")
            kiosk.wait_for_url(re.compile(r"/guess/Results/\d+$"), timeout=60_000)
            assert "You guessed 10." in kiosk.inner_text("body")
            kiosk.click("button.otree-btn-next")
        kiosk.wait_for_url(re.compile(r"/OutOfRangeNotification"), timeout=TIMEOUT_MS)
        worker.join(timeout=120)
        assert not worker.is_alive()
    finally:  # a failure above: the bots stop, the worker ends before the database is emptied
        BotRun.objects.filter(pk=run.pk).update(stop_requested=True)
        worker.join(timeout=60)
    run.refresh_from_db()
    assert run.status == "finished" and run.status_reason == "2 of 2 bots finished", run.status_reason

    # ONE oTree session with the 3 labels; the human's participant is seat01, the bots' are theirs
    session = otree_session(lab, run.session_code)
    by_label = {p["label"]: p for p in session["participants"]}
    assert sorted(by_label) == ["seat01", "seat02", "seat03"] and len(session["participants"]) == 3
    assert by_label["seat01"]["code"] == human_code
    bots = list(Bot.objects.filter(run=run).order_by("index"))
    assert [b.label for b in bots] == ["seat02", "seat03"]
    for bot in bots:
        assert bot.participant_code == by_label[bot.label]["code"]
        assert bot.id_in_session == by_label[bot.label]["id_in_session"]
        assert bot.status == "finished" and bot.answers == 3
    assert Answer.objects.filter(run=run, status="accepted", field="guess").count() == 6
    assert run.human_seats == [{"label": "seat01", "code": human_code,
                                "id_in_session": by_label["seat01"]["id_in_session"]}]
    # the run page: the room and which seats are bots and which human
    page.goto(f"{base}/instances/{NAME}/bot-runs/{run.number}/")
    said = " ".join(page.inner_text("#run-room").split())
    assert said == "Lobby room lab: bots on seat02, seat03 · humans on seat01", said
    assert "seat seat01 (human)" in " ".join(page.inner_text("#human-seats").split())
    assert [" ".join(t.split()) for t in page.locator("#bots tr[data-bot] td:nth-child(2)").all_inner_texts()] == \
        [f"{b.participant_code} seat {b.label}" for b in bots]
    return run, worker


async def _receive(layer, channel):
    import asyncio

    try:
        return await asyncio.wait_for(layer.receive(channel), timeout=0.5)
    except asyncio.TimeoutError:
        return None
