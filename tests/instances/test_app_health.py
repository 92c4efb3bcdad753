"""An instance's status follows its app's health, on every runtime.

The walkthrough that found it: the app crash-looped (oTree exited at every start) while
the runtime kept starting it again, and the instance page and the API said `running` with
an empty reason for more than 90 s. Now the reconciler (the minute sweep, every action)
calls an app `running` only while it answers HTTP, and otherwise says `failed` with what
happened and the app's last output.

The app here is a small real HTTP server that serves on its first start and exits on every
later one (as oTree does when something it needs went away), so a crash of it starts a
crash loop that the runtime's own restarts would hide."""

import pytest
from django.test import Client

from instances import reconciler, services
from instances.models import Instance
from instances.runtime.base import Health
from manager.accounts.services import create_token
from tests import backends
from tests.job_helpers import record_jobs, run_recorded
from tests.waits import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

# Serves on its first start; exits with a message on every later one: a key it sets in its
# own Redis tells (a file would not do: the swarm starts a new container, with a new /tmp).
ONCE = """
import http.server, os, socket, sys, urllib.parse
url = urllib.parse.urlparse(os.environ["REDIS_URL"])
if url.scheme == "unix":
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(url.path)
else:
    conn = socket.create_connection((url.hostname, url.port or 6379), timeout=10)
def command(*args):
    conn.sendall(("*%d\\r\\n" % len(args) + "".join("$%d\\r\\n%s\\r\\n" % (len(a), a) for a in args)).encode())
    return conn.recv(1024)
if url.password:
    command("AUTH", urllib.parse.unquote(url.password))
if command("SETNX", "lab-test-started-once", "1").startswith(b":0"):
    print("settings.py: cannot start twice, the once-only resource is gone", flush=True)
    sys.exit(3)
conn.close()
http.server.HTTPServer(("", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


queued = {}


@pytest.fixture(autouse=True)
def world(runtime, settings, monkeypatch):
    settings.LAB_RUNTIME = runtime.name
    record_jobs(monkeypatch, queued)
    # The live release is this app (the releases' own tests deploy real oTree).
    monkeypatch.setattr(reconciler, "current_app", lambda instance: {
        **backends.fake_app(runtime, instance.name), "command": ["python", "-c", ONCE, "8000"]})
    yield
    queued.clear()
    for name in runtime.owned_instances():
        runtime.remove(name)


def test_a_crash_looping_app_is_failed_with_its_last_words(runtime, boss, ann):
    instance = services.create_instance(boss, name="health-loop", owner=ann)
    [job] = run_recorded(queued, "instance.create")
    assert job.status == "succeeded", job.message
    instance.refresh_from_db()
    assert (instance.status, instance.status_reason) == ("running", "")  # it answers HTTP

    backends.kill_app(runtime, "health-loop")  # from now on it exits at every start
    # The kill, then at least one start that exited by itself: the loop is on.
    wait_until(lambda: runtime.state("health-loop").app.restarts >= 2, 30, message="the app exiting at a restart")
    reconciler.reconcile(instance.pk)  # the minute sweep's pass
    instance.refresh_from_db()
    assert instance.status == "failed", instance.status_reason
    assert instance.status_reason.startswith("the oTree app exited and is being started again ("), \
        instance.status_reason
    assert "restarted" in instance.status_reason  # (with the exit code while it waits to start again)
    assert "; its last output: " in instance.status_reason
    assert instance.status_reason.endswith(" settings.py: cannot start twice, the once-only resource is gone")
    assert instance.status_reason.count("cannot start twice") == 1  # said at every start, shown once
    _, raw = create_token(ann, name="status", throttled=False)
    shown = Client(HTTP_AUTHORIZATION=f"Bearer {raw}").get("/api/v1/instances/health-loop").json()
    assert (shown["status"], shown["status_reason"]) == ("failed", instance.status_reason)
    # The runtime still starts it again and again; no pass calls that running.
    assert runtime.state("health-loop").app.health in (Health.RUNNING, Health.STARTING)
    services.restart(ann, instance)
    [job] = run_recorded(queued, "instance.restart")
    instance.refresh_from_db()
    assert instance.status == "failed" and "cannot start twice" in instance.status_reason
    assert job.status == "failed" and job.message.endswith(instance.status_reason)  # the user's toast says why
    assert Instance.objects.get(pk=instance.pk).applied_settings  # what it last ran well with is kept
