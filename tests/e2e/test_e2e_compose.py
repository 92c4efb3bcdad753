"""The production install as a lab manager runs it: `docker-compose.yml` brought up on this
machine's engine (the manager image built from the checkout, its own PostgreSQL and Redis,
real Caddy with its internal CA), an instance created through the API, an oTree project
pushed over HTTPS with that CA trusted by the git client, the manager's services
restarted while the instance keeps serving, then everything taken down: nothing left
behind, the volumes only when asked.

One project with its own name, env file and ports; Debian's docker-compose 1.29 (what CI
installs) drives it, exactly as the README says."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request

import docker
import pytest

from tests.conftest import need
from tests.docker_helpers import remove_images
from tests.labserver_helpers import BASE_DIR, free_port
from tests.otree_projects import Checkout, valid_project
from tests.waits import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.docker]

COMPOSE_FILE = BASE_DIR / "docker-compose.yml"
MANAGER_SERVICES = ("web", "worker", "bots", "beat", "git", "caddy")
INSTANCE = "compose-study"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def fetch(url, *, context=None, data=None, headers=None, method=None, timeout=30):
    """(status, headers, body) of one request; redirects are answers, not followed."""
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


class Project:
    """One compose project of the checkout's docker-compose.yml, its settings in its own
    env file (LAB_ENV_FILE + --env-file, as the README says for a second project)."""

    def __init__(self, tmp_path):
        self.name = f"otle2e{secrets.token_hex(3)}"
        self.https_port, self.http_port, self.web_port = free_port(), free_port(), free_port()
        self.ssh_port, self.public_port = free_port(), free_port()
        self.env_file = tmp_path / "lab.env"
        self.env_file.write_text("\n".join([
            "LAB_PUBLIC_HOST=localhost",
            "LAB_INSTANCE_HOST=127.0.0.1",
            "LAB_TLS=internal",
            f"LAB_HTTPS_PORT={self.https_port}",
            f"LAB_HTTP_PORT={self.http_port}",
            "LAB_HOST=127.0.0.1",
            f"LAB_PORT={self.web_port}",
            f"LAB_SSH_PORT={self.ssh_port}",
            "LAB_SSH_BIND=127.0.0.1",
            f"LAB_INSTANCE_PORTS={self.public_port}-{self.public_port}",
            "LAB_HSTS_SECONDS=600",
            "",
        ]))
        self.base = f"https://localhost:{self.https_port}"

    def run(self, *args, timeout=600, check=True, stdin=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LAB_", "COMPOSE_", "DOCKER_"))}
        env["LAB_ENV_FILE"] = str(self.env_file)
        result = subprocess.run(
            ["docker-compose", "--project-directory", str(BASE_DIR), "-f", str(COMPOSE_FILE),
             "--env-file", str(self.env_file), "-p", self.name, *args],
            cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=timeout, input=stdin)
        if check:
            assert result.returncode == 0, f"docker-compose {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    def manage(self, *args, timeout=120):
        return self.run("exec", "-T", "worker", "python", "manage.py", *args, timeout=timeout).stdout

    def labelled(self, kind: str) -> list[str]:
        out = subprocess.run(["docker", kind, "ls", *(["-a"] if kind == "container" else []), "-q",
                              "--filter", f"label=com.docker.compose.project={self.name}"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return out.split()

    def container_of(self, service: str) -> dict:
        cid = self.run("ps", "-q", service).stdout.strip()
        return json.loads(subprocess.run(["docker", "inspect", cid], capture_output=True, text=True,
                                         timeout=60, check=True).stdout)[0]


def instance_containers(manager_id: str) -> dict[str, str]:
    """name -> "id started-at" of the instance containers this manager made."""
    out = subprocess.run(["docker", "ps", "-a", "--filter", f"label=org.otree-lab.manager={manager_id}",
                          "--format", "{{.Names}}"], capture_output=True, text=True, timeout=60, check=True).stdout
    found = {}
    for name in out.split():
        info = json.loads(subprocess.run(["docker", "inspect", name], capture_output=True, text=True,
                                         timeout=60, check=True).stdout)[0]
        found[name] = f"{info['Id']} {info['State']['StartedAt']} {info['State']['Status']}"
    return found


def test_compose_install_https_push_restart_and_down(tmp_path):
    need(shutil.which("docker-compose") is not None, "docker-compose (apt install docker-compose)")
    need(subprocess.run(["docker", "image", "inspect", "otree-lab/debian-base:bookworm"],
                        capture_output=True, timeout=60).returncode == 0,
         "the base image otree-lab/debian-base:bookworm (make images)")
    project = Project(tmp_path)
    manager_id = None
    try:
        # Up: the image is built from the checkout; migrate runs before the rest.
        project.run("up", "-d", "--build", timeout=1200)
        untrusted = ssl.create_default_context()
        untrusted.check_hostname, untrusted.verify_mode = False, ssl.CERT_NONE
        def ca_page():  # Caddy answers 502 until the web service does
            status, headers, body = fetch(f"{project.base}/tls/root.crt", context=untrusted)
            assert status == 200, (status, body[:200])
            return body
        root_pem = wait_until(ca_page, 240, 1, "the manager's CA page over HTTPS", ignore=(OSError, AssertionError))
        assert root_pem.startswith(b"-----BEGIN CERTIFICATE-----"), root_pem[:200]
        root = tmp_path / "root.crt"
        root.write_bytes(root_pem)
        trusted = ssl.create_default_context(cafile=str(root))
        # The page shows the fingerprint a lab computer compares.
        digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(root_pem.decode())).hexdigest().upper()
        status, _h, page = fetch(f"{project.base}/tls/", context=trusted)
        assert status == 200 and ":".join(re.findall("..", digest)) in page.decode()

        # The login page over HTTPS with HSTS; plain HTTP goes to HTTPS.
        status, headers, page = fetch(f"{project.base}/accounts/login/", context=trusted)
        assert status == 200 and b"csrfmiddlewaretoken" in page
        assert headers["Strict-Transport-Security"].startswith("max-age=600")
        status, headers, _ = fetch(f"http://localhost:{project.http_port}/accounts/login/")
        assert status in (301, 308) and headers["Location"] == f"{project.base}/accounts/login/"

        # The first start printed the lab manager's one-time password in migrate's log.
        logs = project.run("logs", "--no-color", "migrate").stdout
        found = re.search(r"Username:\s+(\S+)\s.*?Password:\s+(\S+)", logs, re.S)
        assert found, logs[-2000:]
        username = found.group(1)
        # Every service is running and healthy (db and redis included).
        def healthy():
            for service in ("db", "redis", *MANAGER_SERVICES):
                state = project.container_of(service)["State"]
                assert state["Status"] == "running" and state.get("Health", {}).get("Status") == "healthy", \
                    (service, state)
            return True
        wait_until(healthy, 240, 2, "every service healthy", ignore=(AssertionError,))
        manager_id = project.run("exec", "-T", "worker", "cat", "/var/lib/otree-lab/manager-id").stdout.strip()
        assert re.fullmatch(r"[a-z0-9]{1,16}", manager_id), manager_id

        # An instance through the API (a token from the command line, as the README says).
        token = project.manage("create_token", username, "--name", "e2e").strip()
        auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        status, _h, body = fetch(f"{project.base}/api/v1/instances", context=trusted, headers=auth,
                                 data=json.dumps({"name": INSTANCE, "owner": username}).encode())
        assert status == 201, body

        def instance(expected):
            status, _h, body = fetch(f"{project.base}/api/v1/instances/{INSTANCE}", context=trusted, headers=auth)
            assert status == 200, body
            current = json.loads(body)
            assert current["status"] in expected, current
            return current

        made = wait_until(lambda: instance({"ready_for_code", "failed"}), 180, 1, "the instance set up",
                          ignore=(AssertionError,))
        assert made["status"] == "ready_for_code", made
        url = f"https://127.0.0.1:{project.public_port}/"
        assert made["url"] == url and made["git"]["https_url"] == f"{project.base}/git/{INSTANCE}.git"

        # git push over HTTPS: refused without the lab's CA, deployed with it.
        checkout = Checkout(tmp_path / "work")
        checkout.commit(valid_project("v1"), "first")
        remote = f"https://{username}:{token}@localhost:{project.https_port}/git/{INSTANCE}.git"
        env = {"GIT_TERMINAL_PROMPT": "0", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
        refused = subprocess.run(["git", "push", remote, "HEAD:main"], cwd=checkout.dir, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "certificate" in refused.stderr.lower(), refused.stderr
        pushed = subprocess.run(["git", "push", remote, "HEAD:main"], cwd=checkout.dir,
                                env={**env, "GIT_SSL_CAINFO": str(root)}, capture_output=True, text=True, timeout=900)
        out = pushed.stdout + pushed.stderr
        assert pushed.returncode == 0 and f"Deployed: {url}" in out, out[-3000:]
        assert token not in out

        def serving():
            status, _h, body = fetch(f"{url}room/lab/?participant_label=seat01", context=trusted)
            assert status < 500, (status, body[:300])
            return status
        wait_until(serving, 60, 1, "the instance serving over HTTPS", ignore=(AssertionError, OSError))
        live = instance({"running"})
        assert live["release"]["status"] == "live"
        before = instance_containers(manager_id)
        assert len(before) >= 3 and all(v.endswith(" running") for v in before.values()), before

        # The manager's services restart (as after an upgrade or a reboot of the manager):
        # the instance's containers are untouched, its route comes back by itself.
        project.run("restart", *MANAGER_SERVICES, timeout=600)
        wait_until(lambda: fetch(f"{project.base}/accounts/login/", context=trusted)[0] == 200, 240, 1,
                   "the login page after the restart", ignore=(OSError, AssertionError))
        wait_until(serving, 120, 1, "the instance serving after the restart", ignore=(AssertionError, OSError))
        status, _h, body = fetch(f"{url}room/lab/?participant_label=seat02", context=trusted)
        assert status < 500 and b"no app running" not in body, body[:300]
        assert instance_containers(manager_id) == before
        assert instance({"running"})["release"]["commit"] == live["release"]["commit"]

        # Down without -v keeps the state; the instance is deleted through the manager first
        # (its containers are not part of the compose project).
        status, _h, body = fetch(f"{project.base}/api/v1/instances/{INSTANCE}", context=trusted, headers=auth,
                                 method="DELETE")
        assert status in (202, 204), body
        wait_until(lambda: not instance_containers(manager_id), 180, 1, "the instance's containers removed")
        project.manage("firewall", "--remove")
        project.run("down", timeout=300)
        assert not project.labelled("container") and not project.labelled("network")
        kept = project.labelled("volume")
        assert len(kept) == 5, kept  # data, pg-data, pg-socket, redis-data, redis-socket
        project.run("down", "-v", timeout=300)
        assert not project.labelled("volume")
        leftovers = subprocess.run(["docker", "ps", "-a", "-q", "--filter", f"label=org.otree-lab.manager={manager_id}"],
                                   capture_output=True, text=True, timeout=60).stdout
        assert not leftovers.strip()
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=60).stdout
        assert f"LAB-{manager_id}-" not in rules
    finally:
        if manager_id:
            for name in instance_containers(manager_id):
                subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True, timeout=60)
        project.run("down", "-v", "--remove-orphans", timeout=300, check=False)
        if manager_id:
            from instances import netguard
            try:
                netguard.remove(manager_id)
            except netguard.NetguardError:
                pass
            remove_images(docker.APIClient(), manager_id)
