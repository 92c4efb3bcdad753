"""The runtime interface: what the reconciler asks of a backend (docker now; process and
swarm later). No page, task or API knows which backend runs an instance.

Every method is idempotent and converges: calling `ensure` twice, or after a crash in
the middle of the first call, leaves exactly one of everything. Backends label (or
otherwise mark) every resource with the manager's id and the instance name, never touch
anything unmarked, and can list what they own so the sweep can remove orphans.
"""

from __future__ import annotations

import functools
import re
import socket
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

import requests

INSTANCE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,40}[a-z0-9])?")
SQL_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
CANDIDATE = "app-next"  # a deploy's new app while it is health-checked
RETIRED = "app-old"  # the replaced app, until the proxy points to the new one
COMPONENTS = ("db", "redis", "app")
# PostgreSQL tuned for one small oTree app (both backends).
POSTGRES_TUNING = {
    "shared_buffers": "16MB",
    "max_connections": "30",
    "work_mem": "2MB",
    "maintenance_work_mem": "16MB",
    "effective_cache_size": "64MB",
    "max_wal_size": "64MB",
    "min_wal_size": "32MB",
    "wal_buffers": "1MB",
    "autovacuum_max_workers": "1",
    "max_worker_processes": "2",
    "max_parallel_workers": "1",
    "max_parallel_workers_per_gather": "0",
    "huge_pages": "off",
}


PG_MAGIC = b"PGDMP"  # the start of a `pg_dump -Fc` archive
SQLITE_MAGIC = b"SQLite format 3\x00"  # the start of an SQLite database file


def backup_format(head: bytes) -> str:
    """".dump" (pg_dump's custom format) or ".sqlite3" for a file starting with `head`, "" for neither."""
    if head.startswith(PG_MAGIC):
        return ".dump"
    if head.startswith(SQLITE_MAGIC):
        return ".sqlite3"
    return ""


def restore_names(db: str, user: str) -> dict[str, str]:
    """The environment of PG_RESTORE_SCRIPT for database `db` of `user`: the scratch
    database the backup is restored into and the name the live one gets while it is
    replaced (all checked SQL identifiers)."""
    names = {"LAB_DB": db, "LAB_SCRATCH": f"{db[:50]}_restore", "LAB_OLD": f"{db[:50]}_replaced", "PGUSER": user}
    for value in names.values():
        if not SQL_IDENTIFIER.fullmatch(value or ""):
            raise RuntimeError_(f"{value!r} is not a lowercase SQL identifier")
    return names


# Restores a `pg_dump -Fc` archive ($1) so that a failure leaves the database as it was:
# into a scratch database first (a leftover of an earlier attempt dropped), and only when
# that succeeded the live database is closed to connections, its sessions ended, and the
# two swapped by renaming in one transaction; the old one is dropped last. `$2 = check`:
# only read the archive's table of contents. Run where PostgreSQL's tools are (the database's
# container, a job with its image, the instance's user); connection by PG* variables, names
# by restore_names() (validated identifiers). Exit codes: 3 not an archive, 4 scratch not
# made, 5 restore failed, 6 swap failed (the live database untouched).
PG_RESTORE_SCRIPT = r"""
file="$1"
if ! out=$(pg_restore -l -- "$file" 2>&1 >/dev/null); then
  echo "not a backup PostgreSQL can restore: $out" >&2; exit 3
fi
[ "${2:-}" = check ] && exit 0
q() { psql -X -q -v ON_ERROR_STOP=1 -d template1 "$@"; }
q -c "DROP DATABASE IF EXISTS \"$LAB_SCRATCH\" WITH (FORCE)" -c "DROP DATABASE IF EXISTS \"$LAB_OLD\" WITH (FORCE)" \
  -c "CREATE DATABASE \"$LAB_SCRATCH\" OWNER \"$PGUSER\"" || exit 4
if ! pg_restore --no-owner --no-privileges --exit-on-error --single-transaction -d "$LAB_SCRATCH" -- "$file"; then
  q -c "DROP DATABASE IF EXISTS \"$LAB_SCRATCH\" WITH (FORCE)"; exit 5
fi
if ! q -c "ALTER DATABASE \"$LAB_DB\" ALLOW_CONNECTIONS false" -c "DO \$\$ BEGIN
  FOR i IN 1..300 LOOP
    PERFORM pg_stat_clear_snapshot();
    PERFORM pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '$LAB_DB' AND pid <> pg_backend_pid();
    PERFORM pg_stat_clear_snapshot();
    EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = '$LAB_DB' AND pid <> pg_backend_pid());
    PERFORM pg_sleep(0.05);
  END LOOP;
END \$\$" -c "ALTER DATABASE \"$LAB_DB\" RENAME TO \"$LAB_OLD\"; ALTER DATABASE \"$LAB_SCRATCH\" RENAME TO \"$LAB_DB\";"; then
  q -c "ALTER DATABASE \"$LAB_DB\" ALLOW_CONNECTIONS true"
  q -c "DROP DATABASE IF EXISTS \"$LAB_SCRATCH\" WITH (FORCE)"
  exit 6
fi
q -c "DROP DATABASE IF EXISTS \"$LAB_OLD\" WITH (FORCE)" || echo "the replaced database $LAB_OLD is left (dropped by the next restore)" >&2
exit 0
"""


def restore_failure(name: str, code, output: str) -> "RuntimeError_":
    """The error for PG_RESTORE_SCRIPT's exit `code` and `output`."""
    what = {3: "", 4: "making the scratch database failed: ", 5: "pg_restore failed: ",
            6: "swapping the restored database in failed: "}.get(code, f"the restore failed (exit code {code}): ")
    return RuntimeError_(f"{what}{last_lines(output)}" if what else last_lines(output, 2))


class TarStream:
    """A tar archive of files read from disk while it is sent (put_archive, a build
    context): never all in memory. `members`: (name in the archive, bytes or a Path, mode,
    uid, gid). Has a length (so requests sends a Content-Length) and `read(n)`."""

    def __init__(self, members):
        import tarfile

        self._parts = []
        total = 0
        for member, data, mode, uid, gid in members:
            size = len(data) if isinstance(data, bytes) else Path(data).stat().st_size
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.uid, info.gid, info.mtime = size, mode, uid, gid, int(time.time())
            header = info.tobuf(format=tarfile.GNU_FORMAT)
            pad = (-size) % 512
            self._parts += [header, data, b"\0" * pad]
            total += len(header) + size + pad
        self._parts.append(b"\0" * 1024)
        total += 1024
        self._length = total
        self._fh = None

    def __len__(self):
        return self._length

    def read(self, n: int = -1) -> bytes:
        n = 1 << 20 if n is None or n < 0 else n
        while self._parts:
            part = self._parts[0]
            if isinstance(part, bytes):
                if not part:
                    self._parts.pop(0)
                    continue
                chunk, self._parts[0] = part[:n], part[n:]
                return chunk
            if self._fh is None:
                self._fh = open(part, "rb")
            chunk = self._fh.read(n)
            if chunk:
                return chunk
            self._fh.close()
            self._fh = None
            self._parts.pop(0)
        return b""

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class RuntimeError_(Exception):
    """A backend failed; the message is shown to the user as the status reason."""


class AppFailed(RuntimeError_):
    """The app itself did not come up (it exited, or did not answer HTTP in time): the
    fault of what it was started with, not of the machine. The message ends with the app's
    last output."""


def user_errors(translate):
    """Decorator for a backend's public methods: what fails inside leaves as RuntimeError_
    with a short text. `translate(runtime, method_name, exc)` returns that error for the
    exceptions the backend knows, None for others (raised as they are)."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except RuntimeError_:
                raise
            except Exception as exc:
                error = translate(self, method.__name__, exc)
                if error is None:
                    raise
                raise error from None

        return wrapper

    return decorate


def free_port() -> int:
    """A port nothing listens on at 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def last_lines(text: str, n: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-n:])[:400]


def check_name(name: str) -> None:
    if not INSTANCE_NAME.fullmatch(name or ""):
        raise RuntimeError_(f"instance name {name!r} is not DNS-safe (a-z, 0-9, '-', at most 42 characters)")


SERVICE_LABELS = {"db": "PostgreSQL", "redis": "Redis"}


def wait_services(name: str, components, *, answers, crashed, last_words, timeout: float,
                  interval: float = 0.1) -> None:
    """Until each of `components` ("db", "redis") answers (`answers(component)`); fails at
    once when one has crashed (`crashed(component)`), else at the deadline, with the
    component's last output (`last_words(component)`)."""
    pending = list(components)
    deadline = time.monotonic() + timeout
    while True:
        for component in list(pending):
            if answers(component):
                pending.remove(component)
            elif crashed(component):
                tail = last_words(component)
                raise RuntimeError_(f"{SERVICE_LABELS[component]} of {name} failed to start"
                                    + (f": {tail}" if tail else ""))
        if not pending:
            return
        if time.monotonic() >= deadline:
            what = " and ".join(SERVICE_LABELS[c] for c in pending)
            tail = last_words(pending[0])
            raise RuntimeError_(f"{what} of {name} not ready after {timeout:g} s" + (f": {tail}" if tail else ""))
        time.sleep(interval)


def http_problem(url: str, timeout: float = 10) -> str:
    """'' when the app at `url` answers `GET /` with a status below 500, else what happened
    instead ("GET / answered 502", "ConnectionError"). Its body is never read (the app is
    the tenant's code)."""
    try:
        with requests.get(url + "/", timeout=timeout, allow_redirects=False, stream=True) as resp:
            return "" if resp.status_code < 500 else f"GET / answered {resp.status_code}"
    except requests.RequestException as exc:
        return type(exc).__name__


def wait_http(step, timeout: float, *, out=None, last_words=lambda: "", interval: float = 0.2) -> str:
    """Until a new app answers HTTP (any status below 500); returns its URL. `step()`
    returns the URL ("" while not known yet) and raises AppFailed when the app crashed;
    `last_words()` gives its last output for the timeout message (AppFailed too)."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        url = step()
        if url:
            try:
                resp = requests.get(url + "/", timeout=3, allow_redirects=False)
                if resp.status_code < 500:
                    if out:
                        out(f"health check: GET / answered {resp.status_code}\n")
                    return url
                last = f"GET / answered {resp.status_code}"
            except requests.RequestException as exc:
                last = type(exc).__name__
        if time.monotonic() >= deadline:
            tail = last_words()
            raise AppFailed(f"the app did not answer HTTP within {timeout:g} s ({last})" + (f": {tail}" if tail else ""))
        time.sleep(interval)


@dataclass(frozen=True)
class AppSpec:
    """The oTree app process of an instance (from the live release; a stand-in app in tests)."""

    image: str  # the release: the reference its backend's `build_release` returned (Release.image)
    command: list[str] | None = None  # None: the project's oTree app, started as its backend does (otree_project)
    port: int = 8000  # the port the app listens on where it runs alone (a backend may give it another)
    env: dict[str, str] = field(default_factory=dict)  # OTREE_*, DATABASE_URL, REDIS_URL, config vars
    release_id: str = ""  # so a new release's app differs from the old one's
    user: str | None = None  # "uid:gid" a command of its own runs as, where the backend has such users


@dataclass(frozen=True)
class InstanceSpec:
    """Desired state of one instance, as the reconciler derives it from the database."""

    name: str  # unique, DNS-safe
    db_name: str
    db_user: str
    db_password: str
    memory_mb: int  # limit for the app
    cpus: float  # limit for the app
    app: AppSpec | None = None  # None until the first deploy
    # Small fixed limits for the supporting services.
    db_memory_mb: int = 256
    redis_memory_mb: int = 64


@dataclass(frozen=True)
class Protection:
    """One line of "what isolation holds" for the instance page: a protection of the
    runtime on this machine, whether it is enforced now, and how (or why not and what the
    lab can do)."""

    what: str  # e.g. "Files", "Host and other instances", "Outside network", "Memory", "CPU", "Processes", "Builds"
    holds: bool  # enforced on this machine right now
    detail: str  # one sentence: how it is enforced, or why not and what to do


class Health(str, Enum):
    MISSING = "missing"
    STARTING = "starting"
    RUNNING = "running"  # up and answering
    EXITED = "exited"


@dataclass
class ComponentState:
    health: Health
    detail: str = ""  # e.g. "OOMKilled", "exit code 1"
    restarts: int = 0  # how often it exited and was started again (a crash loop counts up)


@dataclass
class InstanceState:
    db: ComponentState
    redis: ComponentState
    app: ComponentState
    app_url: str = ""  # where the app answers on the host, e.g. http://127.0.0.1:32768

    @property
    def services_ready(self) -> bool:
        return self.db.health == Health.RUNNING and self.redis.health == Health.RUNNING


class Runtime(Protocol):
    name: str  # "docker", "process", ...
    isolation: str  # one sentence for the instance page
    limits_cpu: bool  # whether the CPU limit is enforced

    def database_label(self, name: str) -> str:
        """What database the instance has, for its page."""

    def protections(self, name: str) -> list[Protection]:
        """What isolation holds for instance `name` on this machine now (the page lists
        them with what does not hold and why). Never contacts anything slow."""

    def backup_suffix(self, name: str) -> str:
        """File name ending of the instance's backups (".dump": pg_dump's custom format)."""

    def build_release(self, name: str, number: int, ctx: Path, *, out, timeout: float, memory_mb: int = 1024,
                      cpus: float = 1.0) -> str:
        """Build release `number` from the checked project in `ctx` (output to `out(text)`);
        returns its reference (Release.image). Raises otree_project.BuildFailed with the reason.
        The build runs the project's requirements (their setup.py) as untrusted code: with
        the instance's memory and CPU limits (`memory_mb`, `cpus`), as an unprivileged
        identity that is not the instance's own app."""

    def introspect(self, name: str, release: str, *, timeout: float = 60) -> dict:
        """{session_configs, rooms, language_code} of a built release."""

    def remove_build_leftovers(self, name: str) -> None:
        """Remove what a build whose worker died left behind (only called while no build of
        the instance runs)."""

    def available(self) -> bool:
        """True when the backend can be used on this machine (e.g. the engine answers)."""

    def ensure(self, spec: InstanceSpec) -> InstanceState:
        """Create or repair everything of the instance to match `spec`; start what is stopped.
        An app whose spec changed (release, env, limits) is replaced."""

    def state(self, name: str) -> InstanceState:
        """What runs now, without changing anything."""

    def restart_app(self, name: str) -> None:
        """Restart the app process (no-op without an app)."""

    def stop(self, name: str) -> None:
        """Stop all processes of the instance, keeping its data."""

    def stop_app(self, name: str) -> None:
        """Stop only the app (a sleeping instance whose database and Redis stay up:
        LAB_SLEEP_DATABASES=false); `ensure` starts it again."""

    def backup_database(self, name: str, spec: InstanceSpec, dest: Path) -> int:
        """Write a `pg_dump -Fc` of the instance's database to `dest`; return its size."""

    def reset_database(self, name: str, spec: InstanceSpec) -> None:
        """Empty the database (drop and recreate it); the app is restarted afterwards."""

    def check_restore(self, name: str, spec: InstanceSpec, src: Path) -> None:
        """Whether backup file `src` (of this runtime's `backup_suffix`) can be restored
        into the instance: read in the instance's own sandbox (the database's container,
        the instance's user), never by the manager. Raises RuntimeError_ with the reason;
        changes nothing."""

    def restore_database(self, name: str, spec: InstanceSpec, src: Path) -> None:
        """Replace the instance's database with the backup file `src`, so that a failure
        leaves the database as it was (restored aside first, swapped in only once
        complete). The app is restarted afterwards by the caller."""

    def remove(self, name: str) -> None:
        """Remove every resource of the instance, data included. Idempotent."""

    def deploy_app(self, spec: InstanceSpec, *, timeout: float, out=None, before_switch=None) -> str:
        """Start `spec.app` beside the running app, wait until it answers HTTP, call
        `before_switch()` (an exception there aborts), then make it the instance's app; the
        old one keeps running until `retire_app`. On failure the old app is untouched and
        RuntimeError_ says why: AppFailed (with the app's last output) when the new app
        itself exited or did not answer within `timeout` (a settings change is then
        undone), another RuntimeError_ when the machine failed. Returns the new app's URL
        on the host."""

    def retire_app(self, name: str) -> None:
        """Stop the app that the last `deploy_app` replaced."""

    def release_exists(self, release: str) -> bool:
        """Whether the build of a release (the reference `build_release` returned) is still kept."""

    def prune_releases(self, name: str, keep_releases: set[str]) -> list[str]:
        """Remove the instance's release builds except those of `keep_releases` (numbers)."""

    def logs(self, name: str, component: str = "app", tail: int = 200) -> str:
        """Recent output of a component ("app", "db", "redis")."""

    def owned_instances(self) -> set[str]:
        """Names of the instances this backend has any resource of (for the orphan sweep)."""

    def ensure_protections(self) -> None:
        """The sweep's pass over what guards the instances beyond this machine's firewall
        (the swarm's other nodes); nothing for a one-machine backend."""
