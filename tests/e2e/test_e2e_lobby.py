"""The kiosk lobby as a lab uses it: the real labserver (daphne, worker, embedded Redis),
real headless Chromium. Twenty lab computers open their seat pages; the experimenter
follows them on the instance page's board, holds the gate, lets the ready ones in with
one click, resets seats; a room without labels uses the seat picker; the manager is
restarted under the kiosks' feet.

"The oTree room" here is a small HTTP server in this test standing at the instance's
public address (the instance's release rows, with its rooms, are written into the
labserver's database), so the test can see exactly where every browser lands.
`test_e2e_deploy.py` does the same walk into a real oTree room of a deployed instance.
The labserver runs with LAB_RUNTIME=process, so nothing tries to run this instance.
"""

import json
import subprocess
import sys
import time
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from tests.conftest import CHROMIUM, need
from tests.http_helpers import StandIn
from tests.labserver_helpers import (BASE_DIR, LabServer, child_env, free_port, migrate, new_data_dir,
                                     remove_data_dir, remove_instances)
from tests.e2e.test_e2e_notifications import TIMEOUT_MS, headless_chromium

pytestmark = [pytest.mark.slow, pytest.mark.browser]

HOSTILE = 'a"&calc&'
LABELS = [f"seat{n:02d}" for n in range(1, 19)] + [HOSTILE, "Zoë 7"]
PASSWORD = "Kiosk-e2e-password-2024"
ENV = {"LAB_RUNTIME": "process"}


class Recorder(StandIn):
    """Stands in for the oTree instance: records every request's path and query."""

    def __init__(self):
        super().__init__(lambda request: f"<!DOCTYPE html><title>oTree room</title><h1>room "
                                         f"{urlsplit(request.path).path}</h1>".encode())

    @property
    def hits(self) -> list[tuple[str, dict]]:
        return [(urlsplit(r.path).path, parse_qs(urlsplit(r.path).query)) for r in self.requests]

    def labels(self, room):
        return [q["participant_label"][0] for path, q in self.hits if path == f"/room/{room}/"]


def shell(data_dir, port, code):
    """Run Django code in the labserver's environment (its own database)."""
    prelude = ("import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); "
               "django.setup()\n")
    result = subprocess.run([sys.executable, "-c", prelude + code], cwd=BASE_DIR, capture_output=True, text=True,
                            env=child_env(data_dir, port, **ENV), timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def lab():
    need(CHROMIUM.exists(), f"chromium ({CHROMIUM})")
    data_dir, port, recorder = new_data_dir(), free_port(), Recorder()
    migrate(data_dir, port)
    rooms = [{"name": "lab", "display_name": "Lab room", "participant_labels": LABELS},
             {"name": "open", "display_name": "Open room", "participant_labels": []}]
    shell(data_dir, port, f"""
from instances.models import Instance, Release
from manager.accounts.models import User
ann = User.objects.create_user("ann", "ann@lab.test", {PASSWORD!r}, name="Ann")
instance = Instance.objects.create(name="kiosk-e2e", owner=ann, public_port={recorder.port}, status="running")
Release.objects.create(instance=instance, number=1, commit="a" * 40, status="live", language_code="en",
                       rooms=__import__("json").loads({json.dumps(rooms)!r}))
""")
    state = {"server": LabServer(data_dir, port, **ENV)}
    try:
        state["server"].wait_ready()
        yield state, recorder
    finally:
        state["server"].kill_everything()
        recorder.close()
        # The sweep may have set the instance up meanwhile (as root: a user of its own).
        remove_instances(data_dir, port, **ENV)
        remove_data_dir(data_dir)


@pytest.fixture(scope="module")
def browser(lab):
    with headless_chromium() as browser:
        yield browser


def seat_path(label, room="lab"):
    return f"/lobby/kiosk-e2e/{room}/{quote(label, safe='')}/"


def room_url(recorder, label, room="lab"):
    return f"http://localhost:{recorder.port}/room/{room}/?participant_label={quote(label, safe='')}&welcome_page_ok=1"


def view(page):
    """Which of the kiosk's three views is showing."""
    return page.evaluate("['welcome', 'wait', 'going'].filter(v => !document.getElementById('view-' + v).hidden)"
                         ".join()")


def wait_board(board, label, state):
    board.wait_for_function(
        "([l, s]) => [...document.querySelectorAll('.lobby-room[data-room=lab] tr')]"
        ".some(r => r.dataset.seat === l && r.dataset.state === s)", arg=[label, state], timeout=TIMEOUT_MS)


def wait_board_count(board, state, count):
    board.wait_for_function(
        "([s, n]) => document.querySelectorAll('.lobby-room[data-room=lab] tr[data-state=' + s + ']').length === n",
        arg=[state, count], timeout=TIMEOUT_MS)


def click_gate(board, wanted):
    board.locator(".lobby-room[data-room=lab] form[action$='/gate/'] button").click()
    board.wait_for_function("(g) => document.querySelector('.lobby-room[data-room=lab] .lobby-room-body')"
                            ".dataset.gate === g",
                            arg=wanted, timeout=TIMEOUT_MS)


def not_reloaded(page, label):
    return page.evaluate("window.__kiosk") == label and page.evaluate(
        "performance.getEntriesByType('navigation').length") == 1


def test_twenty_kiosks_gate_reset_picker_and_a_manager_restart(lab, browser):
    from playwright.sync_api import expect

    state, recorder = lab
    base = state["server"].url
    staff = browser.new_context()
    kiosks = browser.new_context()
    for context in (staff, kiosks):
        context.set_default_timeout(TIMEOUT_MS)
    try:
        board = staff.new_page()
        board.goto(base + "/accounts/login/")
        board.fill("input[name=login]", "ann")
        board.fill("input[name=password]", PASSWORD)
        board.click("main form button[type=submit]")
        board.wait_for_url(base + "/")
        board.goto(base + "/instances/kiosk-e2e/")
        board.on("dialog", lambda dialog: dialog.accept())  # "Reset every seat …?"
        expect(board.locator("#lobby-url")).to_have_value(base + "/lobby/kiosk-e2e/")
        wait_board_count(board, "offline", 20)

        # 1. Twenty lab computers open their seat pages: welcome page, big button.
        pages = {}
        for label in LABELS:
            page = kiosks.new_page()
            page.goto(base + seat_path(label))
            expect(page.locator("#ready-button")).to_have_text("I am ready")
            page.evaluate("(l) => { window.__kiosk = l; }", label)
            pages[label] = page
        wait_board_count(board, "waiting", 20)
        assert all(view(p) == "welcome" for p in pages.values())
        index = kiosks.new_page()
        index.goto(base + "/lobby/kiosk-e2e/")
        assert index.locator(".seat-links a").count() == 20  # the public list: seats, nothing else
        index.close()

        # 2. The experimenter holds the gate; five participants click "I am ready" and wait.
        click_gate(board, "held")
        first = ["seat01", "seat02", "seat03", HOSTILE, "Zoë 7"]
        for label in first:
            pages[label].click("#ready-button")
        for label in first:
            expect(pages[label].locator("#wait-text")).to_have_text("Please wait, the session will start shortly.")
            wait_board(board, label, "ready")
        assert recorder.hits == []
        expect(board.locator(".lobby-room[data-room=lab] form[action$='/gate/'] button")).to_have_text(
            "Open gate (5 ready)")

        # 3. One click opens the gate: exactly the five ready kiosks land in the room, no reload anywhere else.
        opened = time.monotonic()
        click_gate(board, "open")
        for label in first:
            pages[label].wait_for_url(room_url(recorder, label))
        print(f"gate opened -> the last of 5 kiosks landed in the room: {(time.monotonic() - opened) * 1000:.0f} ms")
        assert sorted(recorder.labels("lab")) == sorted(first)  # the hostile label arrives intact
        for label in LABELS[3:18]:
            assert pages[label].url == base + seat_path(label) and view(pages[label]) == "welcome"
            assert not_reloaded(pages[label], label)
        for label in first:
            wait_board(board, label, "entered")

        # 4. With the gate open, "I am ready" goes straight in.
        pages["seat04"].click("#ready-button")
        pages["seat04"].wait_for_url(room_url(recorder, "seat04"))
        wait_board(board, "seat04", "entered")

        # 5. Reset: one seat, then all; a reset kiosk returns to the welcome page by itself.
        click_gate(board, "held")
        for label in ("seat05", "seat06"):
            pages[label].click("#ready-button")
            expect(pages[label].locator("#view-wait")).to_be_visible()
            wait_board(board, label, "ready")
        board.locator(".lobby-room[data-room=lab] tr[data-seat=seat05] .lobby-reset-seat").click()
        expect(pages["seat05"].locator("#view-welcome")).to_be_visible()
        wait_board(board, "seat05", "waiting")
        assert view(pages["seat06"]) == "wait"
        board.get_by_role("button", name="Reset all seats").first.click()
        expect(pages["seat06"].locator("#view-welcome")).to_be_visible()
        for label in ("seat05", "seat06"):
            assert not_reloaded(pages[label], label)
        for label in first + ["seat04"]:
            wait_board(board, label, "offline")  # they left the lobby for the room
        wait_board_count(board, "waiting", 14)

        # 6. A room without participant labels: the lab computer picks its seat name.
        picker = kiosks.new_page()
        picker.goto(base + "/lobby/kiosk-e2e/open/")
        picker.fill("input[name=seat]", "pc 7")
        picker.click(".seat-picker button[type=submit]")
        expect(picker.locator("#seat-error")).to_contain_text("“pc 7” is not a seat name")
        picker.fill("input[name=seat]", "pc-7")
        picker.click(".seat-picker button[type=submit]")
        picker.wait_for_url(base + "/lobby/kiosk-e2e/open/pc-7/")
        picker.click("#ready-button")
        picker.wait_for_url(room_url(recorder, "pc-7", room="open"))
        assert recorder.labels("open") == ["pc-7"]

        # 7. Unknown seat: a clear 404 page.
        response = picker.goto(base + seat_path("seat99"))
        assert response.status == 404
        expect(picker.locator("#not-found")).to_have_text("Room “lab” has no seat “seat99” (it is not one of its "
                                                          "participant labels).")

        # 8. The manager restarts while a participant waits behind the held gate: the kiosks
        #    reconnect by themselves, and opening the gate afterwards still lets her in.
        pages["seat07"].click("#ready-button")
        expect(pages["seat07"].locator("#view-wait")).to_be_visible()
        server = state["server"]
        assert server.terminate() == 0
        expect(pages["seat07"].locator("#kiosk-status")).to_be_visible()  # "reconnecting…"
        state["server"] = LabServer(server.data_dir, server.port, **ENV)
        state["server"].wait_ready()
        for label in ("seat07", "seat08"):
            expect(pages[label].locator("#kiosk-status")).to_be_hidden(timeout=30_000)
        assert view(pages["seat07"]) == "wait" and view(pages["seat08"]) == "welcome"
        board.reload()
        wait_board(board, "seat07", "ready")
        wait_board(board, "seat08", "waiting")  # its page reconnected
        click_gate(board, "open")
        pages["seat07"].wait_for_url(room_url(recorder, "seat07"))
        for label in LABELS[7:18]:
            assert not_reloaded(pages[label], label)  # through the restart without a reload
    finally:
        staff.close()
        kiosks.close()
