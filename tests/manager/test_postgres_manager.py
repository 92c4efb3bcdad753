"""The manager's own database on PostgreSQL (`DATABASE_URL`): a throw-away cluster
(Debian's initdb/postgres, run as `nobody` when the test runs as root), `manage.py migrate`,
a real `labserver` on it (its first lab manager), a token from `manage.py create_token`,
and an account made through the API — all of it found in PostgreSQL, no SQLite file made."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from instances.runtime.process import find_pg_bin
from tests.conftest import need
from tests.labserver_helpers import (BASE_DIR, LabServer, child_env, first_superuser, free_port, new_data_dir,
                                     remove_data_dir)
from tests.e2e.test_e2e_deploy import api
from tests.waits import wait_until

pytestmark = pytest.mark.slow


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: then as nobody."""
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []


@pytest.fixture
def postgres():
    pg_bin = find_pg_bin()
    need(pg_bin is not None, "PostgreSQL's server programs (initdb, postgres)")
    folder = Path(tempfile.mkdtemp(prefix="mpg-", dir="/tmp"))
    if os.geteuid() == 0:
        os.chown(folder, 65534, 65534)
    port = free_port()
    subprocess.run([*_as_postgres_user(), str(pg_bin / "initdb"), "-D", str(folder / "data"), "-U", "lab",
                    "--auth=trust", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    server = subprocess.Popen([*_as_postgres_user(), str(pg_bin / "postgres"), "-D", str(folder / "data"),
                               "-k", str(folder), "-c", "listen_addresses=127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"postgres://lab@127.0.0.1:{port}/postgres"

    def answers() -> bool:
        assert server.poll() is None, "postgres exited"
        with psycopg.connect(url, connect_timeout=2) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)

    try:
        wait_until(answers, timeout=30, interval=0.2, message="PostgreSQL answering", ignore=(psycopg.OperationalError,))
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


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
