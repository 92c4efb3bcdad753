"""The database of the running test: as a `DATABASE_URL` for a child process (a Celery
worker, a labserver, a management command) that must see the same rows, and where it lies
on disk for tests that aim at "the manager's database". SQLite by default, PostgreSQL when
the suite runs on it (`LAB_TEST_DB=postgres`, see plugin_env.py)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from django.db import connection


def database_url() -> str:
    conf = connection.settings_dict
    engine = conf["ENGINE"]
    if engine.endswith("sqlite3"):
        return f"sqlite:///{conf['NAME']}"
    if engine.endswith("postgresql"):
        user = quote(conf.get("USER") or "", safe="")
        password = quote(conf.get("PASSWORD") or "", safe="")
        credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = conf.get("HOST") or ""
        if host.startswith("/"):  # a socket folder: in the query, as libpq takes it
            return f"postgres://{credentials}/{quote(conf['NAME'], safe='')}?host={quote(host, safe='')}"
        port = f":{conf['PORT']}" if conf.get("PORT") else ""
        return f"postgres://{credentials}{host}{port}/{quote(conf['NAME'], safe='')}"
    raise AssertionError(f"no URL for a database of engine {engine}")


def database_path() -> Path:
    """Where the manager's database lies on disk: SQLite's file, or PostgreSQL's data
    directory (its server's, owned by the server's user)."""
    if connection.vendor == "sqlite":
        return Path(connection.settings_dict["NAME"])
    with connection.cursor() as cursor:
        cursor.execute("SHOW data_directory")
        return Path(cursor.fetchone()[0])


def users_file() -> Path:
    """A file that holds the users' rows (their password hashes): SQLite's database file; on
    PostgreSQL the file of the table accounts_user, after a CHECKPOINT (so the rows written
    so far are in it; the file changes whenever its server writes)."""
    if connection.vendor == "sqlite":
        return database_path()
    with connection.cursor() as cursor:
        cursor.execute("CHECKPOINT")
        cursor.execute("SELECT pg_relation_filepath('accounts_user')")
        return database_path() / cursor.fetchone()[0]
