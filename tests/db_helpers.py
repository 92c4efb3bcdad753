"""The database of the running test, as a `DATABASE_URL` for a child process (a Celery
worker, a labserver, a management command) that must see the same rows: SQLite by default,
PostgreSQL when the suite runs on it (`LAB_TEST_DB=postgres`, see plugin_env.py)."""

from __future__ import annotations

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
