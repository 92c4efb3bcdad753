"""Instances as a lab manager and an experimenter see them: pages, rules and the JSON API.
(The runtime itself — real Docker — is tested in test_runtime_docker.py and
test_reconciler.py.)"""

import pytest
from django.core.exceptions import ValidationError
from django.test import Client

from instances import services
from instances.models import Instance
from manager.accounts.models import User
from manager.accounts.services import Conflict, NotAllowed, create_token, delete_user
from manager.jobs.models import Job

pytestmark = pytest.mark.django_db


def login(user):
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("name, message", [
    ("a", "2 to 40 characters"),
    ("x" * 41, "2 to 40 characters"),
    ("Study", "lowercase"),
    ("my_study", "lowercase letters, digits and single hyphens"),
    ("-study", "start with a letter"),
    ("study-", "end with a letter"),
    ("2study", "start with a letter"),
    ("my--study", "single hyphens"),
    ("api", "reserved"),
    ("", "required"),
])
def test_bad_names_are_refused_with_the_reason(boss, ann, name, message):
    with pytest.raises(ValidationError) as exc:
        services.create_instance(boss, name=name, owner=ann)
    assert message in " ".join(exc.value.message_dict["name"])
    assert not Instance.objects.exists() and not Job.objects.exists()


def test_subdomain_routing_refuses_the_name_that_is_the_managers_address(boss, ann, settings):
    settings.LAB_ROUTING, settings.LAB_DOMAIN, settings.LAB_PUBLIC_HOST = "subdomain", "example.edu", "econ.example.edu"
    with pytest.raises(ValidationError) as exc:
        services.create_instance(boss, name="econ", owner=ann)
    assert "econ.example.edu is the manager's own address" in " ".join(exc.value.message_dict["name"])
    assert services.create_instance(boss, name="econ-2", owner=ann).url == "https://econ-2.example.edu/"


def test_taken_name_is_a_conflict(boss, ann, django_capture_on_commit_callbacks):
    services.create_instance(boss, name="public-goods", owner=ann)
    with pytest.raises(Conflict):
        services.create_instance(boss, name="public-goods", owner=ann)
    assert Instance.objects.count() == 1


def test_new_instance_has_production_settings_and_strong_secrets(boss, ann):
    instance = services.create_instance(boss, name="trust-game", owner=ann)
    instance.refresh_from_db()
    env = instance.otree_env()
    assert env["OTREE_PRODUCTION"] == "1" and env["OTREE_AUTH_LEVEL"] == "STUDY"
    assert len(env["OTREE_ADMIN_PASSWORD"]) >= 16 and len(env["OTREE_REST_KEY"]) >= 16
    assert "DATABASE_URL" not in env  # the runtime adds where its database is
    assert instance.runtime in ("docker", "process")  # recorded at creation: it never changes backend
    assert instance.status == "provisioning" and instance.public_port == 18000
    job = Job.objects.get(kind="instance.create")
    assert job.label == "Create instance trust-game"


def test_secrets_are_encrypted_at_rest(boss, ann):
    from django.db import connection

    instance = services.create_instance(boss, name="enc", owner=ann)
    services.update_settings(boss, instance, env={"API_KEY": "very-secret-value"})
    with connection.cursor() as cursor:
        cursor.execute("SELECT admin_password, rest_key, db_password, config_vars FROM instances_instance")
        row = cursor.fetchone()
    instance.refresh_from_db()
    assert instance.admin_password not in row[0] and instance.db_password not in row[2]
    assert "very-secret-value" not in row[3] and "API_KEY" not in row[3]
    assert instance.config_vars == {"API_KEY": "very-secret-value"}


@pytest.mark.parametrize("env, message", [
    ({"OTREE_ADMIN_PASSWORD": "x"}, "set by the manager"),
    ({"DATABASE_URL": "x"}, "set by the manager"),
    ({"1BAD": "x"}, "not a valid variable name"),
    ({"BAD-NAME": "x"}, "not a valid variable name"),
    ({"BIG": "x" * 5000}, "too long"),
])
def test_bad_config_vars_are_refused(boss, ann, env, message):
    instance = services.create_instance(boss, name="cfg", owner=ann)
    with pytest.raises(ValidationError) as exc:
        services.update_settings(ann, instance, env=env)
    assert message in str(exc.value)
    instance.refresh_from_db()
    assert instance.config_vars == {}


def test_settings_change_bumps_the_generation_and_never_touches_the_db_password(boss, ann):
    instance = services.create_instance(boss, name="gen", owner=ann)
    instance.refresh_from_db()
    before = (instance.generation, instance.db_password)
    services.update_settings(ann, instance, auth_level="DEMO", production=False)
    password = services.set_admin_password(ann, instance)
    instance.refresh_from_db()
    assert instance.generation == before[0] + 2 and instance.db_password == before[1]
    assert instance.admin_password == password and instance.auth_level == "DEMO" and not instance.production
    assert Job.objects.filter(kind="instance.apply").count() == 2


def test_only_lab_managers_change_limits(boss, ann):
    instance = services.create_instance(boss, name="lim", owner=ann)
    with pytest.raises(NotAllowed):
        services.update_settings(ann, instance, memory_mb=4096)
    with pytest.raises(ValidationError):
        services.update_settings(boss, instance, memory_mb=64)
    services.update_settings(boss, instance, memory_mb=1024, cpus="1.5")
    instance.refresh_from_db()
    assert instance.memory_mb == 1024 and float(instance.cpus) == 1.5


def test_short_admin_password_is_refused(boss, ann):
    instance = services.create_instance(boss, name="pw", owner=ann)
    with pytest.raises(ValidationError):
        services.set_admin_password(ann, instance, "short")


def test_owner_with_instances_cannot_be_deleted(boss, ann):
    services.create_instance(boss, name="keeps-ann", owner=ann)
    with pytest.raises(NotAllowed, match="keeps-ann"):
        delete_user(boss, ann)
    assert User.objects.filter(pk=ann.pk).exists()


def test_pages(boss, ann):
    manager = login(boss)
    response = manager.post("/instances/new/", {"name": "ultimatum", "owner": ann.pk})
    assert response.status_code == 302 and response["Location"] == "/instances/ultimatum/"
    page = login(ann).get("/instances/ultimatum/").content.decode()
    for text in ("ultimatum", "provisioning", "ssh://git@", "/git/ultimatum.git", "git push lab main",
                 "Reset database", "Set admin password", "Auth level"):
        assert text in page, text
    assert "Transfer ownership" not in page  # lab managers only
    assert Instance.objects.get(name="ultimatum").admin_password not in page  # hidden until revealed
    revealed = login(ann).post("/instances/ultimatum/admin-password/reveal/").content.decode()
    assert Instance.objects.get(name="ultimatum").admin_password in revealed
    dashboard = login(ann).get("/").content.decode()
    assert "ultimatum" in dashboard


def test_transfer_gives_the_instance_to_the_new_owner_and_takes_it_from_the_old(boss, ann, bob):
    services.create_instance(boss, name="handed", owner=ann)
    _, ann_token = create_token(ann, name="t")
    _, bob_token = create_token(bob, name="t")

    def sees(user, token) -> tuple[int, int, bool, bool]:
        """The instance page, the API's instance, and whether the dashboard and API list name it."""
        web, api = login(user), Client(HTTP_AUTHORIZATION=f"Bearer {token}")
        listed = [i["name"] for i in api.get("/api/v1/instances").json()]
        return (web.get("/instances/handed/").status_code, api.get("/api/v1/instances/handed").status_code,
                "handed" in web.get("/").content.decode(), "handed" in listed)

    assert sees(ann, ann_token) == (200, 200, True, True) and sees(bob, bob_token) == (404, 404, False, False)
    response = login(boss).post("/instances/handed/transfer/", {"owner": bob.pk})
    assert response.status_code == 302
    assert Instance.objects.get(name="handed").owner == bob
    assert sees(bob, bob_token) == (200, 200, True, True)  # the new owner has it ...
    assert sees(ann, ann_token) == (404, 404, False, False)  # ... and the old one no longer


@pytest.mark.parametrize("runtime, says", [
    ("docker", ["Docker containers", "PostgreSQL (its own container)"]),
    ("process", ["Plain processes on this machine", "a user of its own", "RLIMIT_AS"]),
])
def test_the_page_names_the_runtime_and_its_isolation(boss, ann, settings, runtime, says):
    settings.LAB_RUNTIME = runtime
    login(boss).post("/instances/new/", {"name": "trust", "owner": ann.pk})
    assert Instance.objects.get(name="trust").runtime == runtime
    page = login(ann).get("/instances/trust/").content.decode()
    for text in says:
        assert text in page, text


def test_bad_name_on_the_page_shows_the_reason(boss, ann):
    response = login(boss).post("/instances/new/", {"name": "Bad Name", "owner": ann.pk})
    assert response.status_code == 200
    assert "lowercase" in response.content.decode()
    assert not Instance.objects.exists()


def test_config_vars_form(boss, ann):
    services.create_instance(boss, name="vars", owner=ann)
    client = login(ann)
    response = client.post("/instances/vars/settings/", {"auth_level": "STUDY", "production": "on",
                                                         "env": "COLOR=blue\nno equals sign"})
    assert response.status_code == 422 and "Line 2 has no" in response.content.decode()
    response = client.post("/instances/vars/settings/", {"auth_level": "STUDY", "production": "on",
                                                         "env": "COLOR=blue\n# comment\nSIZE= 3"})
    assert response.status_code == 302
    assert Instance.objects.get(name="vars").config_vars == {"COLOR": "blue", "SIZE": "3"}


def test_api_contract_shape(boss, ann):
    _, raw = create_token(boss, name="t")
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    response = api.post("/api/v1/instances", {"name": "api-made", "owner": "ann"}, content_type="application/json")
    assert response.status_code == 201
    body = api.get("/api/v1/instances/api-made").json()
    assert set(body) >= {"name", "owner", "status", "url", "git", "otree", "release", "rooms"}
    assert body["owner"] == "ann" and body["status"] == "provisioning" and body["release"] is None
    assert body["git"]["ssh_url"].endswith("/api-made.git") and body["otree"]["auth_level"] == "STUDY"
    assert api.post("/api/v1/instances", {"name": "api-made", "owner": "ann"},
                    content_type="application/json").status_code == 409
    bad = api.post("/api/v1/instances", {"name": "Bad!", "owner": "ann"}, content_type="application/json")
    assert bad.status_code == 422 and "name" in bad.json()["detail"]
    nobody = api.post("/api/v1/instances", {"name": "okname", "owner": "nobody"}, content_type="application/json")
    assert nobody.status_code == 422 and "nobody" in nobody.json()["detail"]
    _, ann_raw = create_token(ann, name="t")
    ann_api = Client(HTTP_AUTHORIZATION=f"Bearer {ann_raw}")
    assert ann_api.patch("/api/v1/instances/api-made", {"memory_mb": 2048},
                         content_type="application/json").status_code == 403
    response = ann_api.post("/api/v1/instances/api-made/admin-password", {"password": "my-own-password"},
                            content_type="application/json")
    assert response.json() == {"admin_username": "admin", "password": "my-own-password"}
