"""The manager's own database on PostgreSQL (`DATABASE_URL`): a throw-away cluster of its
own (tests/pg_helpers.py), `manage.py migrate`, a real `labserver` on it (its first lab
manager), a token from `manage.py create_token`, and an account made through the API —
all of it found in PostgreSQL, no SQLite file made."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

from tests import pg_helpers
from tests.conftest import need
from tests.labserver_helpers import (BASE_DIR, LabServer, child_env, first_superuser, free_port, new_data_dir,
                                     remove_data_dir)
from tests.e2e.test_e2e_deploy import api

pytestmark = pytest.mark.slow


@pytest.fixture
def postgres():
    pg_bin = pg_helpers.find_pg_bin()
    need(pg_bin is not None, "PostgreSQL's server programs (initdb, postgres)")
    cluster = pg_helpers.Cluster(pg_bin)
    try:
        yield cluster.url("postgres")
    finally:
        cluster.stop()


def test_the_manager_runs_on_postgresql(postgres):
    data_dir, port = new_data_dir(), free_port()
    env = child_env(data_dir, port, DATABASE_URL=postgres)
    server = None
    try:
        migrated = subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=BASE_DIR, env=env,
                                  capture_output=True, text=True, timeout=300)
        assert migrated.returncode == 0, migrated.stderr
        server = LabServer(data_dir, port, DATABASE_URL=postgres)
        username, _password = first_superuser(server)
        server.wait_ready()
        made = subprocess.run([sys.executable, "manage.py", "create_token", username, "--name", "pg"], cwd=BASE_DIR,
                              env=env, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        status, body = api(server, token, "POST", "/api/v1/users",
                           {"username": "ann", "email": "ann@lab.test", "name": "Ann A", "is_superuser": False})
        assert status == 201, body
        status, users = api(server, token, "GET", "/api/v1/users")
        assert status == 200 and {u["username"] for u in users} >= {username, "ann"}, users
        with psycopg.connect(postgres) as conn:  # it is all in PostgreSQL
            rows = conn.execute("SELECT username FROM accounts_user ORDER BY username").fetchall()
            assert rows == sorted([(username,), ("ann",)])
            assert conn.execute("SELECT count(*) FROM django_migrations").fetchone()[0] > 10
        assert not list(data_dir.glob("*.sqlite3"))
        assert server.terminate() == 0
    finally:
        if server is not None:
            server.kill_everything()
        remove_data_dir(data_dir)
