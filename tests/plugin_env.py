"""Loaded with `-p tests.plugin_env` before Django: gives the test run its own data dir
(and thereby its own SQLite files, secrets and embedded Redis socket).

`LAB_TEST_DB` picks the manager's database: unset or `sqlite` (SQLite in that data dir),
or `postgres`: a throw-away PostgreSQL cluster (tests/pg_helpers.py) started here and
given to Django as `DATABASE_URL`; pytest-django makes the test database on it, and the
cluster is stopped and removed when the run ends."""

import atexit
import os
import tempfile

os.environ["LAB_DATA_DIR"] = tempfile.mkdtemp(prefix="labtest-")
os.environ.pop("REDIS_URL", None)
os.environ.pop("DATABASE_URL", None)
os.environ.pop("LAB_SMTP_HOST", None)
os.environ.setdefault("LAB_LOGIN_RATE_LIMIT", "10/m/ip,5/5m/key")

TEST_DBS = ("sqlite", "postgres")
_test_db = os.environ.get("LAB_TEST_DB", "").strip().lower() or "sqlite"
if _test_db not in TEST_DBS:
    raise SystemExit(f"LAB_TEST_DB={os.environ['LAB_TEST_DB']!r} is not a test database: "
                     f"leave it unset or use one of {', '.join(TEST_DBS)}")

if _test_db == "postgres":
    from tests import pg_helpers

    _pg_bin = pg_helpers.find_pg_bin()
    if _pg_bin is None:
        raise SystemExit("LAB_TEST_DB=postgres needs PostgreSQL's server programs (initdb, postgres, pg_dump, psql; "
                         "on Debian: apt install postgresql)")
    _cluster = pg_helpers.Cluster(_pg_bin)
    atexit.register(_cluster.stop)
    _cluster.create_database("lab_manager")  # pytest-django makes test_lab_manager beside it
    os.environ["DATABASE_URL"] = _cluster.url("lab_manager")
