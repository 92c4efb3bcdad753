"""The realtime socket, tested against the real ASGI application (manager.asgi) and the
real Redis channel layer (the embedded server started by conftest)."""

import asyncio

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from manager.asgi import application
from manager.realtime.services import notify_user

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = (b"origin", b"http://127.0.0.1:8000")


def _session_cookie(user) -> bytes:
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}".encode()


async def connect(user=None, origin=ORIGIN):
    headers = [origin] if origin else []
    if user is not None:
        headers.append((b"cookie", await sync_to_async(_session_cookie)(user)))
    communicator = WebsocketCommunicator(application, "/ws/live/", headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    return communicator, connected


@pytest.fixture
def people(ann, bob):
    return ann, bob


async def test_anonymous_socket_is_refused():
    communicator, connected = await connect(None)
    assert not connected
    await communicator.disconnect()


async def test_foreign_origin_is_refused(people):
    ann, _ = people
    communicator, connected = await connect(ann, origin=(b"origin", b"http://evil.example"))
    assert not connected
    await communicator.disconnect()


# Pages that must not open the socket as their visitor, whoever is logged in: the
# manager's host on another port (in port routing that is where instances are), another
# scheme, the instances' own host name, sandboxed frames and file: pages ("null").
FOREIGN_ORIGINS = [
    b"http://127.0.0.1:18000",  # an instance's port on the manager's own host
    b"http://127.0.0.1",  # port 80 of the same host
    b"https://127.0.0.1:8000",  # same host and port, other scheme
    b"http://localhost:8000",  # the instances' host name (LAB_INSTANCE_HOST), the manager's port
    b"http://localhost:18000",  # an instance's page, as the browser names it
    b"http://127.0.0.1:8000.evil.example",
    b"null",
    b"",
]


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
async def test_only_the_managers_own_origin_with_scheme_host_and_port_may_open_the_socket(people, origin):
    ann, _ = people
    communicator, connected = await connect(ann, origin=(b"origin", origin))
    assert not connected, origin
    await communicator.disconnect()
    # The same person's socket from the manager's own page works (the test can fail).
    communicator, connected = await connect(ann, origin=(b"origin", b"http://127.0.0.1:8000"))
    assert connected
    await communicator.disconnect()


async def test_two_origin_headers_are_refused(people):
    ann, _ = people
    cookie = await sync_to_async(_session_cookie)(ann)
    communicator = WebsocketCommunicator(application, "/ws/live/", headers=[
        ORIGIN, (b"origin", b"http://localhost:18000"), (b"cookie", cookie)])
    connected, _ = await communicator.connect(timeout=5)
    assert not connected
    await communicator.disconnect()


async def test_the_public_url_and_configured_origins_are_the_managers(people, settings):
    """Behind a TLS proxy the pages come from LAB_PUBLIC_URL; LAB_CSRF_TRUSTED_ORIGINS adds
    exact origins (a wildcard there is for forms only)."""
    ann, _ = people
    settings.LAB_PUBLIC_URL = "https://lab.example.edu"
    settings.LAB_CSRF_TRUSTED_ORIGINS = ["https://lab2.example.edu:8443", "https://*.example.edu"]
    for origin, ok in ((b"https://lab.example.edu", True), (b"https://LAB.example.edu:443", True),
                       (b"http://lab.example.edu", False), (b"https://lab.example.edu:8443", False),
                       (b"https://lab2.example.edu:8443", True), (b"https://lab2.example.edu", False),
                       (b"https://x.example.edu", False),
                       (b"http://127.0.0.1:8000", True)):  # LAB_HOST:LAB_PORT, the direct address
        communicator, connected = await connect(ann, origin=(b"origin", origin))
        assert connected is ok, origin
        await communicator.disconnect()


async def test_a_client_without_origin_header_is_no_browser_and_needs_the_session_itself(people):
    ann, _ = people
    communicator, connected = await connect(ann, origin=None)  # e.g. bench/notify_latency.py
    assert connected
    assert await communicator.receive_json_from(timeout=5) == {"type": "hello", "user": "ann"}
    await communicator.disconnect()
    communicator, connected = await connect(None, origin=None)
    assert not connected
    await communicator.disconnect()


async def test_deactivated_user_is_refused(people):
    ann, _ = people
    cookie = await sync_to_async(_session_cookie)(ann)
    ann.is_active = False
    await sync_to_async(ann.save)()
    communicator = WebsocketCommunicator(application, "/ws/live/", headers=[ORIGIN, (b"cookie", cookie)])
    connected, _ = await communicator.connect(timeout=5)
    assert not connected
    await communicator.disconnect()


async def test_notification_reaches_every_tab_of_that_user_only(people):
    ann, bob = people
    tab1, ok1 = await connect(ann)
    tab2, ok2 = await connect(ann)
    other, ok3 = await connect(bob)
    assert ok1 and ok2 and ok3
    for tab, name in ((tab1, "ann"), (tab2, "ann"), (other, "bob")):
        assert await tab.receive_json_from(timeout=5) == {"type": "hello", "user": name}

    # Sent from synchronous code, as a Celery task does, through the Redis channel layer.
    await sync_to_async(notify_user)(ann.pk, "Invitation e-mail sent to carl", level="success")

    for tab in (tab1, tab2):
        event = await tab.receive_json_from(timeout=5)
        assert event["type"] == "notify"
        assert event["message"] == "Invitation e-mail sent to carl"
        assert event["level"] == "success"
    assert await other.receive_nothing(timeout=0.5)
    for tab in (tab1, tab2, other):
        await tab.disconnect()


async def test_subscriptions_are_checked(people):
    ann, bob = people
    tab, ok = await connect(ann)
    assert ok
    await tab.receive_json_from(timeout=5)  # hello

    await tab.send_json_to({"subscribe": f"user:{bob.pk}"})
    reply = await tab.receive_json_from(timeout=5)
    assert reply["type"] == "error" and "cannot subscribe" in reply["detail"]

    await tab.send_json_to({"subscribe": "no-such-kind:1"})
    assert (await tab.receive_json_from(timeout=5))["type"] == "error"

    await tab.send_json_to({"subscribe": f"user:{ann.pk}"})
    assert await tab.receive_json_from(timeout=5) == {"type": "subscribed", "topic": f"user:{ann.pk}"}

    # Bob's notifications never reach Ann's socket.
    await sync_to_async(notify_user)(bob.pk, "for bob only")
    assert await tab.receive_nothing(timeout=0.5)
    await tab.disconnect()


async def test_bad_messages_get_an_error_not_a_crash(people):
    ann, _ = people
    tab, ok = await connect(ann)
    assert ok
    await tab.receive_json_from(timeout=5)
    await tab.send_to(text_data="[1, 2]")
    assert (await tab.receive_json_from(timeout=5))["type"] == "error"
    await tab.send_json_to({"type": "ping"})
    assert await tab.receive_json_from(timeout=5) == {"type": "pong"}
    await tab.send_json_to({"what": "ever"})
    assert (await tab.receive_json_from(timeout=5))["detail"] == "unknown message"
    await tab.send_json_to({"follow_release": "follow-me", "number": "one"})
    assert await tab.receive_json_from(timeout=5) == {"type": "error", "detail": "number must be a release number"}
    await tab.send_json_to({"follow_logs": "nobody-has-it", "component": "kernel"})
    assert await tab.receive_json_from(timeout=5) == {"type": "error", "detail": "unknown component 'kernel'"}
    await tab.disconnect()


async def test_disconnected_tab_leaves_its_group(people):
    ann, _ = people
    tab, ok = await connect(ann)
    assert ok
    await tab.receive_json_from(timeout=5)
    await tab.disconnect()
    # A second tab opened later still receives; the closed one is gone from the group.
    tab2, ok2 = await connect(ann)
    assert ok2
    await tab2.receive_json_from(timeout=5)
    await sync_to_async(notify_user)(ann.pk, "still here")
    assert (await tab2.receive_json_from(timeout=5))["message"] == "still here"
    await asyncio.wait_for(tab2.disconnect(), 5)


async def test_release_log_follows_live_until_the_release_ends(people):
    from instances.models import Instance, Release

    ann, bob = people
    instance = await sync_to_async(Instance.objects.create)(name="follow-me", owner=ann, public_port=18700)
    release = await sync_to_async(Release.objects.create)(instance=instance, number=1, commit="b" * 40,
                                                          status="building", log="Step 1/5\n")
    tab, ok = await connect(ann)
    assert ok
    await tab.receive_json_from(timeout=5)
    await tab.send_json_to({"follow_release": "follow-me", "number": 1})
    first = await tab.receive_json_from(timeout=5)
    assert first["type"] == "release" and first["log"] == "Step 1/5\n" and not first["done"]

    release.log += "Step 2/5\n"
    await sync_to_async(release.save)()
    second = await tab.receive_json_from(timeout=5)
    assert second["log"].endswith("Step 2/5\n")

    release.status = "live"
    await sync_to_async(release.save)()
    last = await tab.receive_json_from(timeout=5)
    assert last["done"] and last["status"] == "live"

    other, ok = await connect(bob)
    await other.receive_json_from(timeout=5)
    await other.send_json_to({"follow_release": "follow-me", "number": 1})
    assert (await other.receive_json_from(timeout=5))["type"] == "error"
    await tab.disconnect()
    await other.disconnect()


async def test_a_tab_that_was_between_pages_gets_what_it_missed(people):
    """The tab that submitted a form is loading its next page when a quick task finishes:
    it still gets the toast once its socket is up (replay of the last seconds)."""
    ann, bob = people
    await sync_to_async(notify_user)(ann.pk, "Invitation e-mail sent to carl", level="success")
    tab, ok = await connect(ann)
    assert ok
    assert (await tab.receive_json_from(timeout=5))["type"] == "hello"
    missed = await tab.receive_json_from(timeout=5)
    assert missed["type"] == "notify" and missed["message"] == "Invitation e-mail sent to carl" and missed["id"]
    other, ok = await connect(bob)
    assert (await other.receive_json_from(timeout=5))["type"] == "hello"
    assert await other.receive_nothing(timeout=0.5)  # never someone else's
    await tab.disconnect()
    await other.disconnect()
