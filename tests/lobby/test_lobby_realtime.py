"""The kiosk socket and the board's topic, against the real ASGI application and the real
Redis channel layer (the embedded server started by conftest)."""

import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from lobby import services
from lobby.models import Seat
from manager.asgi import application
from tests.lobby_helpers import HOSTILE, lobby_instance
from tests.manager.test_realtime import ORIGIN, connect as connect_live

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def lab(boss, ann, bob):
    lobby_instance(ann)
    return boss, ann, bob


async def kiosk(label, room="lab", instance="ann-study", origin=ORIGIN):
    from urllib.parse import quote

    path = f"/ws/lobby/{instance}/{room}/" + (f"?label={quote(label, safe='')}" if label is not None else "")
    communicator = WebsocketCommunicator(application, path, headers=[origin] if origin else [])
    connected, _ = await communicator.connect(timeout=5)
    return communicator, connected


@sync_to_async
def state_of(label):
    seat = Seat.objects.filter(room__name="lab", label=label).first()
    return seat.state if seat else "offline"


@sync_to_async
def ref():
    return services.find_room("ann-study", "lab")


async def board(user):
    """A live socket of `user` subscribed to the lobby board topic."""
    tab, ok = await connect_live(user)
    assert ok
    assert (await tab.receive_json_from(timeout=5))["type"] == "hello"
    await tab.send_json_to({"subscribe": "lobby:ann-study"})
    return tab


async def test_only_existing_seats_from_an_allowed_origin_get_a_socket(lab):
    for label, room, instance, origin in (
        ("seat99", "lab", "ann-study", ORIGIN),  # not a participant label
        (None, "lab", "ann-study", ORIGIN),  # no label at all
        ("seat01", "attic", "ann-study", ORIGIN),  # no such room
        ("seat01", "lab", "nope", ORIGIN),  # no such instance
        ("bad name", "open", "ann-study", ORIGIN),  # not a valid seat name in a room without labels
        ("seat01", "lab", "ann-study", (b"origin", b"http://evil.example")),  # another site's page
        ("seat01", "lab", "ann-study", (b"origin", b"http://localhost:18500")),  # the instance's own pages
        ("seat01", "lab", "ann-study", (b"origin", b"http://127.0.0.1:18500")),  # the manager's host, another port
        ("seat01", "lab", "ann-study", (b"origin", b"https://127.0.0.1:8000")),  # another scheme
    ):
        communicator, connected = await kiosk(label, room, instance, origin)
        assert not connected, (label, room, instance)
        await communicator.disconnect()
    assert await state_of("seat99") == "offline"
    assert await state_of("seat01") == "offline"  # the refused sockets marked nothing
    # The kiosk page's own origin, and a client that is no browser (no Origin header), get theirs.
    for origin in (ORIGIN, None):
        communicator, connected = await kiosk("seat01", origin=origin)
        assert connected, origin
        assert (await communicator.receive_json_from(timeout=5))["seat"] == "waiting"
        await communicator.disconnect()


async def test_board_topic_is_for_the_owner_and_lab_managers(lab):
    boss, ann, bob = lab
    for user in (ann, boss):
        tab = await board(user)
        assert await tab.receive_json_from(timeout=5) == {"type": "subscribed", "topic": "lobby:ann-study"}
        await tab.disconnect()
    tab = await board(bob)
    reply = await tab.receive_json_from(timeout=5)
    assert reply["type"] == "error" and "cannot subscribe" in reply["detail"]
    # Bob's socket hears nothing of the lobby.
    page, ok = await kiosk("seat01")
    assert ok
    assert await tab.receive_nothing(timeout=0.5)
    await page.disconnect()
    await tab.disconnect()


async def test_an_open_page_makes_its_seat_waiting_and_the_board_hears_it(lab):
    boss, ann, bob = lab
    tab = await board(ann)
    await tab.receive_json_from(timeout=5)  # subscribed
    page, ok = await kiosk(HOSTILE)
    assert ok
    assert await page.receive_json_from(timeout=5) == {"type": "state", "seat": "waiting", "gate": "open"}
    assert await tab.receive_json_from(timeout=5) == {"type": "lobby", "instance": "ann-study", "room": "lab"}
    assert await state_of(HOSTILE) == "waiting"
    # A second page of the same seat: closing one keeps the seat waiting.
    twin, ok = await kiosk(HOSTILE)
    assert ok and (await twin.receive_json_from(timeout=5))["seat"] == "waiting"
    await twin.disconnect()
    assert await state_of(HOSTILE) == "waiting"
    await page.disconnect()
    assert await state_of(HOSTILE) == "offline"
    assert await tab.receive_json_from(timeout=5) == {"type": "lobby", "instance": "ann-study", "room": "lab"}
    await tab.disconnect()


async def test_opening_the_gate_sends_exactly_the_ready_kiosks_to_the_room(lab):
    boss, ann, bob = lab
    room = await ref()
    await sync_to_async(services.set_gate)(ann, room, False)
    pages = {}
    for label in ("seat01", "seat02", HOSTILE):
        pages[label], ok = await kiosk(label)
        assert ok
        assert (await pages[label].receive_json_from(timeout=5))["gate"] == "held"
    for label in ("seat01", HOSTILE):
        assert await sync_to_async(services.mark_ready)(room, label) == ("ready", None)
    await sync_to_async(services.set_gate)(boss, room, True)
    assert await pages["seat01"].receive_json_from(timeout=5) == {
        "type": "go", "url": "http://localhost:18500/room/lab/?participant_label=seat01&welcome_page_ok=1"}
    assert await pages[HOSTILE].receive_json_from(timeout=5) == {
        "type": "go", "url": "http://localhost:18500/room/lab/?participant_label=a%22%26calc%26&welcome_page_ok=1"}
    assert await pages["seat02"].receive_json_from(timeout=5) == {"type": "gate", "gate": "open"}
    assert [await state_of(x) for x in ("seat01", "seat02", HOSTILE)] == ["entered", "waiting", "entered"]
    for page in pages.values():
        await page.disconnect()


async def test_reset_returns_that_kiosk_to_the_welcome_page_only(lab):
    boss, ann, bob = lab
    room = await ref()
    await sync_to_async(services.set_gate)(ann, room, False)
    one, _ = await kiosk("seat01")
    two, _ = await kiosk("seat02")
    for page in (one, two):
        await page.receive_json_from(timeout=5)
    await sync_to_async(services.mark_ready)(room, "seat01")
    await sync_to_async(services.mark_ready)(room, "seat02")
    await sync_to_async(services.reset)(ann, room, "seat01")
    assert await one.receive_json_from(timeout=5) == {"type": "state", "seat": "waiting", "gate": "held"}
    assert await two.receive_nothing(timeout=0.5)
    assert [await state_of(x) for x in ("seat01", "seat02")] == ["waiting", "ready"]
    await sync_to_async(services.reset)(boss, room)
    assert (await two.receive_json_from(timeout=5))["seat"] == "waiting"
    assert (await one.receive_json_from(timeout=5))["seat"] == "waiting"
    await one.disconnect()
    await two.disconnect()


async def test_a_kiosk_can_only_ping(lab):
    page, ok = await kiosk("seat01")
    assert ok
    await page.receive_json_from(timeout=5)
    await page.send_json_to({"type": "ping"})
    assert await page.receive_json_from(timeout=5) == {"type": "pong"}
    for message in ({"gate": "open"}, {"reset": "seat02"}, {"subscribe": "lobby:ann-study"}, [1]):
        await page.send_json_to(message)
        assert await page.receive_json_from(timeout=5) == {"type": "error", "detail": "a kiosk only sends pings"}
    room = await ref()
    assert room.row.gate_open
    await page.disconnect()


async def test_a_reconnecting_kiosk_is_told_the_current_state(lab):
    """The page was away (manager restart, network blip) while its seat changed."""
    boss, ann, bob = lab
    room = await ref()
    await sync_to_async(services.set_gate)(ann, room, False)
    await sync_to_async(services.mark_ready)(room, "seat03")
    page, ok = await kiosk("seat03")
    assert ok and await page.receive_json_from(timeout=5) == {"type": "state", "seat": "ready", "gate": "held"}
    await page.disconnect()
    await sync_to_async(services.set_gate)(ann, room, True)  # opened while the page was away
    page, ok = await kiosk("seat03")
    assert await page.receive_json_from(timeout=5) == {
        "type": "state", "seat": "entered", "gate": "open",
        "url": "http://localhost:18500/room/lab/?participant_label=seat03&welcome_page_ok=1"}
    await page.disconnect()


def test_a_seat_whose_manager_died_goes_offline_when_its_presence_expires(lab):
    """No disconnect ever arrived (the manager was killed): the board shows the seat
    offline once its last ping is older than PRESENCE_TTL."""
    room = services.find_room("ann-study", "lab")
    services.kiosk_connected(room.row.pk, "seat02", "specific.dead-channel")
    assert services.board_room(room).seats[1].state == "waiting"
    key = services._presence_key(room.row.pk, "seat02")
    services._redis().zadd(key, {"specific.dead-channel": time.time() - services.PRESENCE_TTL - 1})
    assert services.board_room(room).seats[1].state == "offline"
    assert Seat.objects.get(label="seat02").state == "offline"


async def test_an_idle_kiosk_socket_stays_connected(lab):
    """Kiosks sit idle for minutes: the channel layer's blocking read (5 s) must not time
    out the consumer (it did with redis-py 8's default 5 s socket timeout)."""
    import asyncio

    boss, ann, bob = lab
    page, ok = await kiosk("seat01")
    assert ok
    await page.receive_json_from(timeout=5)
    await asyncio.sleep(7)
    await sync_to_async(services.set_gate)(ann, await ref(), False)
    assert await page.receive_json_from(timeout=5) == {"type": "gate", "gate": "held"}
    await page.disconnect()
