"""`python manage.py create_token USERNAME [--name NAME]`."""

import os
import subprocess
import sys
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from manager.accounts.models import AccessToken, User, hash_token
from manager.audit.models import AuditEvent
from tests.db_helpers import database_url

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice():
    return User.objects.create(username="alice", email="alice@lab.example")


def run(*args) -> str:
    out, err = StringIO(), StringIO()
    call_command("create_token", *args, stdout=out, stderr=err)
    assert err.getvalue() == ""
    return out.getvalue()


def test_prints_only_a_working_token(client, alice):
    output = run("alice")
    raw = output.strip()
    assert output == raw + "\n" and raw.startswith("olm_") and " " not in raw
    token = AccessToken.objects.get(user=alice)
    assert token.token_hash == hash_token(raw) and raw not in token.token_hash
    assert token.name.startswith("created on the command line ")
    response = client.get("/api/v1/me", headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 200
    assert response.json()["username"] == "alice"
    event = AuditEvent.objects.get(action="token.create")
    assert event.actor is None and event.actor_name == "system" and "alice" in event.summary
    assert raw not in str(event.data) and raw not in event.summary


def test_name_and_case_insensitive_username(alice):
    run("ALICE", "--name", "grading script")
    assert AccessToken.objects.get(user=alice).name == "grading script"


def test_each_run_makes_a_new_token(alice):
    assert run("alice") != run("alice")
    assert AccessToken.objects.filter(user=alice).count() == 2


def test_unknown_user():
    with pytest.raises(CommandError, match="no account with the username 'nobody'"):
        run("nobody")
    assert not AccessToken.objects.exists()


def test_deactivated_user(alice):
    alice.is_active = False
    alice.save()
    with pytest.raises(CommandError, match="deactivated"):
        run("alice")
    assert not AccessToken.objects.exists()


def test_overlong_name(alice):
    with pytest.raises(CommandError, match="At most 100 characters"):
        run("alice", "--name", "n" * 101)
    assert not AccessToken.objects.exists()


def _manage(*args):
    """The real command line, against the test database (committed: transactional test)."""
    env = {**os.environ, "DATABASE_URL": database_url()}
    return subprocess.run(
        [sys.executable, "manage.py", "create_token", *args],
        cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.django_db(transaction=True)
def test_command_line_stdout_and_exit_codes(client):
    User.objects.create(username="alice", email="alice@lab.example")
    ok = _manage("alice", "--name", "ci")
    assert ok.returncode == 0, ok.stderr
    raw = ok.stdout.strip()
    assert ok.stdout == raw + "\n" and raw.startswith("olm_")
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {raw}"}).json()["username"] == "alice"

    missing = _manage("nobody")
    assert missing.returncode != 0
    assert missing.stdout == ""
    assert "no account with the username 'nobody'" in missing.stderr
