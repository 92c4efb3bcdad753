"""docker-compose.yml as `docker-compose` (Debian's 1.29, what CI installs) reads it: valid
with the example settings, a clear message when the required host name is missing, and
every manager service runs one of labserver's children (`manage.py labservice NAME`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import need
from tests.labserver_helpers import BASE_DIR

EXAMPLE = BASE_DIR / "deploy" / "lab.env.example"
MANAGER_SERVICES = {"migrate", "web", "worker", "bots", "beat", "git", "caddy"}


def compose(env_file, *args, **env):
    need(shutil.which("docker-compose") is not None, "docker-compose (apt install docker-compose)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LAB_", "COMPOSE_"))}
    clean.update(LAB_ENV_FILE=str(env_file), **env)
    return subprocess.run(["docker-compose", "--project-directory", str(BASE_DIR), "-f",
                           str(BASE_DIR / "docker-compose.yml"), "--env-file", str(env_file), *args],
                          cwd=BASE_DIR, env=clean, capture_output=True, text=True, timeout=120)


def test_the_compose_file_is_valid_with_the_example_settings():
    result = compose(EXAMPLE, "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == MANAGER_SERVICES | {"db", "redis"}
    from manager.management.commands.labservice import service_specs

    children = set(service_specs())
    for name in MANAGER_SERVICES - {"migrate"}:
        service = services[name]
        assert service["command"][:3] == ["python", "manage.py", "labservice"]
        assert service["command"][3] in children, name
        assert service["network_mode"] == "host" and service["restart"] == "unless-stopped"
        assert service["environment"]["LAB_PUBLIC_HOST"] == "lab.example.edu"
        # A key without a value would hide the env file's value (docker-compose 1.29 unsets it).
        assert all(value is not None for value in service["environment"].values()), service["environment"]
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("db", "redis"):  # no network at all: reachable through their sockets only
        assert services[name]["network_mode"] == "none"
    # The Docker socket only where the engine is used; never into db or redis.
    with_socket = {n for n, s in services.items() if any("docker.sock" in v for v in s.get("volumes", []))}
    assert with_socket == {"web", "worker", "bots", "git", "caddy"}


def test_a_missing_host_name_stops_compose_with_what_to_do(tmp_path):
    env_file = tmp_path / "lab.env"
    env_file.write_text("".join(line + "\n" for line in EXAMPLE.read_text().splitlines()
                                if not line.startswith("LAB_PUBLIC_HOST=")))
    result = compose(env_file, "config", "-q")
    assert result.returncode != 0
    assert "set LAB_PUBLIC_HOST" in result.stderr and "deploy/lab.env.example" in result.stderr


def test_the_images_manager_id_is_made_once_and_used_without_the_entrypoint_too(tmp_path):
    """The manager image's entrypoint makes a random LAB_MANAGER_ID once into the data dir
    (the data dir's path is the same in every compose project); a command run with
    `docker compose exec` (no entrypoint) reads the same id from there."""
    env = {k: v for k, v in os.environ.items() if k != "LAB_MANAGER_ID"}
    env.update(LAB_DATA_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="manager.settings")
    show = ["python3", "-c", "import os; print(os.environ['LAB_MANAGER_ID'])"]
    ids = {subprocess.run([str(BASE_DIR / "deploy" / "docker-entrypoint.sh"), *show], env=env, capture_output=True,
                          text=True, timeout=30, check=True).stdout.strip() for _ in range(2)}
    assert len(ids) == 1 and len(ids.pop()) == 10
    stored = (tmp_path / "manager-id").read_text().strip()
    read = subprocess.run([sys.executable, "-c", "import django; django.setup(); from django.conf import settings; "
                           "print(settings.LAB_MANAGER_ID)"], cwd=BASE_DIR, env=env, capture_output=True, text=True,
                          timeout=60, check=True).stdout.strip()
    assert read == stored
