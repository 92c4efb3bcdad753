"""`manage.py labservice NAME`: each service of the compose install runs exactly the
command line labserver's supervisor gives that child (one definition for both)."""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.labserver_helpers import BASE_DIR, child_env, free_port, migrate, new_data_dir, remove_data_dir
from tests.waits import wait_until

SPECS = (
    "import django, json, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); django.setup()\n"
    "from manager.management.commands.labservice import service_specs\n"
    "print(json.dumps({n: s.argv for n, s in service_specs().items()}))\n"
)


@pytest.fixture
def lab():
    data_dir, port = new_data_dir(), free_port()
    # REDIS_URL set, as in the compose install (no embedded Redis child): a socket nobody serves.
    env = child_env(data_dir, port, REDIS_URL=f"unix://{data_dir}/no-redis.sock")
    yield data_dir, port, env
    remove_data_dir(data_dir)


def supervisor_argv(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", SPECS], cwd=BASE_DIR, env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return json.loads(out)


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [part.decode() for part in fh.read().split(b"\0")[:-1]]
    except FileNotFoundError:
        return []


def test_a_service_is_the_supervisors_command_line_in_this_process(lab):
    data_dir, port, env = lab
    migrate(data_dir, port)
    specs = supervisor_argv(env)
    assert "redis" not in specs and specs["web"][:3] == [sys.executable, "-m", "daphne"]
    proc = subprocess.Popen([sys.executable, "manage.py", "labservice", "web"], cwd=BASE_DIR, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # exec'd: the very process that was started becomes the supervisor's web child
        wait_until(lambda: cmdline(proc.pid) == specs["web"], timeout=60, message="labservice web exec'd daphne")

        def healthy():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/", timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(healthy, timeout=60, message="the web service answers /healthz/")
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) is not None


def test_an_unknown_service_is_refused_with_the_names(lab):
    data_dir, port, env = lab
    result = subprocess.run([sys.executable, "manage.py", "labservice", "webb"], cwd=BASE_DIR, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "unknown service 'webb'" in result.stderr
    assert "web, worker, bots, beat, sshd, caddy" in result.stderr


def test_caddy_is_exec_d_and_loads_the_routes_once_it_answers(lab):
    """The caddy service is Caddy itself (no Python beside it), and the instances' routes
    are back as soon as it answers: an instance's port serves Caddy's page for it."""
    data_dir, port, env = lab
    migrate(data_dir, port)
    instance_port = free_port()
    subprocess.run([sys.executable, "-c",
                    "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); "
                    "django.setup(); from manager.accounts.models import User; from instances.models import Instance; "
                    "ann = User.objects.create_user(username='ann', email='ann@lab.test', password='x' * 20, name='A'); "
                    f"Instance.objects.create(name='story', owner=ann, public_port={instance_port}, "
                    "status='ready_for_code')"], cwd=BASE_DIR, env=env, check=True, timeout=120)
    proc = subprocess.Popen([sys.executable, "manage.py", "labservice", "caddy"], cwd=BASE_DIR, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: cmdline(proc.pid)[1:2] == ["run"] and cmdline(proc.pid)[0].endswith("caddy"),
                   timeout=60, message=lambda: f"labservice caddy exec'd Caddy: {cmdline(proc.pid)}")

        def instance_page():
            try:
                with urllib.request.urlopen(f"http://localhost:{instance_port}/", timeout=5) as response:
                    return response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.read().decode()
            except OSError:
                return ""

        page = wait_until(instance_page, timeout=60, message="the instance's port answers through Caddy")
        assert "no app running yet" in page
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) is not None
