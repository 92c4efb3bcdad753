"""A throw-away PostgreSQL cluster for tests: Debian's initdb/postgres (found as the process
runtime finds them), run as `nobody` when the tests run as root (PostgreSQL refuses root),
on 127.0.0.1 and a free port, with a password of its own. Used by plugin_env.py (the
manager's test database when `LAB_TEST_DB=postgres`) and by test_postgres_manager.py.

Only the standard library and psycopg at import: plugin_env.py loads this before Django.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

NOBODY = 65534

# Stops the cluster when the process that started it ends without stopping it (killed,
# or its atexit never ran): it waits for end of file on its stdin (the pipe's other end
# is open in the starter only), then stops that postgres (fast shutdown, then SIGKILL)
# and removes the cluster's folder. "done" on stdin means the starter stopped it itself.
_WATCHDOG = r"""
import os, shutil, signal, sys, time
pid, folder = int(sys.argv[1]), sys.argv[2]
if sys.stdin.buffer.read() == b"done":
    sys.exit(0)
def ours():
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return folder.encode() in f.read()
    except OSError:
        return False
for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
    if not ours():
        break
    os.kill(pid, sig)
    deadline = time.monotonic() + wait
    while ours() and time.monotonic() < deadline:
        time.sleep(0.2)
shutil.rmtree(folder, ignore_errors=True)
"""


def find_pg_bin() -> Path | None:
    from instances.runtime.process import find_pg_bin as search  # only the standard library's and lazy settings

    return search()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: then as nobody."""
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if os.geteuid() == 0 else []


class Cluster:
    """One running cluster: `url(dbname)` for a database on it, `create_database()`,
    `stop()` (idempotent; fast shutdown, at most ~40 s, then the folder is removed)."""

    user = "lab"

    def __init__(self, pg_bin: Path, start_timeout: float = 60):
        import psycopg

        self.folder = Path(tempfile.mkdtemp(prefix="labtest-pg-", dir="/tmp"))
        self.password = secrets.token_urlsafe(24)
        self.port = _free_port()
        self.server: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None
        try:
            if os.geteuid() == 0:
                os.chown(self.folder, NOBODY, NOBODY)
            pwfile = self.folder / "pwfile"
            pwfile.write_text(self.password + "\n")
            if os.geteuid() == 0:
                os.chown(pwfile, NOBODY, NOBODY)
            made = subprocess.run([*_as_postgres_user(), str(pg_bin / "initdb"), "-D", str(self.folder / "data"),
                                   "-U", self.user, f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
                                   "--no-sync"], capture_output=True, text=True, timeout=120)
            pwfile.unlink()
            if made.returncode != 0:
                raise RuntimeError(f"initdb failed ({made.returncode}): {made.stdout}{made.stderr}")
            self.server = subprocess.Popen(
                [*_as_postgres_user(), str(pg_bin / "postgres"), "-D", str(self.folder / "data"),
                 "-k", str(self.folder), "-c", "listen_addresses=127.0.0.1", "-p", str(self.port),
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=200"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # a Ctrl-C to the tests is not a shutdown under their feet
            self._watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(self.server.pid), str(self.folder)],
                                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                              start_new_session=True)
            deadline = time.monotonic() + start_timeout
            while True:
                if self.server.poll() is not None:
                    raise RuntimeError(f"postgres exited with {self.server.returncode} before it answered")
                try:
                    with psycopg.connect(self.url("postgres"), connect_timeout=2) as conn:
                        conn.execute("SELECT 1")
                    break
                except psycopg.OperationalError as exc:
                    if time.monotonic() >= deadline:
                        raise RuntimeError(f"PostgreSQL did not answer within {start_timeout} s: {exc}") from None
                    time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def url(self, dbname: str) -> str:
        return f"postgres://{self.user}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def create_database(self, dbname: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))

    def stop(self) -> None:
        if self._watchdog is not None:
            try:
                self._watchdog.communicate(b"done", timeout=10)  # it leaves the cluster to us
            except (subprocess.TimeoutExpired, OSError):
                self._watchdog.kill()
            self._watchdog = None
        if self.server is not None and self.server.poll() is None:
            for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):  # SIGINT: fast shutdown
                self.server.send_signal(sig)
                try:
                    self.server.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.folder, ignore_errors=True)
