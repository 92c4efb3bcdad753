"""What an instance page shows live, over the real ASGI app and Redis channel layer, on
every runtime (Docker; plain processes): status changes of a running action, and
following an instance's logs."""

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from instances import services
from instances.tasks import instance_action
from manager.asgi import application
from manager.jobs.models import Job
from tests import backends

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]
ORIGIN = (b"origin", b"http://127.0.0.1:8000")


def _cookie(user):
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}".encode()


async def socket_for(user):
    tab = WebsocketCommunicator(application, "/ws/live/",
                                headers=[ORIGIN, (b"cookie", await sync_to_async(_cookie)(user))])
    connected, _ = await tab.connect(timeout=5)
    assert connected
    assert (await tab.receive_json_from(timeout=5))["type"] == "hello"
    return tab


async def next_of_type(tab, kind, timeout=30):
    for _ in range(50):
        event = await tab.receive_json_from(timeout=timeout)
        if event["type"] == kind:
            return event
    raise AssertionError(f"no {kind} event")


@pytest.fixture(params=backends.BACKENDS)
def world(db, monkeypatch, settings, request):
    backends.require(request.param)
    settings.LAB_RUNTIME = request.param
    monkeypatch.setattr(instance_action, "apply_async", lambda *a, **k: None)
    yield request.getfixturevalue("boss"), request.getfixturevalue("ann"), request.getfixturevalue("bob")
    runtime = backends.make(request.param)
    for name in runtime.owned_instances():
        runtime.remove(name)


async def test_status_changes_and_logs_reach_the_owner_only(world):
    boss, ann, bob = world
    instance = await sync_to_async(services.create_instance)(boss, name="live-one", owner=ann)
    job = await sync_to_async(lambda: Job.objects.get(kind="instance.create"))()

    owner_tab = await socket_for(ann)
    await owner_tab.send_json_to({"subscribe": "instance:live-one"})
    assert (await owner_tab.receive_json_from(timeout=5))["type"] == "subscribed"
    current = await owner_tab.receive_json_from(timeout=5)  # the state now: nothing missed since the page loaded
    assert current["type"] == "instance" and current["status"] == "provisioning"
    other_tab = await socket_for(bob)
    await other_tab.send_json_to({"subscribe": "instance:live-one"})
    assert (await other_tab.receive_json_from(timeout=5))["type"] == "error"

    # The create job runs (as in the worker); the owner's page sees the status arrive.
    await sync_to_async(instance_action.apply)(args=[str(job.pk), instance.pk, "create"])
    event = await next_of_type(owner_tab, "instance")
    assert event["name"] == "live-one" and event["status"] == "ready_for_code"
    assert event["status_label"] == "ready for code"
    assert await other_tab.receive_nothing(timeout=0.5)

    # Following the database's log: the owner gets PostgreSQL's own output, bob an error.
    await owner_tab.send_json_to({"follow_logs": "live-one", "component": "db"})
    logs = await next_of_type(owner_tab, "logs")
    assert logs["component"] == "db" and "database system is ready" in logs["text"]
    await other_tab.send_json_to({"follow_logs": "live-one", "component": "db"})
    error = await next_of_type(other_tab, "error")
    assert "live-one" in error["detail"]
    await owner_tab.disconnect()
    await other_tab.disconnect()
