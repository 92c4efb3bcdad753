"""A settings change is applied as a deploy is, on every runtime, with a real oTree 6 app.

The walkthrough that found it: an experimenter set the config var SENTRY_DSN (accepted),
oTree exited at once ("add sentry_sdk to your requirements.txt"), the app crash-looped and
its URL answered 502. Now the app with the new settings starts beside the running one and
takes over only once it answers; should it not come up, the previous settings are back in
the database, the running app was never touched, and the user reads why (the app's last
output) in the job, the status and the audit log. SENTRY_DSN itself is refused before
anything is stored while the live release does not install sentry-sdk.

The project's settings.py reads a config var as experimenters' projects do
(`int(environ.get("LAB_SEATS", "3"))`), so a value it cannot read stops oTree at start."""

import json
import shutil

import pytest
from django.conf import settings
from django.test import Client

from instances import reconciler, releases
from instances.git.repos import repo_path
from instances.models import Instance
from manager.accounts import services as accounts
from manager.accounts.models import User
from manager.audit.models import AuditEvent
from manager.jobs.models import Job
from tests import backends, otree_projects
from tests.docker_helpers import http_get
from tests.job_helpers import record_jobs, run_recorded
from tests.waits import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]
NAME = "settings-apply"
SENTRY_REFUSAL = ("SENTRY_DSN needs the sentry-sdk package, which the live release #1 does not install (oTree "
                  "would not start): add sentry-sdk to requirements.txt and push it first.")


def project() -> dict[str, str]:
    files = otree_projects.valid_project("v1")
    files["settings.py"] += 'SEATS = int(environ.get("LAB_SEATS", "3"))  # a config var the project reads\n'
    return files


queued = {}


@pytest.fixture(autouse=True)
def clean_engine(runtime, settings, monkeypatch):
    settings.LAB_RUNTIME = runtime.name
    record_jobs(monkeypatch, queued)
    venvs_before = set(runtime.venvs_root.glob("*")) if runtime.name == "process" else set()
    yield
    queued.clear()
    for name in runtime.owned_instances():
        runtime.remove(name)
    if runtime.name in ("docker", "swarm"):
        for image in runtime.api.images(filters={"label": [f"org.otree-lab.manager={runtime.manager_id}"]}):
            runtime.api.remove_image(image["Id"], force=True)
    else:  # a later test's first build of the same project must install, not reuse this one
        for venv in set(runtime.venvs_root.glob("*")) - venvs_before:
            shutil.rmtree(venv, ignore_errors=True)


def answers(runtime) -> int:
    url = runtime.state(NAME).app_url
    return http_get(url + "/", timeout=5)[0] if url else 0


def only_the_live_app(runtime) -> list[str]:
    """What of the instance runs: its app, database and Redis (no candidate left)."""
    if runtime.name == "docker":
        return sorted(c["Names"][0].rsplit("-", 1)[1] for c in runtime.api.containers(all=True, filters={"label": [
            f"org.otree-lab.manager={runtime.manager_id}", f"org.otree-lab.instance={NAME}"]}))
    if runtime.name == "swarm":
        return backends.swarm_components(runtime, NAME)
    return sorted(runtime._state(NAME)["processes"])


def test_new_settings_the_app_cannot_start_with_are_undone_and_the_app_keeps_serving(runtime, tmp_path):
    boss = User.objects.create_user("boss", "boss@lab.test", "pw-boss-123456", is_superuser=True, is_staff=True)
    ann = User.objects.create_user("ann", "ann@lab.test", "pw-ann-1234567", name="Ann Experimenter")
    instance = Instance.objects.create(name=NAME, owner=ann, public_port=None, runtime=settings.LAB_RUNTIME)
    shutil.rmtree(repo_path(NAME), ignore_errors=True)
    checkout = otree_projects.Checkout(tmp_path / "work", otree_projects.init_bare(repo_path(NAME)))
    release = releases.record_push(instance, commit=checkout.push(project(), "first version"), pushed_by=ann)
    run_recorded(queued, "instance.deploy")
    release.refresh_from_db()
    assert release.status == "live", (release.status_reason, release.log[-3000:])
    assert wait_until(lambda: answers(runtime) in (200, 302), 60, 0.5, "oTree answering")
    _, raw = accounts.create_token(ann, name="walkthrough", throttled=False)
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")

    def patch(body):
        return api.patch(f"/api/v1/instances/{NAME}", json.dumps(body), content_type="application/json")

    # 1. A value the app can start with is applied: a new app with it serves.
    before = backends.app_identity(runtime, NAME)
    assert patch({"env": {"LAB_SEATS": "4"}}).status_code == 200
    [job] = run_recorded(queued, "instance.apply")
    assert job.status == "succeeded", job.message
    assert backends.app_env(runtime, NAME)["LAB_SEATS"] == "4"
    assert backends.app_identity(runtime, NAME) != before
    assert answers(runtime) in (200, 302) and only_the_live_app(runtime) == ["app", "db", "redis"]
    serving = backends.app_identity(runtime, NAME)

    # 2. A value it cannot start with: accepted (only the app can tell), then undone.
    assert patch({"env": {"LAB_SEATS": "three", "LAB_NOTE": "kept?"}}).status_code == 200
    [job] = run_recorded(queued, "instance.apply")
    assert job.status == "failed"
    label, _, reason = job.message.partition(": ")  # the job's label, then the reason
    assert label == f"Apply new settings to {NAME}"
    assert reason.startswith("The new settings were not applied: the app exited with code 1 while starting"), reason
    assert "invalid literal for int() with base 10: 'three'" in reason  # the app's own last words
    assert reason.endswith("The previous settings are back and the app runs with them.")
    instance.refresh_from_db()
    assert instance.config_vars == {"LAB_SEATS": "4"}  # the previous settings, in the database too
    assert instance.status == "running" and instance.status_reason == reason
    shown = api.get(f"/api/v1/instances/{NAME}").json()
    assert shown["env"] == {"LAB_SEATS": "4"} and shown["status"] == "running"
    assert "invalid literal for int()" in shown["status_reason"]
    # The app that served before was never touched, and nothing of the attempt is left.
    assert backends.app_identity(runtime, NAME) == serving
    assert backends.app_env(runtime, NAME)["LAB_SEATS"] == "4" and "LAB_NOTE" not in backends.app_env(runtime, NAME)
    assert answers(runtime) in (200, 302) and only_the_live_app(runtime) == ["app", "db", "redis"]
    [event] = AuditEvent.objects.filter(action="instance.settings_restored")
    assert event.actor is None and "config vars" in event.summary and "three" not in str(event.data)

    # The next pass (the minute sweep) does not try again: the app keeps running, and says so.
    reconciler.reconcile(instance.pk)
    instance.refresh_from_db()
    assert instance.status == "running" and instance.status_reason == ""
    assert backends.app_identity(runtime, NAME) == serving

    # 3. SENTRY_DSN without sentry-sdk in the live release: refused before anything is stored,
    # with the same words on the page and in the API.
    response = patch({"env": {"LAB_SEATS": "4", "SENTRY_DSN": "https://key@sentry.example/1"}})
    assert response.status_code == 422 and response.json()["detail"] == f"env: {SENTRY_REFUSAL}"
    page = Client()
    page.force_login(ann)
    response = page.post(f"/instances/{NAME}/settings/", {"auth_level": "STUDY", "production": "on",
                                                         "env": "LAB_SEATS=4\nSENTRY_DSN=https://key@sentry.example/1"})
    assert response.status_code == 422 and SENTRY_REFUSAL in response.content.decode().replace("&#x27;", "'")
    instance.refresh_from_db()
    assert instance.config_vars == {"LAB_SEATS": "4"} and not Job.objects.filter(status="queued").exists()
    assert backends.app_identity(runtime, NAME) == serving
