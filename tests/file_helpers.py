"""Reading files the manager's own SQLite database may be among.

Never open the test database's file in the test process with a plain file descriptor
(`Path.read_bytes()`, `open()`): closing ANY descriptor of a file drops every POSIX lock
the process holds on it, including those of Django's open SQLite connection
(https://www.sqlite.org/howtocorrupt.html, section 2.2). The next process that opens the
database (a daphne or worker a later test starts) then takes itself for the only user,
rebuilds the WAL index under the test process's feet, and the file ends up "malformed" —
which took every later database test of the suite down once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def sha256(path: Path) -> str:
    """The file's SHA-256, read by another process (`sha256sum`); "unreadable: …" when it
    cannot be read."""
    result = subprocess.run(["sha256sum", "--", str(path)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return f"unreadable: {result.stderr.strip()}"
    return result.stdout.split()[0]
