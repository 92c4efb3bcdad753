"""A kiosk enters a REAL oTree room: the real labserver, an instance made through the API,
the small oTree 6 project (room `lab`, labels seat01-03) pushed over HTTPS and built in
Docker, served through Caddy on the instance's public port. A lab computer in headless
Chromium opens its seat's lobby page, clicks "I am ready" and lands in oTree's room with
its participant label; when the experimenter starts a session in that room (oTree's REST
API), the same browser is taken into the experiment's first page."""

import json
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import CHROMIUM, need
from tests.docker_helpers import engine_ok, images_present
from tests.labserver_helpers import BASE_DIR, child_env
from tests.otree_projects import Checkout, valid_project
from tests.e2e.test_e2e_deploy import api, docker_labserver, git_push, instance_ready_for_code
from tests.e2e.test_e2e_notifications import TIMEOUT_MS, headless_chromium

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.browser]


def rest_key(server, extra, name):
    code = ("import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); django.setup()\n"
            f"from instances.models import Instance; print(Instance.objects.get(name={name!r}).rest_key)")
    return subprocess.run([sys.executable, "-c", code], cwd=BASE_DIR, env=child_env(server.data_dir, server.port, **extra),
                          capture_output=True, text=True, timeout=60, check=True).stdout.strip()


def test_a_kiosk_enters_a_real_otree_room_and_its_session(tmp_path):
    need(CHROMIUM.exists(), f"chromium ({CHROMIUM})")
    need(engine_ok() and images_present("postgres:15", "redis:7", "python:3.11-slim"),
         "a Docker engine with the images (python manage.py build_images)")
    from playwright.sync_api import expect

    with docker_labserver() as (server, extra, public_port):
        port = server.port
        token, _ = instance_ready_for_code(server, extra, "lobby-otree")
        code, out = git_push(Checkout(tmp_path / "work"), valid_project("v1"), "lobby study",
                             f"http://admin:{token}@127.0.0.1:{port}/git/lobby-otree.git")
        assert code == 0 and f"Deployed: http://localhost:{public_port}/" in out, out
        status, body = api(server, token, "GET", "/api/v1/instances/lobby-otree")
        assert [r["lobby_url"] for r in body["rooms"] if r["name"] == "lab"] == [f"{server.url}/lobby/lobby-otree/"]

        with headless_chromium() as browser:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{server.url}/lobby/lobby-otree/lab/seat02/")
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
                headers={"otree-rest-key": rest_key(server, extra, "lobby-otree"),
                         "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.status in (200, 201)
            expect(page.locator("body")).to_contain_text("version v1", timeout=60_000)
            assert f"localhost:{public_port}/p/" in page.url  # a participant page of the session
