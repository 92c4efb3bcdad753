"""Loaded with `-p tests.plugin_env` before Django: gives the test run its own data dir
(and thereby its own SQLite files, secrets and embedded Redis socket)."""

import os
import tempfile

os.environ["LAB_DATA_DIR"] = tempfile.mkdtemp(prefix="labtest-")
os.environ.pop("REDIS_URL", None)
os.environ.pop("DATABASE_URL", None)
os.environ.pop("LAB_SMTP_HOST", None)
os.environ.setdefault("LAB_LOGIN_RATE_LIMIT", "10/m/ip,5/5m/key")
