"""A sleeping instance with a real oTree app wakes for an HTTP request and for a websocket
through the real Caddy, on both runtimes (a real Docker engine; plain processes): the
reconciler really stops it (instances.sleep.put_to_sleep), the wake endpoint (manager.asgi
-> instances.wake, served in this process as in test_wake.py) really wakes it
(instances.sleep.wake), and oTree answers the held request. Caddy's config is the same
before the sleep and after the wake.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket

import pytest

from instances import proxy, sleep
from instances.models import Instance
from instances.runtime.base import Health
from tests import backends, otree_projects
from tests.instances.test_proxy import INSTANCE_HOST, caddy, free_ports, read_frame  # noqa: F401 - fixture
from tests.instances.test_releases import capture_jobs, deploy, new_instance  # noqa: F401 - fixture
from tests.instances.test_sleep import idle
from tests.instances.test_wake import AsgiServer

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module", params=["docker", "process"])
def runtime(request):
    backends.require(request.param)
    rt = backends.make(request.param)
    yield rt
    for name in rt.owned_instances():
        rt.remove(name)
    if rt.name == "docker":
        for image in rt.api.images(filters={"label": [f"org.otree-lab.manager={rt.manager_id}"]}):
            rt.api.remove_image(image["Id"], force=True)


def get(port: int, path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path, headers={"Host": f"{INSTANCE_HOST}:{port}", "Accept": "text/html"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace") + f" (Location: {resp.getheader('Location')})"
    finally:
        conn.close()


def otree_websocket(port: int) -> dict:
    """oTree's auto-advance socket (no login needed): it answers an unknown participant."""
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall((f"GET /auto_advance?participant_code=nobody&page_index=1 HTTP/1.1\r\n"
                      f"Host: {INSTANCE_HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        rfile = sock.makefile("rb")
        status = rfile.readline().decode()
        assert " 101 " in status, status
        while rfile.readline().strip():
            pass
        opcode, payload = read_frame(rfile)
        assert opcode == 1, opcode
        return json.loads(payload)


def fall_asleep(instance: Instance) -> None:
    """Idle for longer than the lab's sleep time (tests/instances/test_sleep.py), then asleep
    as the sleep sweep puts it."""
    instance = idle(instance)
    assert sleep.put_to_sleep(instance.pk, "no request for a while") is not None, sleep.why_awake(instance)


def test_a_sleeping_instance_wakes_for_a_request_and_a_websocket(runtime, caddy, tmp_path, boss, ann, settings):
    settings.LAB_RUNTIME = runtime.name
    instance, checkout = new_instance(ann, "sleeper", tmp_path)
    release, _job, _took = deploy(instance, checkout, otree_projects.valid_project(), "the study", ann)
    assert release.status == "live", release.status_reason
    (port,), settings.LAB_INSTANCE_PORTS = free_ports(1)
    Instance.objects.filter(pk=instance.pk).update(public_port=port)
    manager = AsgiServer(__import__("manager.asgi", fromlist=["application"]).application)
    settings.LAB_HOST, settings.LAB_PORT = "127.0.0.1", manager.port
    try:
        assert proxy.sync_routes()["loaded"]
        assert get(port, "/")[1].endswith("(Location: /demo)")  # oTree answers (its start page redirects)
        status, body = get(port, "/login")
        assert status == 200, (status, body[:300])
        config = proxy.admin_request("GET", "/config/")

        # It falls asleep: the app is stopped, the route asks the manager first.
        fall_asleep(instance)
        instance.refresh_from_db()
        assert instance.status == "sleeping" and instance.asleep
        assert runtime.state("sleeper").app.health != Health.RUNNING
        assert proxy.sync_routes()["reason"] == "unchanged"  # (the sweep)
        assert proxy.asleep_file("sleeper").exists()

        # A participant's page load: held, the instance woken, oTree's answer.
        status, body = get(port, "/login")
        assert status == 200, (status, body[:500])
        instance.refresh_from_db()
        assert instance.status == "running" and not instance.asleep
        assert instance.wake_reason == "a request to its URL" and instance.woke_at is not None
        assert runtime.state("sleeper").app.health == Health.RUNNING
        assert not proxy.asleep_file("sleeper").exists()

        # Asleep again; a websocket (oTree's auto-advance socket) wakes it and gets oTree's answer.
        fall_asleep(instance)
        assert Instance.objects.get(pk=instance.pk).status == "sleeping"
        assert otree_websocket(port) == {"error": "Participant not found in database."}
        assert Instance.objects.get(pk=instance.pk).status == "running"

        # Two sleeps and two wakes, and Caddy still runs the config it had before.
        assert proxy.admin_request("GET", "/config/") == config
        assert "ERROR" not in caddy.output(), caddy.output()[-3000:]
    finally:
        manager.close()
