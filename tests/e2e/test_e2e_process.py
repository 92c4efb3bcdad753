"""A manager on a machine without Docker: a real `labserver` with `LAB_RUNTIME=auto` and no
engine answering picks the process runtime, and the whole workflow works the same: an
instance made through the API, real oTree 6 pushed over HTTPS and served through Caddy,
restart, admin password, reset with a backup, the lobby, an offline bot run; after the
manager is killed outright and started again, the instance is re-adopted (one supervisor,
served again through the proxy)."""

import json

import psutil
import pytest

from tests import backends
from tests.labserver_helpers import (LabServer, free_port, migrate, new_data_dir, remove_data_dir,
                                     remove_instances)
from tests.otree_projects import Checkout, valid_project
from tests.e2e.test_e2e_deploy import api, git_push, http_status, instance_ready_for_code
from tests.waits import wait_until

pytestmark = pytest.mark.slow


def supervisors(data_dir, name):
    folder = str(data_dir / "instances" / name)
    return [p for p in psutil.process_iter(["cmdline"])
            if "procsup.py" in " ".join(p.info["cmdline"] or []) and folder in " ".join(p.info["cmdline"] or [])]


def app_process(data_dir, name):
    """(pid, start ticks) of the instance's app as its supervisor recorded it; None while unknown."""
    try:
        app = json.loads((data_dir / "instances" / name / "state.json").read_text())["processes"]["app"]
        return (app["pid"], app["start_ticks"]) if app.get("pid") else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def test_without_docker_the_whole_workflow_runs_on_processes(tmp_path):
    backends.require("process")
    data_dir, port, public_port = new_data_dir(), free_port(), free_port()
    extra = {"LAB_INSTANCE_PORTS": f"{public_port}-{public_port}", "LAB_SSH_PORT": str(free_port()),
             "LAB_RUNTIME": "auto", "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    migrate(data_dir, port)
    server = LabServer(data_dir, port, **extra)
    try:
        server.wait_ready(timeout=180)
        token, body = instance_ready_for_code(server, extra, "nodock")
        assert body["runtime"] == "process"
        checkout = Checkout(tmp_path / "work")
        remote = f"http://admin:{token}@127.0.0.1:{port}/git/nodock.git"
        code, out = git_push(checkout, valid_project("v1"), "first", remote)
        assert code == 0 and f"Deployed: http://localhost:{public_port}/" in out, out
        assert "pip install -r requirements.txt" in out or "reusing the environment" in out
        status, page = http_status(f"http://localhost:{public_port}/")
        assert status is not None and status < 500, page  # oTree through Caddy
        code, out = git_push(checkout, valid_project("v2"), "second", remote)
        assert code == 0 and "reusing the environment" in out and "Deployed:" in out, out  # installs nothing

        # The instance page names the runtime and what it isolates.
        _status, detail = api(server, token, "GET", "/api/v1/instances/nodock")
        assert detail["status"] == "running" and detail["release"]["status"] == "live"
        assert {r["name"] for r in detail["rooms"]} == {"lab", "online"}

        # Restart, admin password, reset (a backup first).
        before = app_process(data_dir, "nodock")
        assert before is not None
        assert api(server, token, "POST", "/api/v1/instances/nodock/restart")[0] == 202
        wait_until(lambda: app_process(data_dir, "nodock") not in (None, before), 120, 0.5,
                   "the app started again (a new process) after the restart")
        status, answer = api(server, token, "POST", "/api/v1/instances/nodock/admin-password",
                             {"password": "a-new-admin-password"})
        assert status == 200 and answer["password"] == "a-new-admin-password"
        assert api(server, token, "POST", "/api/v1/instances/nodock/reset-database")[0] == 202
        # (Each wait below asserts what it waits for: "not yet" is a failed assertion, the
        # last one is in the message when the wait gives up.)
        def backup_done():
            backups = api(server, token, "GET", "/api/v1/instances/nodock/backups")[1]
            assert any(x["status"] == "done" for x in backups), backups
            return backups

        def otree_answers():
            status = http_status(f"http://localhost:{public_port}/")[0]
            assert status is not None and status < 500, status
            return True

        backups = wait_until(backup_done, 120, 0.5, "a backup before the reset", ignore=(AssertionError,))
        assert backups[0]["filename"].endswith(".dump")  # pg_dump of its own PostgreSQL
        wait_until(otree_answers, 120, 0.5, "oTree answers after the reset", ignore=(AssertionError,))

        # The lobby of its room, and an offline bot run in its session.
        status, page = http_status(f"http://127.0.0.1:{port}/lobby/nodock/")
        assert status == 200 and "seat01" in page
        status, run = api(server, token, "POST", "/api/v1/instances/nodock/bot-runs",
                          {"session_config": "hello_game", "num_participants": 2, "num_bots": 2, "model": "random"})
        assert status in (200, 201, 202), run
        run_url = f"/api/v1/instances/nodock/bot-runs/{run['id']}"

        def run_ended():
            current = api(server, token, "GET", run_url)[1]
            assert current["status"] in ("finished", "failed", "stopped"), current
            return current

        run = wait_until(run_ended, 180, 0.5, "the bot run ends", ignore=(AssertionError,))
        assert run["status"] == "finished", run

        # The manager dies outright (its instances do not) and starts again: re-adopted.
        first = supervisors(data_dir, "nodock")
        assert len(first) == 1
        server.remember_processes()
        for proc in server.known_alive():
            proc.kill()
        server.proc.kill()
        server.proc.wait(timeout=10)
        assert supervisors(data_dir, "nodock")[0].pid == first[0].pid  # the instance lives on
        server = LabServer(data_dir, port, **extra)
        server.wait_ready(timeout=180)
        wait_until(otree_answers, 120, 0.5, "served through the restarted proxy", ignore=(AssertionError,))
        assert [p.pid for p in supervisors(data_dir, "nodock")] == [first[0].pid]
    finally:
        server.terminate()
        server.kill_everything()
        remove_instances(data_dir, port, **extra)
        remove_data_dir(data_dir)
    assert supervisors(data_dir, "nodock") == []
