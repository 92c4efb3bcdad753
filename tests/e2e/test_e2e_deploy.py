"""The whole product as an experimenter uses it: a real `labserver` (web, worker, beat,
embedded Redis, git SSH server, Caddy), an instance made through the JSON API, a real
oTree 6 project pushed with the git client over HTTPS, built in Docker and served on the
instance's public port through Caddy; a broken push fails with its reason while the
previous release keeps serving."""

import contextlib
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.conftest import need
from tests.docker_helpers import engine_ok, images_present
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
def docker_labserver():
    """A labserver whose instances get one public port: yields (server, its extra
    environment, that port); afterwards removes everything the run made on Docker."""
    data_dir, port, public_port = new_data_dir(), free_port(), free_port()
    extra = {"LAB_INSTANCE_PORTS": f"{public_port}-{public_port}", "LAB_SSH_PORT": str(free_port())}
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


def test_push_build_serve_and_a_broken_push_keeps_the_old_release(tmp_path):
    need(engine_ok() and images_present("postgres:15", "redis:7", "python:3.11-slim"),
         "a Docker engine with the images (python manage.py build_images)")
    with docker_labserver() as (server, extra, public_port):
        port = server.port
        token, body = instance_ready_for_code(server, extra, "e2e-study")
        assert body["url"] == f"http://localhost:{public_port}/"

        remote = f"http://admin:{token}@127.0.0.1:{port}/git/e2e-study.git"
        checkout = Checkout(tmp_path / "work")
        code, out = git_push(checkout, valid_project("v1"), "first version", remote)
        assert code == 0, out
        assert f"Deployed: http://localhost:{public_port}/" in out
        assert token not in out  # secrets never reach the push output

        status, page = http_status(f"http://localhost:{public_port}/")
        assert status is not None and status < 500, page  # oTree answers through Caddy
        status, body = api(server, token, "GET", "/api/v1/instances/e2e-study")
        assert body["status"] == "running" and body["release"]["status"] == "live"
        rooms = {r["name"]: r for r in body["rooms"]}
        assert rooms["lab"]["participant_labels"] == ["seat01", "seat02", "seat03"]

        code, out = git_push(checkout, broken("syntax"), "oops", remote)
        # The commit is stored (git reports success) but the deploy failed, and the output says why.
        assert "Deploy failed: settings.py has a syntax error on line" in out, out
        status, page = http_status(f"http://localhost:{public_port}/")
        assert status is not None and status < 500, page  # the first release keeps serving
        status, releases = api(server, token, "GET", "/api/v1/instances/e2e-study/releases")
        assert [r["status"] for r in releases][:2] == ["failed", "live"]
