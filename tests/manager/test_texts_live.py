"""Issue 12, point 5: whatever the input, an instance that was running keeps running.

A real oTree 6 project runs on the process runtime (its own PostgreSQL, Redis and app
processes). Hostile settings arrive through the JSON API — values its app could not start
with (a lone surrogate or a NUL in a config var or the admin password, loader and Python
start-up variables, an environment too large, limits out of range): each is refused with
422 and its specific message, nothing is stored or queued, the app is never restarted and
keeps answering. A valid change afterwards is applied and the app answers with it."""

import shutil
import time

import pytest
from django.conf import settings
from django.test import Client

from instances import reconciler, releases
from instances.git.repos import repo_path
from instances.models import Instance
from manager.accounts import services as accounts
from manager.accounts.models import User
from manager.jobs.models import Job
from tests.job_helpers import record_jobs, run_recorded
from tests import backends, otree_projects
from tests.docker_helpers import http_get

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]
NAME = "keeps-running"

HOSTILE = [
    # (method, path, body, message in the 422's detail)
    ("PATCH", "", {"env": {"S": "a\ud800b"}}, "The value of S contains an invalid character (a lone surrogate, U+D800)."),
    ("PATCH", "", {"env": {"S": "a\x00b"}}, "The value of S contains a NUL character."),
    ("PATCH", "", {"env": {"PYTHONHOME": "/nowhere"}}, "PYTHONHOME changes how Python starts"),
    ("PATCH", "", {"env": {"PYTHONIOENCODING": "no-such-codec"}}, "PYTHONIOENCODING changes how Python starts"),
    ("PATCH", "", {"env": {"LD_PRELOAD": "/nowhere.so"}}, "LD_PRELOAD changes how programs are loaded"),
    ("PATCH", "", {"env": {"LD_AUDIT": "/nowhere.so"}}, "LD_AUDIT changes how programs are loaded"),
    ("PATCH", "", {"env": {"X\n": "1"}}, "'X\\n' is not a valid variable name"),
    ("PATCH", "", {"env": {f"BIG{i}": "x" * 4096 for i in range(17)}}, "The config vars are too large together"),
    ("PATCH", "", {"memory_mb": True}, "memory_mb"),
    ("PATCH", "", {"cpus": 0.099}, "CPUs must be between 0.1 and 16 (this is 0.099)."),
    ("POST", "/admin-password", {"password": "admin-pass\x00word"},
     "The oTree admin password contains a NUL character."),
    ("POST", "/admin-password", {"password": "admin-pass\udc00word"},
     "The oTree admin password contains an invalid character (a lone surrogate, U+DC00)."),
    ("POST", "/admin-password", {"password": "admin-pass\nword"}, "The oTree admin password contains a line break"),
]


queued = {}


@pytest.fixture
def runtime(settings, monkeypatch):
    backends.require("process")
    settings.LAB_RUNTIME = "process"
    record_jobs(monkeypatch, queued)  # run_jobs runs them as the worker would
    rt = backends.make("process")
    venvs_before = set(rt.venvs_root.glob("*"))
    yield rt
    queued.clear()
    for name in rt.owned_instances():
        rt.remove(name)
    # The environment this test built goes too: a later test's first build of the same
    # project (test_releases) must install, not reuse it.
    for venv in set(rt.venvs_root.glob("*")) - venvs_before:
        shutil.rmtree(venv, ignore_errors=True)


def run_jobs(kind):
    return run_recorded(queued, kind)


def answers(runtime) -> int:
    url = runtime.state(NAME).app_url
    return http_get(url + "/", timeout=5)[0] if url else 0


def wait_answering(runtime, timeout=60) -> int:
    deadline = time.monotonic() + timeout
    while (code := answers(runtime)) not in (200, 302) and time.monotonic() < deadline:
        time.sleep(0.5)
    return code


def snapshot(instance: Instance) -> tuple:
    instance.refresh_from_db()
    return (instance.config_vars, instance.admin_password, instance.auth_level, instance.production,
            instance.memory_mb, instance.cpus, instance.generation)


def test_hostile_settings_never_stop_a_running_instance(runtime, tmp_path):
    boss = User.objects.create_user("boss", "boss@lab.test", "pw-boss-123456", is_superuser=True, is_staff=True)
    ann = User.objects.create_user("ann", "ann@lab.test", "pw-ann-1234567", name="Ann Experimenter")
    instance = Instance.objects.create(name=NAME, owner=ann, public_port=None, runtime=settings.LAB_RUNTIME)
    shutil.rmtree(repo_path(NAME), ignore_errors=True)
    checkout = otree_projects.Checkout(tmp_path / "work", otree_projects.init_bare(repo_path(NAME)))
    commit = checkout.push(otree_projects.valid_project("v1"), "first version")
    release = releases.record_push(instance, commit=commit, branch="main", pushed_by=ann)
    run_jobs("instance.deploy")
    release.refresh_from_db()
    assert release.status == "live", (release.status_reason, release.log[-3000:])
    assert wait_answering(runtime) in (200, 302)  # oTree 6: its login page
    app = backends.app_identity(runtime, NAME)
    before = snapshot(instance)

    _, raw = accounts.create_token(boss, name="hostile", throttled=False)
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    for method, path, body, message in HOSTILE:
        response = api.generic(method, f"/api/v1/instances/{NAME}{path}", data=_json(body),
                               content_type="application/json")
        assert response.status_code == 422, (body, response.content)
        assert message in response.json()["detail"], (body, response.json())
        assert snapshot(instance) == before, body
    assert not Job.objects.filter(kind="instance.apply").exists()  # nothing to apply: nothing was stored

    # The reconciler finds nothing to change; the app was never restarted and answers.
    reconciler.reconcile(instance.pk)
    assert backends.app_identity(runtime, NAME) == app
    assert answers(runtime) in (200, 302)
    assert "S" not in backends.app_env(runtime, NAME)

    # A valid change is applied: the app restarts with it and answers.
    response = api.patch(f"/api/v1/instances/{NAME}", {"env": {"LAB_NOTE": "a note ✓", "MALLOC_ARENA_MAX": "2"}},
                         content_type="application/json")
    assert response.status_code == 200, response.content
    [job] = run_jobs("instance.apply")
    assert job.status == "succeeded", job.message
    assert wait_answering(runtime) in (200, 302)
    env = backends.app_env(runtime, NAME)
    assert env["LAB_NOTE"] == "a note ✓" and env["MALLOC_ARENA_MAX"] == "2"


def _json(body) -> str:
    import json

    return json.dumps(body)  # ensure_ascii: a lone surrogate travels as the escape "\ud800", as a client sends it
