"""The whole product as an experimenter uses it: a real `labserver` (web, worker, beat,
embedded Redis, git SSH server, Caddy), an instance made through the JSON API, a real
oTree 6 project pushed with the git client over HTTPS, built in Docker and served on the
instance's public port through Caddy; a broken push fails with its reason while the
previous release keeps serving.

A kiosk then enters a REAL oTree room of that deployed study: a lab computer in headless
Chromium opens its seat's lobby page, clicks "I am ready" and lands in oTree's room with
its participant label; when the experimenter starts a session in that room (oTree's REST
API), the same browser is taken into the experiment's first page.

Both walks share one labserver and one deployed study (`deployed`): the build is the
slow part, and the broken push leaves the first release serving either way."""

import contextlib
import json
import subprocess
import sys
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from tests.conftest import CHROMIUM, need
from tests.docker_helpers import engine_ok, images_present
from tests.e2e.test_e2e_notifications import TIMEOUT_MS, headless_chromium
from tests.labserver_helpers import (BASE_DIR, LabServer, child_env, free_port, migrate, new_data_dir,
                                     remove_data_dir, remove_instances)
from tests.otree_projects import Checkout, broken, valid_project
from tests.waits import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.docker]


def purge_images(data_dir):
    """Release images built by this run (labelled with its manager id)."""
    import hashlib

    import docker

    manager_id = hashlib.sha256(str(data_dir).encode()).hexdigest()[:10]
    client = docker.from_env(timeout=60)
    for image in client.images.list(filters={"label": f"org.otree-lab.manager={manager_id}"}):
        client.images.remove(image.id, force=True)


def api(server, token, method, path, body=None):
    request = urllib.request.Request(
        server.url + path, method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def http_status(url, timeout=10):
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return None, str(exc)


def git_push(checkout, files, message, remote, timeout=600):
    """Commit `files` and push to `remote`; return (exit code, everything git printed)."""
    checkout.commit(files, message)
    return checkout.push_to(remote, timeout)


@contextlib.contextmanager
def docker_labserver(runtime: str = "docker"):
    """A labserver whose instances get one public port and run on `runtime` (docker or
    swarm): yields (server, its extra environment, that port); afterwards removes
    everything the run made on Docker."""
    data_dir, port, public_port = new_data_dir(), free_port(), free_port()
    extra = {"LAB_INSTANCE_PORTS": f"{public_port}-{public_port}", "LAB_SSH_PORT": str(free_port()),
             "LAB_RUNTIME": runtime}
    migrate(data_dir, port)
    server = LabServer(data_dir, port, **extra)
    try:
        server.wait_ready(timeout=180)
        yield server, extra, public_port
    finally:
        server.terminate()
        server.kill_everything()
        remove_instances(data_dir, port, **extra)  # this run's containers, networks, volumes, images
        purge_images(data_dir)
        remove_data_dir(data_dir)


def instance_ready_for_code(server, extra, name):
    """A token of the first lab manager (`admin`) and a new instance of theirs made through
    the API, once it is ready for code: (token, the instance as the API shows it)."""
    token = subprocess.run([sys.executable, "manage.py", "create_token", "admin", "--name", "e2e"], cwd=BASE_DIR,
                           env=child_env(server.data_dir, server.port, **extra), capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    status, body = api(server, token, "POST", "/api/v1/instances", {"name": name, "owner": "admin"})
    assert status == 201, body
    def settled():  # ready for code (or failed) within seconds; "not yet" says where it is
        current = api(server, token, "GET", f"/api/v1/instances/{name}")[1]
        assert current["status"] in {"ready_for_code", "failed"}, current
        return current

    body = wait_until(settled, 60, 0.5, f"instance {name} set up", ignore=(AssertionError,))
    assert body["status"] == "ready_for_code", body
    return token, body


@pytest.fixture(scope="module", params=["docker", "swarm"])
def deployed(tmp_path_factory, request):
    """A labserver (Docker, or Docker Swarm: the same walk, the same pages, API and git
    remote) with the study `e2e-study` made through the API and its first push (the small
    oTree 6 project, room `lab` with seat01-03) deployed over HTTPS."""
    need(engine_ok() and images_present("postgres:15", "redis:7", "python:3.11-slim"),
         "a Docker engine with the images (python manage.py build_images)")
    if request.param == "swarm":
        from tests import backends

        backends.require("swarm")
    with docker_labserver(request.param) as (server, extra, public_port):
        token, made = instance_ready_for_code(server, extra, "e2e-study")
        remote = f"http://admin:{token}@127.0.0.1:{server.port}/git/e2e-study.git"
        checkout = Checkout(tmp_path_factory.mktemp("e2e-deploy") / "work")
        code, out = git_push(checkout, valid_project("v1"), "first version", remote)
        yield SimpleNamespace(server=server, extra=extra, public_port=public_port, token=token, made=made,
                              remote=remote, checkout=checkout, first_push=(code, out))


def test_push_build_serve_and_a_broken_push_keeps_the_old_release(deployed):
    server, token, public_port = deployed.server, deployed.token, deployed.public_port
    assert deployed.made["url"] == f"http://localhost:{public_port}/"
    code, out = deployed.first_push
    assert code == 0, out
    assert f"Deployed: http://localhost:{public_port}/" in out
    assert token not in out  # secrets never reach the push output

    status, page = http_status(f"http://localhost:{public_port}/")
    assert status is not None and status < 500, page  # oTree answers through Caddy
    status, body = api(server, token, "GET", "/api/v1/instances/e2e-study")
    assert body["status"] == "running" and body["release"]["status"] == "live"
    assert body["runtime"] == deployed.extra["LAB_RUNTIME"]
    assert (body["node"] is not None) == (body["runtime"] == "swarm")  # a swarm instance names its node
    rooms = {r["name"]: r for r in body["rooms"]}
    assert rooms["lab"]["participant_labels"] == ["seat01", "seat02", "seat03"]

    code, out = git_push(deployed.checkout, broken("syntax"), "oops", deployed.remote)
    # The commit is stored (git reports success) but the deploy failed, and the output says why.
    assert "Deploy failed: settings.py has a syntax error on line" in out, out
    status, page = http_status(f"http://localhost:{public_port}/")
    assert status is not None and status < 500, page  # the first release keeps serving
    status, releases = api(server, token, "GET", "/api/v1/instances/e2e-study/releases")
    assert [r["status"] for r in releases][:2] == ["failed", "live"]


def rest_key(server, extra, name):
    code = ("import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); django.setup()\n"
            f"from instances.models import Instance; print(Instance.objects.get(name={name!r}).rest_key)")
    return subprocess.run([sys.executable, "-c", code], cwd=BASE_DIR,
                          env=child_env(server.data_dir, server.port, **extra), capture_output=True, text=True,
                          timeout=60, check=True).stdout.strip()


@pytest.mark.browser
def test_a_kiosk_enters_a_real_otree_room_and_its_session(deployed):
    need(CHROMIUM.exists(), f"chromium ({CHROMIUM})")
    from playwright.sync_api import expect

    server, token, public_port = deployed.server, deployed.token, deployed.public_port
    code, out = deployed.first_push
    assert code == 0 and f"Deployed: http://localhost:{public_port}/" in out, out
    status, body = api(server, token, "GET", "/api/v1/instances/e2e-study")
    assert [r["lobby_url"] for r in body["rooms"] if r["name"] == "lab"] == [f"{server.url}/lobby/e2e-study/"]

    with headless_chromium() as browser:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{server.url}/lobby/e2e-study/lab/seat02/")
        expect(page.locator("#ready-button")).to_have_text("I am ready")
        page.click("#ready-button")
        # The lobby sends it to <url>room/lab/?participant_label=seat02&welcome_page_ok=1; oTree 6
        # redirects that to its own spelling, without the slash, and (welcome_page_ok: the lobby
        # was the welcome page) shows its waiting page at once, not its own "Start" page.
        page.wait_for_url(f"http://localhost:{public_port}/room/lab?participant_label=seat02&welcome_page_ok=1")
        expect(page.locator("body")).not_to_contain_text("Participant label:")
        expect(page.locator("body")).to_contain_text("wait", ignore_case=True)

        # The experimenter starts a session in the room; oTree takes the waiting kiosk in.
        request = urllib.request.Request(
            f"http://localhost:{public_port}/api/sessions", method="POST",
            data=json.dumps({"session_config_name": "hello_game", "num_participants": 2,
                             "room_name": "lab"}).encode(),
            headers={"otree-rest-key": rest_key(server, deployed.extra, "e2e-study"),
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status in (200, 201)
        expect(page.locator("body")).to_contain_text("version v1", timeout=60_000)
        assert f"localhost:{public_port}/p/" in page.url  # a participant page of the session
