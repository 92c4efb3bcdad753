"""The lobby's pages and rules through Django's request stack (real Redis for presence
and the channel layer): public kiosk pages, "I am ready", the gate, resets, the welcome
text, the seat picker, the launchers download and who may do what."""

import io
import zipfile
from urllib.parse import quote

import pytest
from django.test import Client

from instances.models import Release
from lobby import services
from lobby.models import LobbyRoom, Seat
from manager.audit.models import AuditEvent
from tests.lobby_helpers import HOSTILE, LABELS, lobby_instance

pytestmark = pytest.mark.django_db


@pytest.fixture
def people(boss, ann, bob):
    return boss, ann, bob


@pytest.fixture
def instance(people):
    return lobby_instance(people[1])


def logged_in(user):
    client = Client()
    client.force_login(user)
    return client


def seat_url(label, room="lab", name="ann-study"):
    return f"/lobby/{name}/{room}/{quote(label, safe='')}/"


def state_of(label, room="lab"):
    seat = Seat.objects.filter(room__name=room, label=label).first()
    return seat.state if seat else "offline"


def gate_is_open(room="lab"):
    row = LobbyRoom.objects.filter(name=room).first()
    return row is None or row.gate_open  # a room's gate is open until someone holds it


def hold(user, room="lab"):
    return logged_in(user).post(f"/instances/ann-study/lobby/rooms/{room}/gate/", {"gate": "hold"})


# --- public pages -------------------------------------------------------------------------------

def test_index_lists_rooms_and_seats_and_reveals_nothing_else(instance):
    response = Client().get("/lobby/ann-study/")
    assert response.status_code == 200
    page = response.content.decode()
    for label in LABELS:
        assert f'href="{seat_url(label)}"' in page
    assert 'action="/lobby/ann-study/open/"' in page  # the room without labels: a seat picker
    for secret in (instance.admin_password, instance.rest_key, instance.db_password):
        assert secret not in page
    assert "gate" not in page.lower() and "waiting" not in page  # no board, no states
    assert response["Cache-Control"].startswith("max-age=0")


def test_seat_page_is_a_welcome_page_with_a_ready_button(instance):
    page = Client().get(seat_url("seat01")).content.decode()
    assert "I am ready" in page and "Welcome" in page and "Seat seat01" in page
    assert 'id="view-wait" hidden' in page  # not waiting yet
    assert 'data-ws="/ws/lobby/ann-study/lab/"' in page
    assert instance.admin_password not in page


def test_the_kiosk_speaks_the_instance_language(people):
    lobby_instance(people[1], language="de-CH")
    page = Client().get(seat_url("seat01")).content.decode()
    assert '<html lang="de">' in page
    assert "Ich bin bereit" in page and "Willkommen" in page and "Platz seat01" in page
    assert "Bitte warten Sie, die Sitzung beginnt in Kürze." in page


def test_unknown_instance_room_or_label_is_a_clear_404(instance, people):
    cases = {
        "/lobby/nope/": "no instance named “nope”",
        "/lobby/nope/lab/seat01/": "no instance named “nope”",
        "/lobby/ann-study/attic/": "has no room named “attic”",
        "/lobby/ann-study/lab/seat99/": "Room “lab” has no seat “seat99”",
        "/lobby/ann-study/open/bad%20name/": "“bad name” is not a seat name",
    }
    for url, text in cases.items():
        response = Client().get(url)
        assert response.status_code == 404, url
        assert text in response.content.decode(), url
    # An instance without a deployed release has no lobby either.
    from instances.models import Instance

    Instance.objects.create(name="bare", owner=people[2], public_port=18501)
    assert Client().get("/lobby/bare/").status_code == 404


def test_ready_with_the_gate_open_goes_to_the_room_with_the_label_url_encoded(instance):
    response = Client().post(seat_url(HOSTILE))
    assert response.status_code == 302
    assert response["Location"] == (f"{instance.url}room/lab/?participant_label=a%22%26calc%26"
                                    "&welcome_page_ok=1")
    assert ":18500/" in instance.url
    assert state_of(HOSTILE) == "entered"
    # The page's script asks for JSON; a label with a slash and non-ASCII works the same.
    response = Client().post(seat_url("x/y"), HTTP_ACCEPT="application/json")
    assert response.json() == {
        "state": "entered", "url": f"{instance.url}room/lab/?participant_label=x%2Fy&welcome_page_ok=1"}
    response = Client().post(seat_url("Zoë 7"), HTTP_ACCEPT="application/json")
    assert response.json()["url"].endswith("participant_label=Zo%C3%AB%207&welcome_page_ok=1")


def test_ready_with_the_gate_held_waits_then_opening_lets_every_ready_seat_in(instance, people):
    boss, ann, bob = people
    assert hold(ann).status_code == 302
    response = Client().post(seat_url("seat01"))
    assert response.status_code == 302 and response["Location"] == seat_url("seat01")
    page = Client().get(seat_url("seat01")).content.decode()
    assert 'id="view-wait" hidden' not in page and 'id="view-welcome" hidden' in page
    assert Client().post(seat_url("seat02"), HTTP_ACCEPT="application/json").json() == {"state": "ready", "url": None}
    assert [state_of(x) for x in ("seat01", "seat02", "seat03")] == ["ready", "ready", "offline"]

    response = logged_in(boss).post("/instances/ann-study/lobby/rooms/lab/gate/", {"gate": "open"})
    assert response.status_code == 302 and response["Location"] == "/instances/ann-study/#lobby"
    assert [state_of(x) for x in ("seat01", "seat02", "seat03")] == ["entered", "entered", "offline"]
    event = AuditEvent.objects.filter(action="lobby.gate").first()
    assert "opened the lobby gate of room lab of ann-study (2 seats entered)" in event.summary
    # An entered seat that clicks again (its browser was restarted) goes straight back in.
    hold(ann)
    assert Client().post(seat_url("seat01"), HTTP_ACCEPT="application/json").json()["state"] == "entered"


def test_ready_needs_csrf(instance):
    client = Client(enforce_csrf_checks=True)
    assert client.post(seat_url("seat01")).status_code == 403
    assert state_of("seat01") == "offline"
    page = client.get(seat_url("seat01"))
    token = page.cookies["csrftoken"].value
    assert client.post(seat_url("seat01"), HTTP_X_CSRFTOKEN=token).status_code == 302


def test_seat_picker_of_a_room_without_labels(instance):
    response = Client().get("/lobby/ann-study/open/", {"seat": " pc-07 "})
    assert response.status_code == 302 and response["Location"] == "/lobby/ann-study/open/pc-07/"
    response = Client().get("/lobby/ann-study/open/", {"seat": "../etc"})
    assert response.status_code == 200
    assert "“../etc” is not a seat name" in response.content.decode()
    assert Client().post("/lobby/ann-study/open/pc-07/").status_code == 302
    assert state_of("pc-07", room="open") == "entered"


def test_rooms_without_labels_have_a_seat_limit(instance, monkeypatch):
    monkeypatch.setattr(services, "MAX_FREE_SEATS", 2)
    for name in ("pc1", "pc2"):
        Client().post(f"/lobby/ann-study/open/{name}/")
    response = Client().get("/lobby/ann-study/open/pc3/")
    assert response.status_code == 404 and "already has 2 seats" in response.content.decode()
    assert Client().get("/lobby/ann-study/open/pc1/").status_code == 200  # existing seats still work


def test_labels_of_the_live_release_count(instance, people):
    """A new release with other labels: old seats are gone from the lobby."""
    Release.objects.filter(instance=instance).update(status="superseded")
    lobby_instance(people[1], labels=["new01"], number=2)
    assert Client().get(seat_url("seat01")).status_code == 404
    assert Client().get(seat_url("new01")).status_code == 200


# --- the board ----------------------------------------------------------------------------------

def test_instance_page_shows_lobby_url_seats_and_states(instance, people):
    boss, ann, bob = people
    Client().post(seat_url("seat02"))
    page = logged_in(ann).get("/instances/ann-study/").content.decode()
    assert 'id="lobby"' in page and "http://127.0.0.1:8000/lobby/ann-study/" in page
    assert 'data-seat="seat02" data-state="entered"' in page
    assert 'data-seat="seat01" data-state="offline"' in page
    assert 'data-seat="a&quot;&amp;calc&amp;"' in page  # escaped
    assert "/instances/ann-study/lobby/launchers.zip" in page
    assert 'data-instance="ann-study"' in page  # the live board script


def test_board_actions_are_for_the_owner_and_lab_managers_only(instance, people):
    boss, ann, bob = people
    Client().post(seat_url("seat01"))  # entered
    for client, expected in ((Client(), 302), (logged_in(bob), 404)):
        for url, data in (("gate/", {"gate": "hold"}), ("reset/", {})):
            response = client.post(f"/instances/ann-study/lobby/rooms/lab/{url}", data)
            assert response.status_code == expected
            if expected == 302:
                assert response["Location"].startswith("/accounts/login/")
    assert gate_is_open() and state_of("seat01") == "entered"
    assert logged_in(bob).get("/instances/ann-study/lobby/launchers.zip").status_code == 404
    assert logged_in(bob).post("/instances/ann-study/lobby/welcome/", {"welcome_text": "hi"}).status_code == 404
    # GET does nothing.
    assert logged_in(ann).get("/instances/ann-study/lobby/rooms/lab/gate/").status_code == 405


def test_board_actions_need_csrf(instance, people):
    client = Client(enforce_csrf_checks=True)
    client.force_login(people[1])
    assert client.post("/instances/ann-study/lobby/rooms/lab/gate/", {"gate": "hold"}).status_code == 403
    assert gate_is_open()


def test_bad_gate_value_is_refused_with_a_reason(instance, people):
    response = logged_in(people[1]).post("/instances/ann-study/lobby/rooms/lab/gate/", {"gate": "ajar"})
    assert response.status_code == 422 and "gate must be “open” or “hold”" in response.content.decode()


def test_reset_one_seat_and_all_seats(instance, people):
    boss, ann, bob = people
    for label in ("seat01", "seat02", "seat03"):
        Client().post(seat_url(label))
    client = logged_in(ann)
    response = client.post("/instances/ann-study/lobby/rooms/lab/reset/", {"label": "seat02"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200  # htmx gets the room's fresh board
    assert 'data-seat="seat02" data-state="offline"' in response.content.decode()
    assert [state_of(x) for x in ("seat01", "seat02", "seat03")] == ["entered", "offline", "entered"]
    assert client.post("/instances/ann-study/lobby/rooms/lab/reset/", {"label": "seat77"}).status_code == 404
    client.post("/instances/ann-study/lobby/rooms/lab/reset/")
    assert {s.state for s in Seat.objects.all()} == {"offline"}
    assert AuditEvent.objects.filter(action="lobby.reset").count() == 2


def test_welcome_text_is_editable_per_instance(instance, people):
    client = logged_in(people[1])
    response = client.post("/instances/ann-study/lobby/welcome/", {"welcome_text": "Hello <b>lab</b>\n\nSecond"})
    assert response.status_code == 302
    page = Client().get(seat_url("seat01")).content.decode()
    assert "<p>Hello &lt;b&gt;lab&lt;/b&gt;</p>" in page and "<p>Second</p>" in page
    page = client.post("/instances/ann-study/lobby/welcome/", {"welcome_text": "x" * 2001}, follow=True).content.decode()
    assert "At most 2000 characters (this one has 2001)." in page
    client.post("/instances/ann-study/lobby/welcome/", {"welcome_text": ""})
    assert "Please take a seat" in Client().get(seat_url("seat01")).content.decode()


def test_launchers_zip_has_one_launcher_per_seat_system_and_browser(instance, people):
    response = logged_in(people[0]).get("/instances/ann-study/lobby/launchers.zip")
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    assert 'filename="ann-study-kiosk-launchers.zip"' in response["Content-Disposition"]
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    names = archive.namelist()
    lab = [n for n in names if n.startswith("ann-study-kiosk-launchers/lab/")]
    assert len(lab) == len(LABELS) * 3 * 3
    for kind, ext in (("windows", ".cmd"), ("macos", ".command"), ("linux", ".desktop")):
        for browser in ("chrome", "chromium", "edge"):
            assert f"ann-study-kiosk-launchers/lab/{kind}/{browser}/seat01{ext}" in names
    assert all(".." not in n and "\\" not in n for n in names)
    mode = archive.getinfo("ann-study-kiosk-launchers/lab/macos/chrome/seat01.command").external_attr >> 16
    assert mode & 0o111  # executable after unzip
    cmd = archive.read("ann-study-kiosk-launchers/lab/windows/edge/seat01.cmd").decode()
    assert '"http://127.0.0.1:8000/lobby/ann-study/lab/seat01/"' in cmd  # the LOBBY page, not the room
    assert "room/lab" not in cmd
    # The room without labels gets a launcher for its seat picker.
    picker = archive.read("ann-study-kiosk-launchers/open/linux/chromium/pick-a-seat.desktop").decode()
    assert '"http://127.0.0.1:8000/lobby/ann-study/open/"' in picker
    assert "README.txt" in names[-1]


def test_rooms_a_release_recorded_before_the_checks_cannot_break_pages(people):
    """A live release recorded by an earlier version may hold a room named "a/b" (which
    gave a 500 on the instance page) and labels by the thousand: such rooms are left out,
    labels are capped, and every page and the launchers still work."""
    from django.db import connection

    from instances import facts

    ann = people[1]
    instance = lobby_instance(ann)
    many = [f"s{n}" for n in range(facts.MAX_ROOM_LABELS + 500)]
    # A NUL in a label: only SQLite could have stored one (PostgreSQL's jsonb refuses \u0000).
    nul = ["bad\x00label"] if connection.vendor == "sqlite" else []
    Release.objects.filter(instance=instance).update(rooms=[
        {"name": "a/b", "participant_labels": ["x"]}, {"name": "..", "participant_labels": []},
        {"name": "lab", "display_name": "Lab room", "participant_labels": many + nul},
        {"name": "lab", "participant_labels": []}, "junk"])
    page = logged_in(ann).get("/instances/ann-study/")
    assert page.status_code == 200
    assert "/lobby/ann-study/a" not in page.content.decode()
    board = logged_in(ann).get("/instances/ann-study/lobby/rooms/lab/")
    assert board.status_code == 200
    index = Client().get("/lobby/ann-study/")
    assert index.status_code == 200 and "a/b" not in index.content.decode()
    assert Client().get("/lobby/ann-study/a%2Fb/").status_code == 404
    assert Client().get(seat_url(f"s{facts.MAX_ROOM_LABELS - 1}")).status_code == 200
    assert Client().get(seat_url(f"s{facts.MAX_ROOM_LABELS}")).status_code == 404  # past the cap: no seat
    response = logged_in(ann).get("/instances/ann-study/lobby/launchers.zip")
    assert response.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))).namelist()
    assert len([n for n in names if "/lab/" in n]) == facts.MAX_ROOM_LABELS * 9
