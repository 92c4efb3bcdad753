"""Settings refused before anything is stored because the live release's app could not
start with them (instances.services.check_packages_for), read from the release's commit in
the instance's real git repository. The app side (a change the app cannot start with is
undone) is tests/instances/test_settings_apply.py."""

import json
import shutil

import pytest
from django.test import Client

from instances.git.repos import repo_path
from instances.models import Instance, Release
from manager.accounts.services import create_token
from manager.jobs.models import Job
from tests import otree_projects

pytestmark = pytest.mark.django_db
DSN = "https://key@sentry.example/1"


@pytest.fixture
def study(ann, tmp_path):
    # (a job row is written; in this test's transaction nothing is ever enqueued)
    instance = Instance.objects.create(name="sentry-study", owner=ann, public_port=18790)
    shutil.rmtree(repo_path(instance.name), ignore_errors=True)
    checkout = otree_projects.Checkout(tmp_path / "work", otree_projects.init_bare(repo_path(instance.name)))
    yield instance, checkout
    shutil.rmtree(repo_path(instance.name), ignore_errors=True)


def live(instance, checkout, requirements: str, number: int) -> None:
    files = {**otree_projects.valid_project(), "requirements.txt": requirements}
    Release.objects.filter(instance=instance).update(status="superseded")
    Release.objects.create(instance=instance, number=number, commit=checkout.push(files, f"#{number}"),
                           status="live")


def patch(user, env):
    _, raw = create_token(user, name=f"t{Job.objects.count()}-{len(env)}", throttled=False)
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}").patch(
        "/api/v1/instances/sentry-study", json.dumps({"env": env}), content_type="application/json")


def test_sentry_dsn_needs_sentry_sdk_in_the_live_release(study, ann):
    instance, checkout = study
    live(instance, checkout, "otree==6.0.15\npsycopg2-binary\n", 1)
    refused = patch(ann, {"SENTRY_DSN": DSN})
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "env: SENTRY_DSN needs the sentry-sdk package, which the live release #1 does not install (oTree would "
        "not start): add sentry-sdk to requirements.txt and push it first.")
    instance.refresh_from_db()
    assert instance.config_vars == {} and not Job.objects.exists()
    assert patch(ann, {"SENTRY_DSN": ""}).status_code == 200  # empty: oTree does not start Sentry

    # Once a release installs it (any spelling pip accepts), the variable is taken.
    live(instance, checkout, "otree==6.0.15\nSentry_SDK[asyncio] >= 1.40  # errors to Sentry\n", 2)
    assert patch(ann, {"SENTRY_DSN": DSN}).status_code == 200
    instance.refresh_from_db()
    assert instance.config_vars == {"SENTRY_DSN": DSN}
    # A value already set stays settable beside other changes, whatever a later release lacks.
    live(instance, checkout, "otree==6.0.15\n", 3)
    assert patch(ann, {"SENTRY_DSN": DSN, "LAB_ROOM": "econ"}).status_code == 200
    assert patch(ann, {"SENTRY_DSN": DSN + "2"}).status_code == 422


def test_before_the_first_deploy_sentry_dsn_is_taken(study, ann):
    instance, _ = study  # no release yet: the first deploy's health check says what oTree says
    assert patch(ann, {"SENTRY_DSN": DSN}).status_code == 200
