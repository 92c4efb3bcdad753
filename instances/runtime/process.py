"""The `process` runtime: instances as plain processes on this machine, no Docker.

Isolation (LAB_PROCESS_ISOLATION): `users` (the default; the manager must run as root)
runs every instance as a user of its own and every build as a build user; `none` (a
single-user machine, the manager not root) runs everything as the manager's own user, and
the instance page says plainly that nothing separates the instances from each other or
from the manager. Without root and without `none`, new process instances are refused
(`process_refusal`), with what to do.

Everything of the experimenter is hostile (the app, settings.py, requirements and their
setup.py). The rules that follow from it:

- Identity comes from the instance's name and the manager's id, never from a file:
  the user `otl-<manager id>-<name>` (or `otl-<name prefix>-<hash>` when that is longer
  than 32 characters), comment "oTree Lab <manager id> instance <name>", a uid from
  LAB_PROCESS_APP_UIDS (the firewall, instances/netguard.py, matches the range), made
  with useradd -l; before any use or userdel the entry is checked to be ours (comment,
  uid range).
- What the manager reads, and what runs as root, lives where only the manager writes.
  Root never follows a link in a tenant's tree and never does file operations inside it:
  those run as the tenant (procsup.py's `exec`), or, where that cannot be, as fd-based
  walks that follow no link and change only entries the expected user owns.

Layout, under `LAB_DATA_DIR/instances/` (root, 0711):

  <name>/                root 0711
    instance.json        root 0600: database kind, user, uid, the cgroups, the manager's id
    spec.json            root 0600: desired processes (procsup.py reads it)
    state.json           root 0600: what runs (procsup.py writes it)
    supervisor.lock      root 0600: held by the supervisor for life
    logs/                root 0700: each process's output, opened by the supervisor
    releases/r<N>/       root:<instance group>, 0750/0640: one per release, written by root,
                         read-only to the app; `.lab-venv` names its environment;
                         `db.sqlite3` links to tenant/data/db.sqlite3 (made by root)
    tenant/              the instance's user, 0700 — the only place it may write:
      pg/                its PostgreSQL cluster (unix socket only, in run/)
      data/              its SQLite database (without PostgreSQL)
      run/               sockets: PostgreSQL's and its Redis's
      home/, tmp/        HOME and TMPDIR of its processes
  .tools/redis-server    root 0755: a copy the instances' users can reach

`LAB_DATA_DIR/venvs/<key>/` (root 0711 above them): virtual environments. One is shared
by every release and instance with the same requirements when every requirement line is a
plain PyPI or URL requirement (root:root, read-only to all); a requirements file with
local paths, -r/-c files or other options gets an environment private to the instance
(its name is in the key; root:<instance group>, closed to others). Environments are built
by a build user (LAB_PROCESS_BUILDER_UIDS, a pool of slots, one build per slot at a time,
host-wide locks in /run/otree-lab/), never by an instance's user: HOME, TMPDIR and pip's
(or uv's) cache are a fresh folder removed afterwards (a cache the builds wrote would be a
channel between tenants; the shared wheel cache, `venvs/.wheels/`, is written by the
manager alone with wheels PyPI published: instances/wheelcache.py); after pip every
process of the build user is killed (a setup.py may leave a daemon holding an open file), then the environment is sealed (fd-based walk: owned by
root, no write bits, nothing the build user does not own, no hard links, no special
files) and only then marked complete. The settings reader runs as the instance's user.

Each instance has a supervisor (procsup.py, started detached, running as root) that keeps
its processes running as the instance's user, restarts them when they die and survives the
manager; `ensure` starts it when it is not running (found by its lock, not a pid) and
re-adopts it otherwise. The manager signals only the pid the supervisor recorded, and
only while the lock is held.

Limits (limits.py): process count, CPU and memory for the whole instance through cgroup v2
or v1 when the manager can use them, else RLIMIT_NPROC for the instance's user and a lower
priority; RLIMIT_AS per process always (the app: the instance's memory limit). Builds get
the instance's limits too, in a cgroup of their slot.

Instances made by the previous version (everything in a tenant-owned <name>/, the
supervisor running as the tenant) are migrated by the next `ensure`: every process of the
old user is stopped, the data folders are moved (renames) into tenant/ and given to a new
user from the range, releases are copied safely into root-owned folders (regular files
the old user owned, no hard links, links as links), the old user is deleted.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from django.conf import settings

from instances import wheelcache
from instances.otree_project import IGNORED, INTROSPECT, BuildFailed, explain_pip, parse_introspection, start_argv

from .base import (
    CANDIDATE, COMPONENTS, INSTANCE_NAME, PG_RESTORE_SCRIPT, POSTGRES_TUNING, RETIRED, SQL_IDENTIFIER, AppFailed,
    AppSpec, ComponentState, Health, InstanceSpec, InstanceState, Protection, RuntimeError_, check_name, free_port,
    last_lines, restore_failure, restore_names, user_errors, wait_http, wait_services,
)
from .limits import NICE, Amounts, Limits
from .tenantfs import (
    chown_tree, chown_tree_at, copy_owned, exists_in, lexists_at, listeners, own_folder, processes_of, read_own_json,
    read_small, seal_tree, tenant_socket, write_own_json,
)

SUPERVISOR = Path(__file__).with_name("procsup.py")
POSTGRES_ARGS = {"listen_addresses": "", "unix_socket_permissions": "0700", **POSTGRES_TUNING}
PG_TOOLS = ("initdb", "postgres", "pg_dump", "psql")
VENV_MARK = ".complete"
RELEASE_VENV = ".lab-venv"
VENV_KEY = re.compile(r"[0-9a-z]{1,32}(-[0-9a-f]{8})?")  # a folder name, never a path; -<hash>: one instance's
VENV_SCHEME = "sealed-2"  # in every key: environments of the previous version are never reused
STOP_TIMEOUT = 20
VENV_GRACE = 3600  # seconds an unreferenced environment is kept (a build may be about to use it)
LAYOUT = 2
TENANT = "tenant"
TENANT_DIRS = ("data", "run", "home", "tmp")
MIGRATING = ".migrating-"
BUILD_SLOTS = 8  # builds at the same time per host (each needs a build user of its own)
PIDS = 1024  # processes and threads of one instance: PostgreSQL (30 connections), Redis, two apps while deploying
BUILD_PIDS = 512
INTROSPECT_MB = 512
KILL_ROUNDS = 40
PASS_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CERT", "PIP_TRUSTED_HOST", "PIP_FIND_LINKS", "HTTP_PROXY",
            "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE", "UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_EXTRA_INDEX_URL", "UV_INDEX")
# Run as the instance's user. A database file that is not a plain file (a link, say to the
# manager's database) is not followed: the copy is that of an empty database, as when there
# is no file yet (a delete's final backup must not be blocked by it).
SQLITE_COPY = r'''
import os, shutil, sqlite3, stat, sys
source, scratch = sys.argv[1], sys.argv[2]
try:
    plain = stat.S_ISREG(os.lstat(source).st_mode)
except FileNotFoundError:
    plain = False
if not plain and os.path.lexists(source):
    print(f"{source} is not a plain file: not followed, the copy is empty", file=sys.stderr)
src = sqlite3.connect(f"file:{source}?mode=ro&nofollow=1", uri=True) if plain else sqlite3.connect(":memory:")
dst = sqlite3.connect(scratch)
try:
    src.backup(dst)  # consistent even while the app writes
finally:
    dst.close(); src.close()
try:
    with open(scratch, "rb") as fh:
        shutil.copyfileobj(fh, sys.stdout.buffer)
finally:
    os.unlink(scratch)
'''

# Run as the instance's user, the backup on stdin: copied into the tenant's tmp (a new file,
# no link followed), checked as an SQLite database (header, PRAGMA integrity_check) and, with
# `restore`, renamed over data/db.sqlite3 (its journal files removed first). The manager
# itself never opens the file with SQLite (a crafted database is the experimenter's input).
SQLITE_RESTORE = r'''
import os, shutil, sqlite3, sys, uuid
data, tmp, mode = sys.argv[1], sys.argv[2], sys.argv[3]
scratch = os.path.join(tmp, f".restore-{uuid.uuid4().hex[:12]}.sqlite3")
flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
try:
    with os.fdopen(os.open(scratch, flags, 0o600), "wb") as fh:
        shutil.copyfileobj(sys.stdin.buffer, fh, 1 << 20)
        fh.flush(); os.fsync(fh.fileno())
    with open(scratch, "rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            sys.exit("not an SQLite database (its header is not SQLite's)")
    try:
        con = sqlite3.connect(f"file:{scratch}?mode=ro&immutable=1", uri=True)
        try:
            rows = con.execute("PRAGMA integrity_check").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        sys.exit(f"not a usable SQLite database: {exc}")
    if rows != [("ok",)]:
        sys.exit("the SQLite database is damaged: " + "; ".join(str(r[0]) for r in rows[:3]))
    if mode != "restore":
        sys.exit(0)
    target = os.path.join(data, "db.sqlite3")
    for suffix in ("-journal", "-wal", "-shm"):
        try:
            os.unlink(target + suffix)
        except FileNotFoundError:
            pass
    try:
        os.replace(scratch, target)  # a link planted there is replaced, not followed
    except OSError:  # another file system: copied beside the target first
        near = os.path.join(data, f".restore-{uuid.uuid4().hex[:12]}.sqlite3")
        with open(scratch, "rb") as src, os.fdopen(os.open(near, flags, 0o600), "wb") as fh:
            shutil.copyfileobj(src, fh, 1 << 20)
            fh.flush(); os.fsync(fh.fileno())
        os.replace(near, target)
finally:
    try:
        os.unlink(scratch)
    except FileNotFoundError:
        pass
'''
# Run as the instance's user with the backup on stdin: copied into its tmp, then
# PG_RESTORE_SCRIPT ($1: check or restore) on it; the copy is removed at the end.
PG_RESTORE_WRAPPER = r'''
umask 077
f="$TMPDIR/.restore-$LAB_TOKEN.dump"
(set -C; cat > "$f") || exit 7
trap 'rm -f -- "$f"' EXIT
bash -c "$LAB_SCRIPT" restore "$f" "$1"
'''


def process_refusal(*, is_root: bool, isolation: str, docker_missing: bool = False) -> str | None:
    """Why new process instances are refused on this machine (what to do), or None."""
    if isolation == "users" and not is_root:
        lead = ("No Docker engine answers and the process runtime" if docker_missing else "The process runtime")
        return (f"{lead} cannot isolate instances here: it runs each instance as a user of its own, which needs "
                "the manager to run as root, and it does not. Install Docker (LAB_RUNTIME=docker), run the manager "
                "as root (deploy/otree-lab-manager.service), or, on a single-user machine, set "
                "LAB_PROCESS_ISOLATION=none (nothing then separates the instances from each other or from the "
                "manager).")
    if isolation == "none" and is_root:
        return ("LAB_PROCESS_ISOLATION=none would run the experimenters' code as root (the manager's user): "
                "use LAB_PROCESS_ISOLATION=users, which gives each instance a user of its own.")
    return None


def find_pg_bin(configured: str = "") -> Path | None:
    """The directory with PostgreSQL's server programs: LAB_PG_BIN, else PATH, else
    Debian's /usr/lib/postgresql/<newest>/bin. None when there is none."""
    candidates = [Path(configured)] if configured else []
    if not configured:
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(os.path.realpath(on_path)).parent)
        versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) for x in
                          Path(p).parent.name.split(".") if x.isdigit()], reverse=True)
        candidates += [Path(p) for p in versions]
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in PG_TOOLS):
            return folder
    return None


def reachable_by_all(path: str | Path) -> bool:
    """Whether any user can run (or read, for a script) `path`: it and every folder above
    it (symbolic links resolved) are open to others."""
    real = Path(os.path.realpath(path))
    try:
        if not os.stat(real).st_mode & stat.S_IROTH:
            return False
        return all(os.stat(folder).st_mode & stat.S_IXOTH for folder in real.parents)
    except OSError:
        return False


def default_python(own_users: bool) -> str:
    """The Python of the instances' environments: the one the manager runs on, unless it
    lies where the instances' users cannot reach it (e.g. under /root, as pyenv installs
    it): then the system's."""
    candidates = [getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    if own_users:
        for candidate in candidates:
            if os.access(candidate, os.X_OK) and reachable_by_all(candidate):
                return candidate
    return candidates[0]


def redis_server_binary() -> str:
    from manager.embedded_redis import server_binary

    return server_binary()


def requirement_is_plain(line: str) -> bool:
    """A requirement line that means the same for every instance: a PyPI requirement
    (name, extras, versions, markers) or `name @ <http(s) URL>` / a bare http(s) URL. Local
    paths, -r/-c/-e and other options (an index of one's own) are not."""
    from packaging.requirements import InvalidRequirement, Requirement

    text = line.split(" #", 1)[0].strip()
    if not text or text.startswith("#"):
        return True
    if text.startswith("-"):
        return False
    if re.match(r"https?://", text):
        return True
    try:
        req = Requirement(text)
    except InvalidRequirement:
        return False
    return req.url is None or bool(re.match(r"https?://", req.url))


def _os_error(runtime, method: str, exc: Exception) -> RuntimeError_ | None:
    if isinstance(exc, (OSError, subprocess.SubprocessError)):
        return RuntimeError_(f"{method.replace('_', ' ').strip()}: {exc}")
    return None


_user_errors = user_errors(_os_error)  # OS errors leave a public method as a RuntimeError_ with a short text


class ProcessRuntime:
    """`base.Runtime` with plain processes (see the module's text)."""

    name = "process"

    def __init__(self, *, root: Path | str | None = None, manager_id: str | None = None, pg_bin: str | None = None,
                 ready_timeout: float | None = None, python: str | None = None, users: bool | None = None,
                 limits: str = ""):
        base = Path(root or settings.DATA_DIR)
        self.data_root = base
        self.instances_root = base / "instances"
        self.venvs_root = base / "venvs"
        self.manager_id = manager_id if manager_id is not None else settings.LAB_MANAGER_ID
        self.pg_bin = find_pg_bin(pg_bin if pg_bin is not None else settings.LAB_PG_BIN)
        self.ready_timeout = ready_timeout if ready_timeout is not None else settings.LAB_READY_TIMEOUT
        self.isolation_setting = settings.LAB_PROCESS_ISOLATION
        self.own_users = (self.isolation_setting == "users") if users is None else users
        self.is_root = os.geteuid() == 0
        self.python = python or settings.LAB_PROCESS_PYTHON or default_python(self.own_users)
        self.app_uids = tuple(settings.LAB_PROCESS_APP_UIDS)
        self.builder_uids = tuple(settings.LAB_PROCESS_BUILDER_UIDS)
        self.force_limits = limits  # "v2", "v1" or "rlimit" (tests); "": the best available
        self._limits: Limits | None = None

    @property
    def isolation(self) -> str:
        who = ("each instance runs as a user of its own, and its environments are built by separate build users"
               if self.own_users else "every instance runs as the manager's own user: nothing separates the "
               "instances from each other or from the manager (LAB_PROCESS_ISOLATION=none)")
        return (f"Plain processes on this machine (no Docker): its own PostgreSQL or SQLite, Redis and app port; "
                f"{who}.")

    @property
    def limits(self) -> Limits:
        if self._limits is None:
            self._limits = Limits.detect(self.manager_id, force=self.force_limits) if self.is_root or \
                not self.own_users else Limits("rlimit", why="not root")
        return self._limits

    def refusal(self) -> str | None:
        if not self.own_users:
            return None if not self.is_root else process_refusal(is_root=True, isolation="none")
        return process_refusal(is_root=self.is_root, isolation="users")

    # --- paths and metadata -----------------------------------------------------------

    def available(self) -> bool:
        return os.name == "posix"

    def dir(self, name: str) -> Path:
        return self.instances_root / name

    def tenant_dir(self, name: str) -> Path:
        return self.dir(name) / TENANT

    def _meta(self, name: str) -> dict:
        """instance.json, when it is the manager's own file (an old layout's is not read)."""
        data = read_own_json(self.dir(name) / "instance.json", os.geteuid())
        return data if isinstance(data, dict) and data.get("layout") == LAYOUT else {}

    def _write_meta(self, name: str, meta: dict) -> None:
        write_own_json(self.dir(name) / "instance.json", meta)

    @property
    def limits_cpu(self) -> bool:
        """Whether the CPU limit holds here (cgroups; protections() says it per instance)."""
        return self.limits.kind in ("v1", "v2")

    def database_label(self, name: str) -> str:
        kind = self.database_kind(name)
        if kind == "postgresql":
            return "PostgreSQL (its own cluster, unix socket only)"
        if kind == "sqlite":
            return ("SQLite file (no PostgreSQL server programs were found when the instance was created; "
                    "install them or set LAB_PG_BIN for new instances)")
        return ""

    def database_kind(self, name: str) -> str:
        """"postgresql" or "sqlite" (for the instance page); "" before creation."""
        return self._meta(name).get("db", "")

    # --- users ---------------------------------------------------------------------------

    def user_name(self, name: str) -> str:
        plain = f"otl-{self.manager_id}-{name}"
        if len(plain) <= 32:
            return plain
        digest = hashlib.sha256(f"{self.manager_id}/{name}".encode()).hexdigest()[:8]
        return f"otl-{name[:19]}-{digest}"

    def user_comment(self, name: str) -> str:
        return f"oTree Lab {self.manager_id} instance {name}"

    @staticmethod
    def legacy_user_name(name: str) -> str:
        """The user the previous version made for `name` (a system uid)."""
        if len(name) <= 28:
            return f"otl-{name}"
        return f"otl-{name[:21]}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"

    def _our_entry(self, name: str) -> pwd.struct_passwd | None:
        """The instance's passwd entry when it exists and is ours (comment, uid range);
        RuntimeError_ when the name is taken by someone else's user."""
        user = self.user_name(name)
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return None
        low, high = self.app_uids
        if (entry.pw_gecos != self.user_comment(name) or not low <= entry.pw_uid <= high
                or not low <= entry.pw_gid <= high):
            raise RuntimeError_(f"the system user {user} exists but is not this manager's user of {name} "
                                f"(uid {entry.pw_uid}, comment {entry.pw_gecos!r}); remove it or rename the instance")
        return entry

    def _identity(self, name: str) -> dict | None:
        """{"uid", "gid"} the instance runs as; None: the manager's own user (isolation none)."""
        if not self.own_users:
            return None
        entry = self._our_entry(name)
        if entry is None:
            raise RuntimeError_(f"the system user {self.user_name(name)} of {name} does not exist")
        return {"uid": entry.pw_uid, "gid": entry.pw_gid}

    def _ids(self, name: str) -> tuple[int, int] | None:
        identity = self._identity(name)
        return (identity["uid"], identity["gid"]) if identity else None

    def _create_user(self, name: str) -> pwd.struct_passwd:
        entry = self._our_entry(name)
        if entry is not None:
            return entry
        user = self.user_name(name)
        useradd, groupadd = _program("useradd"), _program("groupadd")
        self.instances_root.mkdir(parents=True, exist_ok=True)
        with _flock(self.instances_root / ".users.lock"):
            for _ in range(20):
                entry = self._our_entry(name)
                if entry is not None:
                    return entry
                uid = _free_id(*self.app_uids)
                made = subprocess.run([groupadd, "-g", str(uid), user], capture_output=True, text=True, timeout=30)
                if made.returncode == 4:  # the number is taken (another manager, just now): the next
                    continue
                if made.returncode not in (0, 9):  # 9: a group of that name is left from before
                    raise RuntimeError_(f"cannot create the group {user} for {name}: {last_lines(made.stderr)}")
                gid = _group_id(user)
                if gid is None or not self.app_uids[0] <= gid <= self.app_uids[1]:
                    raise RuntimeError_(f"the group {user} exists but is not this manager's (gid {gid}); remove it")
                made = subprocess.run(
                    [useradd, "-l", "-M", "-u", str(uid), "-g", str(gid), "-d", str(self.tenant_dir(name) / "home"),
                     "-s", "/usr/sbin/nologin", "-c", self.user_comment(name), user],
                    capture_output=True, text=True, timeout=30)
                if made.returncode == 4:
                    continue
                if made.returncode not in (0, 9):
                    raise RuntimeError_(f"cannot create the system user {user} for {name}: "
                                        f"{last_lines(made.stderr or made.stdout)}")
            entry = self._our_entry(name)
        if entry is None:
            raise RuntimeError_(f"cannot create the system user {user} for {name}: no free user id in "
                                f"LAB_PROCESS_UIDS ({self.app_uids[0]}-{self.app_uids[1]})")
        return entry

    def _delete_user(self, name: str) -> None:
        entry = self._our_entry(name)
        if entry is None:
            return
        self._killall(entry.pw_uid, entry.pw_gid)
        self._clean_shared_tmp(entry.pw_uid, entry.pw_gid)
        result = subprocess.run([_program("userdel"), entry.pw_name], capture_output=True, text=True, timeout=30)
        if result.returncode not in (0, 6):  # 6: gone meanwhile
            raise RuntimeError_(f"cannot delete the system user {entry.pw_name}: {last_lines(result.stderr)}")
        low, high = self.app_uids
        gid = _group_id(entry.pw_name)
        if gid is not None and low <= gid <= high:
            subprocess.run([_program("groupdel"), entry.pw_name], capture_output=True, timeout=30)

    # --- running programs as someone ------------------------------------------------------------

    def _launcher(self, argv: list[str], *, identity: dict | None, cgroups=(), memory_mb=None, nproc=None,
                  nice=0, cwd=None, umask=0o077, own_stdin=False) -> list[str]:
        """The command line that runs `argv` as `identity` (procsup.py's exec): limits, user,
        parent-death signal, folder — all in that order, none of it as a Python preexec in
        this (threaded) process."""
        config = {"identity": identity, "cgroups": list(cgroups), "memory_mb": memory_mb, "nproc": nproc,
                  "nice": nice, "cwd": str(cwd) if cwd else None, "parent": os.getpid(), "umask": umask,
                  "own_stdin": own_stdin}
        return [sys.executable, "-I", "-S", str(SUPERVISOR), "exec", json.dumps(config), *argv]

    def _tenant_launcher(self, name: str, argv: list[str], *, cwd=None, memory_mb=None, own_stdin=False) -> list[str]:
        """`argv` as the instance's user, inside its cgroups and limits."""
        meta = self._meta(name)
        fallback = self.limits.kind == "rlimit" or not meta.get("cgroups")
        return self._launcher(argv, identity=self._identity(name), cgroups=meta.get("cgroups") or [],
                              memory_mb=memory_mb, nproc=PIDS if fallback and self.own_users else None,
                              nice=NICE if fallback else 0, cwd=cwd, own_stdin=own_stdin)

    def _run_tenant(self, name: str, argv: list[str], *, env=None, timeout: float = 60, cwd=None, input=None,
                    stdout=None, memory_mb=None, stdin=None) -> subprocess.CompletedProcess:
        # `stdin` (an open file, e.g. a backup to restore): read from the inherited
        # descriptor, never reopened by path, so it is not moved into a pipe (own_stdin is
        # for small input a program opens as /dev/stdin).
        launcher = self._tenant_launcher(name, argv, cwd=cwd, memory_mb=memory_mb, own_stdin=input is not None)
        return subprocess.run(launcher,
                              env=env if env is not None else self._base_env(name), input=input,
                              **({"stdin": stdin} if stdin is not None else {}),
                              stdout=stdout if stdout is not None else subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout, start_new_session=True)

    def _killall(self, uid: int, gid: int, *, graceful: float = 0) -> None:
        """Every process of `uid` ends (scan /proc, repeat until none; bounded). `graceful`:
        SIGTERM first and that many seconds for them to end on their own."""
        if not self.own_users or uid in (0, os.geteuid()):
            return
        killall = [sys.executable, "-I", "-S", str(SUPERVISOR), "killall", str(uid), str(gid)]
        if graceful:  # (never by pid from the scan: a number may be someone else's by now)
            subprocess.run(killall + ["SIGTERM"], capture_output=True, timeout=30)
            deadline = time.monotonic() + graceful
            while processes_of(uid) and time.monotonic() < deadline:
                time.sleep(0.1)
        for _ in range(KILL_ROUNDS):
            if not processes_of(uid):
                return
            subprocess.run(killall, capture_output=True, timeout=30)
            time.sleep(0.02)
        left = processes_of(uid)
        if left:
            raise RuntimeError_(f"processes of user {uid} keep running ({', '.join(map(str, left[:5]))})")

    def _clean_shared_tmp(self, uid: int, gid: int) -> None:
        """What a user left in the machine's shared temporary folders, removed with its own rights."""
        if not self.own_users or uid in (0, os.geteuid()):
            return
        script = ("import os, shutil, sys\n"
                  "for top in ('/tmp', '/var/tmp', '/dev/shm'):\n"
                  "    try: names = os.listdir(top)\n"
                  "    except OSError: continue\n"
                  "    for n in names:\n"
                  "        p = os.path.join(top, n)\n"
                  "        try:\n"
                  "            if os.lstat(p).st_uid != os.getuid(): continue\n"
                  "            if os.path.isdir(p) and not os.path.islink(p): shutil.rmtree(p, ignore_errors=True)\n"
                  "            else: os.unlink(p)\n"
                  "        except OSError: pass\n")
        subprocess.run(self._launcher([self.python, "-I", "-S", "-c", script], identity={"uid": uid, "gid": gid}),
                       capture_output=True, timeout=120, env=self._base_env(None), start_new_session=True)

    def _base_env(self, name: str | None) -> dict[str, str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "PYTHONUNBUFFERED": "1"}
        if name:
            env["HOME"] = str(self.tenant_dir(name) / "home")
            env["TMPDIR"] = str(self.tenant_dir(name) / "tmp")
            env["USER"] = env["LOGNAME"] = self.user_name(name) if self.own_users else os.environ.get("USER", "")
        env.update({k: os.environ[k] for k in PASS_ENV if k in os.environ})
        return env

    # --- the data dir -----------------------------------------------------------------------------

    def _prepare_root(self) -> None:
        """With per-instance users: the data dir is traversable (not listable) by them, for
        their own folders and the environments; everything else in it is closed to them
        (the manager's database, secrets, repositories, backups, logs)."""
        self.instances_root.mkdir(parents=True, exist_ok=True)
        self.venvs_root.mkdir(parents=True, exist_ok=True)
        if not self.own_users:
            return
        if not all(os.stat(folder).st_mode & stat.S_IXOTH for folder in self.data_root.resolve().parents):
            raise RuntimeError_(f"the instances' users cannot reach LAB_DATA_DIR ({self.data_root}): a folder above it "
                                "is closed to others; open it (chmod o+x) or move LAB_DATA_DIR (e.g. /var/lib/otree-lab)")
        if not reachable_by_all(self.python):
            raise RuntimeError_(f"the instances' users cannot run the Python {self.python} (it lies in a private "
                                "folder); set LAB_PROCESS_PYTHON to a system Python such as /usr/bin/python3")
        for path in (self.data_root, self.instances_root, self.venvs_root):
            os.chmod(path, os.stat(path).st_mode & 0o7700 | 0o711)
        for entry in self.data_root.iterdir():
            if entry.name not in (self.instances_root.name, self.venvs_root.name) and not entry.is_symlink():
                mode = entry.stat().st_mode & 0o7777
                if mode & 0o007:
                    os.chmod(entry, mode & ~0o007)

    def _tool(self, source: str | Path) -> str:
        """A program of the manager's that instances run (redis-server): as it is, or, with
        per-instance users, a copy in `instances/.tools/` that they can reach wherever the
        manager is installed (refreshed when the original changes)."""
        source = Path(source)
        if not self.own_users:
            return str(source)
        tools = self.instances_root / ".tools"
        tools.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(tools, 0o755)  # (whatever the manager's umask)
        target = tools / source.name
        info = source.stat()
        try:
            current = target.stat()
            if (current.st_size, int(current.st_mtime)) == (info.st_size, int(info.st_mtime)):
                return str(target)
        except FileNotFoundError:
            pass
        tmp = tools / f".{source.name}.{uuid.uuid4().hex[:6]}"
        shutil.copy2(source, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
        return str(target)

    # --- creation -----------------------------------------------------------------------------------

    def _create(self, name: str) -> dict:
        """The instance's folders, user and metadata (once); an old-layout instance is
        migrated first."""
        refusal = self.refusal()
        if refusal:
            raise RuntimeError_(refusal)
        meta = self._meta(name)
        if meta:
            return meta
        self._prepare_root()
        if self._legacy(name) or (self.instances_root / f"{MIGRATING}{name}").exists():
            return self._migrate(name)
        entry = self._make_folders(name)
        meta = {"layout": LAYOUT, "name": name, "manager": self.manager_id,
                "user": entry.pw_name if entry else "", "uid": entry.pw_uid if entry else None,
                "db": "postgresql" if self.pg_bin else "sqlite", "created": time.time(), "cgroups": []}
        self._write_meta(name, meta)
        return meta

    def _make_folders(self, name: str) -> pwd.struct_passwd | None:
        """root/<name> (the manager's), its user, tenant/ (the user's) and the manager-only parts."""
        root = self.dir(name)
        own_folder(root, 0o711)
        entry = self._create_user(name) if self.own_users else None
        ids = (entry.pw_uid, entry.pw_gid) if entry else None
        own_folder(root / "logs", 0o700)
        own_folder(root / "releases", 0o750, group=ids[1] if ids else None)
        tenant = root / TENANT
        try:
            os.mkdir(tenant, 0o700)
        except FileExistsError:
            pass
        fd = os.open(tenant, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if ids:
                os.fchown(fd, *ids)
            os.fchmod(fd, 0o700)
            for sub in TENANT_DIRS:
                try:
                    os.mkdir(sub, 0o700, dir_fd=fd)
                except FileExistsError:
                    continue  # the tenant's own (whatever it made of it)
                if ids:
                    os.chown(sub, *ids, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)
        return entry

    # --- limits -------------------------------------------------------------------------------------

    def _amounts(self, spec: InstanceSpec) -> Amounts:
        # Memory for the whole instance: the app twice (a deploy's candidate runs beside it),
        # PostgreSQL, Redis and the supervisor.
        memory = 2 * spec.memory_mb + max(256, spec.db_memory_mb) + max(64, spec.redis_memory_mb * 2) + 64
        return Amounts(pids=PIDS, cpus=float(spec.cpus or 0), memory_mb=memory)

    def _cgroups(self, name: str, spec: InstanceSpec) -> list[str]:
        """The instance's cgroups with the spec's limits (made when missing, e.g. after a
        reboot); [] when the rlimit fallback is what holds here. Recorded in instance.json."""
        meta = self._meta(name)
        limits = self.limits
        if limits.kind == "rlimit":
            if meta.get("limits") != "rlimit":
                self._write_meta(name, {**meta, "limits": "rlimit", "limits_why": limits.why})
            return []
        dirs = meta.get("cgroups") or limits.dirs(name)
        try:
            limits.apply(dirs, self._amounts(spec))
        except OSError:
            dirs = limits.dirs(name)  # recorded under another manager cgroup that is gone: here
            limits.apply(dirs, self._amounts(spec))
        if meta.get("cgroups") != dirs or meta.get("limits") != limits.kind:
            Limits.remove([d for d in meta.get("cgroups") or [] if d not in dirs])
            self._write_meta(name, {**meta, "cgroups": dirs, "limits": limits.kind, "limits_why": ""})
        return dirs

    # --- the supervisor -------------------------------------------------------------------------------

    def _spec(self, name: str) -> dict:
        data = read_own_json(self.dir(name) / "spec.json", os.geteuid())
        return data if isinstance(data, dict) else {"processes": {}}

    def _write_spec(self, name: str, spec: dict, *, timeout: float = STOP_TIMEOUT + 40) -> None:
        """Write the desired processes; a running supervisor is told and has applied it
        (started and stopped what changed) when this returns. The same spec again: nothing
        to write, nobody to wake (the sweep's pass over a healthy instance)."""
        current = self._spec(name)
        if {k: v for k, v in current.items() if k != "serial"} == spec and self.supervisor_alive(name):
            return
        spec = {**spec, "serial": uuid.uuid4().hex}
        write_own_json(self.dir(name) / "spec.json", spec)
        if not self.supervisor_alive(name):
            return  # it applies the file when it starts
        self._signal_supervisor(name, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._state(name).get("serial") != spec["serial"]:
            if time.monotonic() > deadline:
                raise RuntimeError_(f"the supervisor of {name} did not apply its new processes within {timeout:g} s")
            if not self.supervisor_alive(name):
                return
            time.sleep(0.02)

    def _supervision(self, name: str, spec: InstanceSpec, processes: dict) -> dict:
        """spec.json's content: the processes and how the supervisor starts them."""
        cgroups = self._cgroups(name, spec)
        fallback = not cgroups
        return {"processes": processes, "identity": self._identity(name), "cgroups": cgroups,
                "nproc": PIDS if fallback and self.own_users else None, "nice": NICE if fallback else 0}

    def _state(self, name: str) -> dict:
        data = read_own_json(self.dir(name) / "state.json", os.geteuid())
        return data if isinstance(data, dict) else {}

    def supervisor_alive(self, name: str) -> bool:
        """Whether a supervisor holds the instance's lock (no pid is trusted)."""
        path = self.dir(name) / "supervisor.lock"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        with os.fdopen(fd) as fh:
            return _locked(fh)

    def _supervisor_pid(self, name: str) -> int | None:
        pid = self._state(name).get("supervisor")
        return pid if isinstance(pid, int) and pid > 1 and self.supervisor_alive(name) else None

    def _signal_supervisor(self, name: str, sig) -> None:
        pid = self._supervisor_pid(name)
        if pid:
            _signal(pid, sig)

    def _start_supervisor(self, name: str, timeout: float = 10) -> None:
        """Start the instance's supervisor unless one runs (it reads spec.json as it starts)."""
        if self.supervisor_alive(name):
            return
        root = self.dir(name)
        token = uuid.uuid4().hex
        fd = os.open(root / "logs" / "supervisor.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "ab") as log:
            # It detaches itself (forks, new session): it outlives the worker and the manager.
            subprocess.run([sys.executable, "-I", "-S", str(SUPERVISOR), str(root), token], cwd=root,
                           env=self._base_env(None), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                           close_fds=True, timeout=30)
        deadline = time.monotonic() + timeout
        while self._state(name).get("token") != token or not self.supervisor_alive(name):
            if time.monotonic() > deadline:
                tail = last_lines(self._tail(root / "logs" / "supervisor.log", 20))
                raise RuntimeError_(f"the supervisor of {name} did not start" + (f": {tail}" if tail else ""))
            time.sleep(0.02)

    def _stop_supervisor(self, name: str, timeout: float = 60) -> None:
        pid = self._supervisor_pid(name)
        if pid is None:
            return
        if not _signal(pid, signal.SIGTERM):
            return
        deadline = time.monotonic() + timeout
        while self.supervisor_alive(name):
            if time.monotonic() > deadline:
                _signal(pid, signal.SIGKILL)
                self._kill_leftovers(name)
                break
            time.sleep(0.05)

    def _kill_leftovers(self, name: str) -> None:
        from .procsup import kill_leftovers

        kill_leftovers(self._state(name))
        ids = self._ids_if_any(name)
        if ids:
            self._killall(*ids)

    def _ids_if_any(self, name: str) -> tuple[int, int] | None:
        try:
            return self._ids(name)
        except RuntimeError_:
            return None

    # --- process specs --------------------------------------------------------------------

    def _db_process(self, name: str, spec: InstanceSpec) -> dict:
        tenant = self.tenant_dir(name)
        args = [str(self.pg_bin / "postgres"), "-D", str(tenant / "pg"), "-k", str(tenant / "run")]
        for key, value in POSTGRES_ARGS.items():
            args += ["-c", f"{key}={value}"]
        return {"argv": args, "env": self._base_env(name), "cwd": str(tenant), "stop_signal": "SIGINT",
                "memory_mb": max(256, spec.db_memory_mb), "stop_timeout": STOP_TIMEOUT}

    def _redis_process(self, name: str, spec: InstanceSpec) -> dict:
        maxmemory = max(8, spec.redis_memory_mb * 3 // 4)
        run = self.tenant_dir(name) / "run"
        args = [self._tool(redis_server_binary()), "--port", "0", "--unixsocket", str(run / "redis.sock"),
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(run),
                "--maxmemory", f"{maxmemory}mb", "--maxmemory-policy", "noeviction"]
        return {"argv": args, "env": self._base_env(name), "cwd": str(self.tenant_dir(name)), "stop_signal": "SIGTERM",
                "memory_mb": max(64, spec.redis_memory_mb * 2), "stop_timeout": STOP_TIMEOUT}

    def service_urls(self, name: str, spec: InstanceSpec) -> dict[str, str]:
        run = self.tenant_dir(name) / "run"
        if self.database_kind(name) == "postgresql":
            user, password = quote(spec.db_user, safe=""), quote(spec.db_password, safe="")
            database = f"postgresql://{user}:{password}@/{spec.db_name}?host={run}"
        else:
            database = f"sqlite:///{self.tenant_dir(name) / 'data' / 'db.sqlite3'}"
        return {"DATABASE_URL": database, "REDIS_URL": f"unix://{run / 'redis.sock'}"}

    def _app_process(self, name: str, spec: InstanceSpec, app: AppSpec, port: int, generation: int = 0) -> dict:
        release = self._release_dir(app.image)
        venv = self._venv_of(release)
        if app.command is None:  # the project's oTree server, on loopback only (the proxy publishes it)
            command = start_argv(f"127.0.0.1:{port}")
        else:  # a command of its own (tests): its argument `app.port` becomes the port picked here
            command = [str(port) if a == str(app.port) else a for a in app.command]
        argv = [str(venv / "bin" / command[0])] + command[1:]
        env = {**self._base_env(name), "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "PORT": str(port),
               "PYTHONDONTWRITEBYTECODE": "1", **app.env, **self.service_urls(name, spec)}
        return {"argv": argv, "env": env, "cwd": str(release), "stop_signal": "SIGTERM", "memory_mb": spec.memory_mb,
                "stop_timeout": STOP_TIMEOUT, "port": port, "release": app.release_id, "image": app.image,
                "generation": generation}

    # --- ensure ------------------------------------------------------------------------------

    @_user_errors
    def ensure(self, spec: InstanceSpec) -> InstanceState:
        name = spec.name
        processes = self._ensure_services(spec)
        # A deploy killed half-way leaves its candidate or the retired app behind (deploys
        # and ensure hold the same instance lock, so neither is in use now).
        processes.pop(CANDIDATE, None)
        processes.pop(RETIRED, None)
        if spec.app is not None:
            current = processes.get("app")
            port = current["port"] if current else free_port()
            generation = current.get("generation", 0) if current else 0
            processes["app"] = self._app_process(name, spec, spec.app, port, generation)
        else:
            processes.pop("app", None)
        self._write_spec(name, self._supervision(name, spec, processes))
        return self.state(name)

    def _ensure_services(self, spec: InstanceSpec) -> dict:
        """Folder, user, database cluster, supervisor with PostgreSQL (or none) and Redis,
        answering; returns the processes of the current spec (to add apps to)."""
        name = spec.name
        check_name(name)
        for label, value in (("database name", spec.db_name), ("database user", spec.db_user)):
            if not SQL_IDENTIFIER.fullmatch(value or ""):
                raise RuntimeError_(f"{label} {value!r} must be a lowercase SQL identifier")
        meta = self._create(name)
        if meta["db"] == "postgresql" and self.pg_bin is None:
            raise RuntimeError_(f"{name} has a PostgreSQL database, but PostgreSQL's server programs are no longer "
                                "found (install them or set LAB_PG_BIN)")
        _firewall()
        if meta["db"] == "postgresql":
            self._init_cluster(name, spec)
        processes = dict(self._spec(name).get("processes") or {})
        processes["redis"] = self._redis_process(name, spec)
        if meta["db"] == "postgresql":
            processes["db"] = self._db_process(name, spec)
        self._write_spec(name, self._supervision(name, spec, processes))
        self._start_supervisor(name)
        self._wait_services(name, spec, self.ready_timeout)
        return processes

    def _init_cluster(self, name: str, spec: InstanceSpec) -> None:
        tenant = self.tenant_dir(name)
        if exists_in(tenant, "pg", "PG_VERSION"):
            return
        # An initdb killed half-way left a folder: removed with the tenant's rights.
        self._run_tenant(name, ["/bin/rm", "-rf", "--", str(tenant / "pg")], timeout=120)
        # The password reaches initdb on its stdin, never through a file in a tenant's folder.
        result = self._run_tenant(name, [str(self.pg_bin / "initdb"), "-D", str(tenant / "pg"), "-U", spec.db_user,
                                         "--pwfile=/dev/stdin", "-A", "scram-sha-256", "-E", "UTF8",
                                         "--locale=C.UTF-8", "--no-sync"],
                                  input=(spec.db_password + "\n").encode(), timeout=120, cwd=tenant)
        if result.returncode != 0:
            self._run_tenant(name, ["/bin/rm", "-rf", "--", str(tenant / "pg")], timeout=120)
            raise RuntimeError_(f"initdb for {name} failed: {last_lines(result.stderr.decode(errors='replace'))}")
        os.sync()  # the new cluster is durable before it is used

    def _psql(self, name: str, spec: InstanceSpec, sql: str, dbname: str = "postgres",
              timeout: float = 10) -> subprocess.CompletedProcess:
        """`sql` in the instance's PostgreSQL, run by psql as the instance's user (so a
        planted socket link reaches nothing the tenant could not reach itself)."""
        env = {**self._base_env(name), "PGPASSWORD": spec.db_password, "PGCONNECT_TIMEOUT": "2"}
        return self._run_tenant(name, [str(self.pg_bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-tA",
                                       "-h", str(self.tenant_dir(name) / "run"), "-U", spec.db_user, "-d", dbname,
                                       "-c", sql], env=env, timeout=timeout)

    def _db_ready(self, name: str, spec: InstanceSpec) -> bool:
        """PostgreSQL answers, and has the app's database (made the first time)."""
        if not SQL_IDENTIFIER.fullmatch(spec.db_name) or not SQL_IDENTIFIER.fullmatch(spec.db_user):
            return False
        if not exists_in(self.tenant_dir(name), "run", ".s.PGSQL.5432"):
            return False  # not listening yet (no program started for nothing)
        try:
            found = self._psql(name, spec, f"SELECT 1 FROM pg_database WHERE datname = '{spec.db_name}'")
            if found.returncode != 0:
                return False
            if found.stdout.strip() != b"1":
                made = self._psql(name, spec, f'CREATE DATABASE "{spec.db_name}" OWNER "{spec.db_user}"')
                return made.returncode == 0
            return True
        except subprocess.TimeoutExpired:
            return False

    def _redis_answers(self, name: str) -> bool:
        """Redis answers PING on the instance's socket, and the one answering runs as the
        instance's user (checked before anything is sent: a planted link to another
        socket gets nothing)."""
        expected = self._ids_if_any(name) if self.own_users else (os.geteuid(), os.getegid())
        if expected is None:
            return False
        try:
            with tenant_socket(self.tenant_dir(name), "run", "redis.sock", expected[0]) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _wait_services(self, name: str, spec: InstanceSpec, timeout: float) -> None:
        def crashed(component):  # the supervisor restarted it: it died
            return bool((self._state(name).get("processes", {}).get(component) or {}).get("restarts"))

        wait_services(name, ["redis"] + (["db"] if self.database_kind(name) == "postgresql" else []),
                      answers=lambda c: self._db_ready(name, spec) if c == "db" else self._redis_answers(name),
                      crashed=crashed, last_words=lambda c: last_lines(self.logs(name, c, tail=20)),
                      timeout=timeout, interval=0.05)

    # --- deploys ---------------------------------------------------------------------------

    @_user_errors
    def deploy_app(self, spec: InstanceSpec, *, timeout: float, out=None, before_switch=None) -> str:
        name = spec.name
        if spec.app is None:
            raise RuntimeError_("no app to deploy")
        if not self.release_exists(spec.app.image):
            raise RuntimeError_(f"the release {spec.app.image} is not built (or no longer kept)")
        processes = self._ensure_services(spec)
        processes.pop(CANDIDATE, None)
        processes.pop(RETIRED, None)
        candidate = self._app_process(name, spec, spec.app, free_port())
        self._write_spec(name, self._supervision(name, spec, {**processes, CANDIDATE: candidate}))
        url = f"http://127.0.0.1:{candidate['port']}"
        try:
            wait_http(lambda: self._check_started(name, CANDIDATE, candidate) or url, timeout, out=out,
                      last_words=lambda: last_lines(self.logs(name, CANDIDATE, tail=40), 4))
            self._check_listener(name, candidate["port"])
            if before_switch is not None:
                before_switch()
        except BaseException:
            self._write_spec(name, self._supervision(name, spec, processes))
            raise
        promoted = {**processes, "app": candidate}
        if "app" in processes:
            promoted[RETIRED] = processes["app"]
        self._write_spec(name, self._supervision(name, spec, promoted))
        return url

    def _port_taken(self, name: str, port) -> str:
        """Why the app's port is served by someone else ('' when it is not): another
        tenant may take a port before the app binds it, and would be published as this app."""
        ids = self._ids_if_any(name) if self.own_users else (os.geteuid(), os.getegid())
        if not isinstance(port, int) or ids is None:
            return ""
        others = listeners(port) - {ids[0]}
        return f"port {port} is served by a program of another user (uid {min(others)})" if others else ""

    def _check_listener(self, name: str, port: int) -> None:
        taken = self._port_taken(name, port)
        if taken:
            raise RuntimeError_(f"{taken}, not by the app; deploy again")

    def _check_started(self, name: str, role: str, process: dict) -> str:
        """'' while the role's process runs (or is about to); RuntimeError_ once it exited."""
        from .procsup import spec_key

        info = self._state(name).get("processes", {}).get(role)
        if info and info.get("key") == spec_key(process) and (info.get("restarts") or (info.get("last_exit") is not None and not info.get("running"))):
            tail = last_lines(self.logs(name, role, tail=40), 4)
            raise AppFailed(f"the app exited with code {info.get('last_exit')} while starting"
                                + (f": {tail}" if tail else ""))
        return ""

    @_user_errors
    def retire_app(self, name: str) -> None:
        check_name(name)
        current = self._spec(name)
        processes = dict(current.get("processes") or {})
        if processes.pop(RETIRED, None) is not None:
            self._write_spec(name, {**{k: v for k, v in current.items() if k != "serial"}, "processes": processes})

    def _release_dir(self, image: str) -> Path:
        name, _, number = (image or "").partition("/")
        if not name or not number.startswith("r") or not number[1:].isdigit():
            raise RuntimeError_(f"{image!r} is not a release of the process runtime")
        check_name(name)
        return self.dir(name) / "releases" / number

    def _venv_of(self, release: Path) -> Path:
        try:
            key = read_small(release / RELEASE_VENV).strip()
        except OSError:
            key = ""
        if not VENV_KEY.fullmatch(key):
            raise RuntimeError_(f"the release {release.name} has no environment (rebuild it: push again)")
        return self.venvs_root / key

    @_user_errors
    def release_exists(self, release: str) -> bool:
        try:
            folder = self._release_dir(release)
            return folder.is_dir() and (self._venv_of(folder) / VENV_MARK).exists()
        except RuntimeError_:
            return False

    @_user_errors
    def prune_releases(self, name: str, keep_releases: set[str]) -> list[str]:
        """Remove the instance's release folders except those kept and those running;
        then the environments no release of any instance uses any more."""
        check_name(name)
        running = {p.get("image") for p in (self._spec(name).get("processes") or {}).values()}
        removed = []
        releases = self.dir(name) / "releases"
        for folder in sorted(releases.glob("r*")) if releases.exists() else []:
            number = folder.name[1:]
            if number in keep_releases or f"{name}/{folder.name}" in running or not number.isdigit():
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f"{name}/{folder.name}")
        self._prune_venvs()
        return removed

    def _prune_venvs(self) -> None:
        used = set()
        for mark in self.instances_root.glob(f"*/releases/*/{RELEASE_VENV}"):
            try:
                used.add(read_small(mark).strip())
            except OSError:
                pass
        for venv in self.venvs_root.glob("*") if self.venvs_root.exists() else []:
            if venv.is_dir() and not venv.is_symlink() and venv.name not in used and not venv.name.startswith("."):
                mark = venv / VENV_MARK
                age = time.time() - (mark.stat().st_mtime if mark.exists() else venv.stat().st_mtime)
                if age > VENV_GRACE:
                    shutil.rmtree(venv, ignore_errors=True)

    # --- builds --------------------------------------------------------------------------------

    def venv_key(self, requirements: bytes, name: str = "") -> str:
        """The environment of `requirements`: shared when every line is plain (see
        requirement_is_plain), else private to instance `name` (its name is in the key)."""
        version = subprocess.run([self.python, "-c", "import sys; print(sys.version)"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
        text = requirements.decode(errors="replace")
        lines = sorted({line.strip() for line in text.splitlines() if line.strip()
                        and not line.strip().startswith("#")})
        scheme = VENV_SCHEME + ("/uv" if settings.LAB_INSTALLER == "uv" else "")  # uv's have no pip of their own
        key = hashlib.sha256((scheme + "\n" + version + "\n" + "\n".join(lines)).encode()).hexdigest()[:16]
        if all(requirement_is_plain(line) for line in text.splitlines()):
            return key
        return f"{key}-{hashlib.sha256(f'{self.manager_id}/{name}'.encode()).hexdigest()[:8]}"

    @_user_errors
    def build_release(self, name: str, number: int, ctx: Path, *, out, timeout: float, memory_mb: int = 1024,
                      cpus: float = 1.0) -> str:
        """The release's folder (the tree) and its environment (made unless an identical
        one exists). Returns the release's reference `<name>/r<number>`."""
        check_name(name)
        self._create(name)
        deadline = time.monotonic() + timeout
        key = self.venv_key((ctx / "requirements.txt").read_bytes(), name)
        venv = self.venvs_root / key
        private = "-" in key
        if (venv / VENV_MARK).exists():
            out(f"requirements.txt unchanged: reusing the environment {key} (nothing to install)\n")
            os.utime(venv / VENV_MARK)
        else:
            if private:
                out("requirements.txt names local paths or options: the environment is this instance's own\n")
            self._make_venv(name, venv, ctx, private=private, out=out, deadline=deadline,
                            amounts=Amounts(pids=BUILD_PIDS, cpus=float(cpus or 0), memory_mb=int(memory_mb)))
        release = self.dir(name) / "releases" / f"r{number}"
        self._write_release(name, ctx, release, key)
        out(f"Release folder {release.name} ready\n")
        return f"{name}/r{number}"

    def _write_release(self, name: str, ctx: Path, release: Path, key: str) -> None:
        """The tree as a root-owned folder the app can read and not change."""
        group = self._ids(name)[1] if self.own_users else os.getegid()
        tmp = release.with_name(f".{release.name}.{uuid.uuid4().hex[:6]}")
        shutil.copytree(ctx, tmp, symlinks=True, ignore=shutil.ignore_patterns(*IGNORED))
        self._finish_release(name, tmp, key, group)
        if release.exists():
            shutil.rmtree(release)  # a rebuild of the same number (a killed worker's)
        os.rename(tmp, release)

    def _finish_release(self, name: str, tmp: Path, key: str, group: int) -> None:
        # Whatever the project has under these names (a link too) goes: ours replace them.
        for special in (RELEASE_VENV, "db.sqlite3"):
            try:
                if os.path.isdir(tmp / special) and not os.path.islink(tmp / special):
                    shutil.rmtree(tmp / special)
                else:
                    os.unlink(tmp / special)
            except FileNotFoundError:
                pass
        fd = os.open(tmp / RELEASE_VENV, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
        # oTree keeps its SQLite database in ./db.sqlite3: the instance's own file, across releases.
        os.symlink(self.tenant_dir(name) / "data" / "db.sqlite3", tmp / "db.sqlite3")
        seal_tree(tmp, owners={os.geteuid()}, uid=os.geteuid(), gid=group, private=True)

    def _make_venv(self, name: str, venv: Path, ctx: Path, *, private: bool, out, deadline: float,
                   amounts: Amounts) -> None:
        self._prepare_root()
        with _flock(self.venvs_root / f".{venv.name}.lock") as waited:
            if waited:
                out("Waited for another build of the same requirements\n")
            if (venv / VENV_MARK).exists():
                out(f"requirements.txt: the environment {venv.name} was just made by another build\n")
                return
            if os.path.lexists(venv):  # a build killed half-way: its user's processes first, then the folder
                self._reap_stale_builder(os.lstat(venv).st_uid)
                shutil.rmtree(venv)
            with self._builder(out=out, deadline=deadline, amounts=amounts) as builder:
                work = Path(tempfile.mkdtemp(prefix=".build-", dir=self.venvs_root))
                try:
                    log_text = self._build_env(name, venv, ctx, work, builder, private=private, out=out,
                                               deadline=deadline, amounts=amounts)
                    self._kill_builder(builder)  # a daemon a setup.py left holds nothing open any more
                    group = self._ids(name)[1] if private and self.own_users else os.getegid()
                    seal_tree(venv, owners={builder["uid"], os.geteuid()}, uid=os.geteuid(), gid=group,
                              private=private)
                    fd = os.open(venv / VENV_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                    with os.fdopen(fd, "w") as fh:
                        fh.write(time.strftime("%Y-%m-%d %H:%M:%S\n"))
                    if settings.LAB_INSTALLER == "uv":  # the trusted side: PyPI's verified wheels join the cache
                        self.wheel_cache.promote(log_text, out, name)
                        try:
                            self.wheel_cache.harvest(name, work / "tmp" / "uv-cache")
                        except OSError as exc:  # an optimisation: the environment stands
                            out(f"This instance's source-built wheels not kept: {exc.strerror or exc}\n")
                except BaseException:
                    self._kill_builder(builder)
                    shutil.rmtree(venv, ignore_errors=True)
                    raise
                finally:
                    shutil.rmtree(work, ignore_errors=True)

    @property
    def wheel_cache(self):
        from .uvcache import ProcessWheelCache

        return ProcessWheelCache(self)

    def _build_env(self, name: str, venv: Path, ctx: Path, work: Path, builder: dict, *, private: bool, out,
                   deadline: float, amounts: Amounts) -> str:
        """python -m venv and pip (or uv with the wheel cache, read-only, and a private uv
        cache in `work`), as the build user, in a fresh HOME (`work`); returns the output."""
        identity = builder["identity"]
        project = work / "project"
        if private:  # local paths and -r files are relative to the project: a copy the builder may write in
            shutil.copytree(ctx, project, symlinks=True, ignore=shutil.ignore_patterns(*IGNORED))
        else:
            project.mkdir()
            shutil.copy(ctx / "requirements.txt", project / "requirements.txt")
        for sub in ("home", "tmp"):
            (work / sub).mkdir()
        if settings.LAB_INSTALLER == "uv":
            # This instance's wheels built from source by its earlier builds: root-only where
            # they are kept (the build users serve every instance), a copy for this build.
            own = self.wheel_cache.own_wheels(name)
            own.mkdir(mode=0o700, exist_ok=True)
            os.chmod(own, 0o700)
            (work / "own-wheels").mkdir()
            for wheel in own.glob("*.whl"):
                if wheel.is_file() and not wheel.is_symlink():
                    shutil.copyfile(wheel, work / "own-wheels" / wheel.name, follow_symlinks=False)
        venv.mkdir(mode=0o700)
        if identity:  # nothing of this user runs now (see _builder): no race with these
            chown_tree(work, identity["uid"], identity["gid"])
            os.chown(venv, identity["uid"], identity["gid"])
        env = {**self._base_env(None), "HOME": str(work / "home"), "TMPDIR": str(work / "tmp"),
               "PIP_CACHE_DIR": str(work / "home" / "cache"), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
               "PIP_PROGRESS_BAR": "off", "PIP_ROOT_USER_ACTION": "ignore", "PIP_NO_INPUT": "1",
               "USER": "otree-lab-build", "LOGNAME": "otree-lab-build",
               "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"}
        fallback = not builder["cgroups"]
        launch = dict(identity=identity, cgroups=builder["cgroups"], memory_mb=max(amounts.memory_mb, 256),
                      nproc=amounts.pids if fallback and identity else None, nice=NICE if fallback else 0,
                      cwd=project, umask=0o022)
        out(f"Creating the environment {venv.name} (python {self.python}) as a build user\n")
        reap = (lambda: self._kill_builder(builder)) if identity else None
        if settings.LAB_INSTALLER == "uv":
            _, uv_path = self.wheel_cache.prepare()
            env.update({"OTL_UV": uv_path, "OTL_PYTHON": self.python, "OTL_VENV": str(venv),
                        "OTL_WHEELS": str(self.wheel_cache.wheels), "OTL_REQUIREMENTS": str(project / "requirements.txt"),
                        "OTL_OWN_WHEELS": str(work / "own-wheels"),
                        "OTL_TMP": str(work / "tmp"),
                        "OTL_MORE_LINKS": wheelcache.lab_find_links(env.get("PIP_FIND_LINKS", ""))})
            for pip_name, uv_name in (("PIP_INDEX_URL", "UV_INDEX_URL"), ("PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL")):
                if env.get(pip_name) and not env.get(uv_name):  # the lab's own index, as pip had it
                    env[uv_name] = env[pip_name]
            seen: list[str] = []
            text = self._stream(self._launcher(["/bin/sh", "-c", wheelcache.UV_SCRIPT], **launch), out=out,
                                deadline=deadline, what="uv", env=env, after_exit=reap, keep=seen)
            if text is not None:
                raise BuildFailed(explain_pip(text) or f"uv pip install failed: {last_lines(text, 4)}")
            return "".join(seen)
        text = self._stream(self._launcher([self.python, "-m", "venv", str(venv)], **launch), out=out,
                            deadline=deadline, what="venv", env=env, after_exit=reap)
        if text is not None:
            raise BuildFailed(f"making the environment failed: {last_lines(text, 4)}")
        out("pip install -r requirements.txt\n")
        text = self._stream(self._launcher([str(venv / "bin" / "pip"), "install", "-r", "requirements.txt"],
                                           **launch), out=out, deadline=deadline, what="pip", env=env,
                            after_exit=reap)
        if text is not None:
            raise BuildFailed(explain_pip(text) or f"pip install failed: {last_lines(text, 4)}")
        return ""

    def _builder_lock_dir(self) -> Path:
        folder = Path("/run/otree-lab") if self.is_root and os.path.isdir("/run") else self.data_root / ".builders"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder

    def _builder(self, *, out, deadline: float, amounts: Amounts) -> "_BuildSlot":
        return _BuildSlot(self, out=out, deadline=deadline, amounts=amounts)

    def _kill_builder(self, builder: dict) -> None:
        identity = (builder or {}).get("identity")
        if identity:
            self._killall(identity["uid"], identity["gid"])

    def _reap_stale_builder(self, uid: int) -> None:
        """The processes of build user `uid` that a dead build left (e.g. in a half-made
        environment), unless a running build holds that slot (it killed them when it took it)."""
        low, high = self.builder_uids
        if not self.own_users or not low <= uid <= high:
            return
        with open(self._builder_lock_dir() / f"builder-{uid}.lock", "a") as fh:
            if not _locked(fh, keep=True):
                self._killall(uid, uid)

    def _stream(self, argv: list[str], *, out, deadline: float, what: str, env=None, after_exit=None,
                keep: list | None = None) -> str | None:
        """Run `argv` (a launcher command line), its output streamed to `out`; None on
        success, else its output (BuildFailed at the deadline). `after_exit()` runs as
        soon as the program itself ends: a daemon it left still holds the output pipe
        (the build would wait for it), so the caller kills its user's processes there."""
        import threading

        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        seen = []
        timer = _Deadline(proc, deadline)
        if after_exit is not None:
            threading.Thread(target=lambda: (proc.wait(), after_exit()), daemon=True).start()
        try:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode(errors="replace")
                seen.append(line)
                if keep is not None and len(keep) < 20000:
                    keep.append(line)
                out(line)
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if timer.fired:
            raise BuildFailed(f"the build took longer than its time limit ({what})")
        return None if proc.returncode == 0 else "".join(seen[-200:])

    @_user_errors
    def introspect(self, name: str, release: str, *, timeout: float = 60) -> dict:
        folder = self._release_dir(release)
        python = self._venv_of(folder) / "bin" / "python"
        env = {**self._base_env(name), "OTREE_PRODUCTION": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        launcher = self._tenant_launcher(name, [str(python), "-c", INTROSPECT, str(folder)], cwd=folder,
                                         memory_mb=INTROSPECT_MB)
        proc = subprocess.Popen(launcher, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        timer = _Deadline(proc, time.monotonic() + timeout)
        failure = None
        try:
            # Streamed: parse_introspection reads a bounded amount (what settings.py prints
            # is the tenant's), then the reader is stopped.
            found = parse_introspection(iter(lambda: proc.stdout.read(65536), b""))
        except BuildFailed as exc:
            failure = exc
        finally:
            timer.cancel()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        if timer.fired:
            raise BuildFailed(f"reading settings.py took longer than {timeout:g} s")
        if failure is not None:
            raise failure
        return found

    # --- state -----------------------------------------------------------------------------------

    @_user_errors
    def state(self, name: str) -> InstanceState:
        check_name(name)
        found = {c: ComponentState(Health.MISSING) for c in COMPONENTS}
        if not self._meta(name):
            return InstanceState(db=found["db"], redis=found["redis"], app=found["app"])
        alive = self.supervisor_alive(name)
        processes = self._state(name).get("processes", {}) if alive else {}
        spec = self._spec(name).get("processes", {})
        for component in COMPONENTS:
            info = processes.get(component)
            if component == "db" and self.database_kind(name) == "sqlite":
                found["db"] = ComponentState(Health.RUNNING, "SQLite")
            elif info is None:
                found[component] = ComponentState(Health.MISSING if component not in spec else Health.EXITED,
                                                  "" if alive else "supervisor not running")
            elif info.get("running"):
                note = f"restarted {info['restarts']}x" if info.get("restarts") else ""
                answers = (component == "app" or (component == "redis" and self._redis_answers(name))
                           or (component == "db" and exists_in(self.tenant_dir(name), "run", ".s.PGSQL.5432")))
                squatter = component == "app" and self._port_taken(name, (spec.get("app") or {}).get("port"))
                if squatter:
                    found[component] = ComponentState(Health.EXITED, squatter)
                    continue
                found[component] = ComponentState(Health.RUNNING if answers else Health.STARTING,
                                                  note or ("" if answers else "not answering yet"),
                                                  int(info.get("restarts") or 0))
            else:  # it exited; with restarts, the supervisor starts it again after a back-off
                restarts = int(info.get("restarts") or 0)
                found[component] = ComponentState(Health.STARTING if restarts else Health.EXITED,
                                                  ", ".join(([f"restarted {restarts}x"] if restarts else [])
                                                            + [f"exit code {info.get('last_exit')}"]), restarts)
        app = spec.get("app")
        url = f"http://127.0.0.1:{app['port']}" if app and processes.get("app") else ""
        return InstanceState(db=found["db"], redis=found["redis"], app=found["app"], app_url=url)

    # --- operations --------------------------------------------------------------------------------

    @_user_errors
    def restart_app(self, name: str) -> None:
        check_name(name)
        current = self._spec(name)
        processes = dict(current.get("processes") or {})
        app = processes.get("app")
        if app is None:
            return
        processes["app"] = {**app, "generation": int(app.get("generation", 0)) + 1}  # a new key: restarted
        self._write_spec(name, {**{k: v for k, v in current.items() if k != "serial"}, "processes": processes})
        if self.supervisor_alive(name):
            self._wait_role(name, "app", processes["app"], timeout=STOP_TIMEOUT + 10)

    def _wait_role(self, name: str, role: str, process: dict, timeout: float) -> None:
        from .procsup import spec_key

        key = spec_key(process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self._state(name).get("processes", {}).get(role) or {}
            if info.get("key") == key and info.get("running"):
                return
            time.sleep(0.05)

    @_user_errors
    def stop(self, name: str) -> None:
        check_name(name)
        self._stop_supervisor(name)

    @_user_errors
    def stop_app(self, name: str) -> None:
        """Only the app (a sleeping instance whose database and Redis stay up): its process
        leaves the supervisor's spec (stopped when this returns); `ensure` adds it again."""
        check_name(name)
        current = self._spec(name)
        processes = {role: p for role, p in (current.get("processes") or {}).items()
                     if role not in ("app", CANDIDATE, RETIRED)}
        if processes != (current.get("processes") or {}):
            self._write_spec(name, {**{k: v for k, v in current.items() if k != "serial"}, "processes": processes})

    @_user_errors
    def backup_database(self, name: str, spec: InstanceSpec, dest: Path) -> int:
        """A dump (PostgreSQL) or a consistent copy (SQLite), taken with the tenant's rights:
        the program runs as the instance's user and its output is written, by the manager,
        into `dest`."""
        check_name(name)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as fh:
                if self.database_kind(name) == "postgresql":
                    if not self._db_ready(name, spec):
                        raise RuntimeError_(f"the database of {name} is not running")
                    env = {**self._base_env(name), "PGPASSWORD": spec.db_password}
                    result = self._run_tenant(name, [str(self.pg_bin / "pg_dump"), "-Fc", "-h",
                                                     str(self.tenant_dir(name) / "run"), "-U", spec.db_user,
                                                     "-d", spec.db_name], env=env, stdout=fh, timeout=3600)
                    what, expected = "pg_dump", "custom-format archive"
                else:
                    tenant = self.tenant_dir(name)
                    scratch = tenant / "tmp" / f".backup-{uuid.uuid4().hex[:8]}.sqlite3"
                    result = self._run_tenant(name, [self.python, "-I", "-S", "-c", SQLITE_COPY,
                                                     str(tenant / "data" / "db.sqlite3"), str(scratch)],
                                              stdout=fh, timeout=3600)
                    what, expected = "the SQLite copy", "SQLite file"
                fh.flush()
                os.fsync(fh.fileno())
            if result.returncode != 0:
                raise RuntimeError_(f"{what} of {name} failed (exit code {result.returncode}): "
                                    f"{last_lines(result.stderr.decode(errors='replace'))}")
            with open(tmp, "rb") as fh:
                head = fh.read(16)
            valid = head.startswith(b"PGDMP") if what == "pg_dump" else head in (b"", b"SQLite format 3\x00")
            if not valid:  # an empty file: an SQLite instance whose app never wrote
                raise RuntimeError_(f"{what} of {name} wrote no {expected}")
            size = tmp.stat().st_size
            os.replace(tmp, dest)
            return size
        finally:
            tmp.unlink(missing_ok=True)

    def remove_build_leftovers(self, name: str) -> None:
        """Nothing: a killed build's programs ran as the worker's children and ended with it
        (parent-death signal); a build user's daemons are killed when the slot is next
        taken; a half-made environment is made again by the next build."""

    def backup_suffix(self, name: str) -> str:
        return ".dump" if self.database_kind(name) == "postgresql" else ".sqlite3"

    @_user_errors
    def reset_database(self, name: str, spec: InstanceSpec) -> None:
        check_name(name)
        if self.database_kind(name) == "postgresql":
            for value in (spec.db_name, spec.db_user):
                if not SQL_IDENTIFIER.fullmatch(value or ""):
                    raise RuntimeError_(f"{value!r} is not a lowercase SQL identifier")
            # WITH (FORCE) ends the app's connections first (PostgreSQL 13+).
            for sql in (f'DROP DATABASE IF EXISTS "{spec.db_name}" WITH (FORCE)',
                        f'CREATE DATABASE "{spec.db_name}" OWNER "{spec.db_user}"'):
                result = self._psql(name, spec, sql, timeout=60)
                if result.returncode != 0:
                    raise RuntimeError_(f"resetting the database of {name} failed: "
                                        f"{last_lines(result.stderr.decode(errors='replace'))}")
        else:
            data = self.tenant_dir(name) / "data"
            result = self._run_tenant(name, ["/bin/rm", "-f", "--"] + [str(data / f"db.sqlite3{suffix}") for suffix in
                                                                        ("", "-journal", "-wal", "-shm")], timeout=60)
            if result.returncode != 0:
                raise RuntimeError_(f"resetting the database of {name} failed: "
                                    f"{last_lines(result.stderr.decode(errors='replace'))}")
        # The app is not restarted here: the caller does that (the reconciler's restart).

    @_user_errors
    def check_restore(self, name: str, spec: InstanceSpec, src: Path) -> None:
        check_name(name)
        self._restore_as_tenant(name, spec, Path(src), check=True)

    @_user_errors
    def restore_database(self, name: str, spec: InstanceSpec, src: Path) -> None:
        """PostgreSQL: PG_RESTORE_SCRIPT as the instance's user. SQLite: the app stops
        first (no write may reach the old file's journal meanwhile), then the checked copy
        replaces data/db.sqlite3; the caller's restart starts the app again."""
        check_name(name)
        if self.database_kind(name) != "postgresql":
            current = self._spec(name)
            processes = dict(current.get("processes") or {})
            if processes.pop("app", None) is not None:
                self._write_spec(name, {**{k: v for k, v in current.items() if k != "serial"},
                                        "processes": processes})
        self._restore_as_tenant(name, spec, Path(src), check=False)
        # The app is (re)started by the caller (the reconciler's restart).

    def _restore_as_tenant(self, name: str, spec: InstanceSpec, src: Path, *, check: bool) -> None:
        """The backup `src` (opened here by the manager as a plain file, no link followed)
        on the stdin of the restore, run as the instance's user."""
        mode = "check" if check else "restore"
        tenant = self.tenant_dir(name)
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise RuntimeError_(f"the backup file cannot be read: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            if self.database_kind(name) == "postgresql":
                if self.pg_bin is None or not os.access(self.pg_bin / "pg_restore", os.X_OK):
                    raise RuntimeError_("PostgreSQL's pg_restore is not found beside its other programs (LAB_PG_BIN)")
                if not check and not self._db_ready(name, spec):
                    raise RuntimeError_(f"the database of {name} is not running")
                env = {**self._base_env(name), **restore_names(spec.db_name, spec.db_user),
                       "PGPASSWORD": spec.db_password, "PGHOST": str(tenant / "run"),
                       "PATH": f"{self.pg_bin}:/usr/bin:/bin", "LAB_SCRIPT": PG_RESTORE_SCRIPT,
                       "LAB_TOKEN": uuid.uuid4().hex[:12]}
                result = self._run_tenant(name, ["/bin/bash", "-c", PG_RESTORE_WRAPPER, "restore", mode], env=env,
                                          stdin=fh, timeout=settings.LAB_BUILD_TIMEOUT)
                if result.returncode != 0:
                    raise restore_failure(name, result.returncode, result.stdout.decode(errors="replace") + "\n"
                                          + result.stderr.decode(errors="replace"))
                return
            result = self._run_tenant(name, [self.python, "-I", "-S", "-c", SQLITE_RESTORE, str(tenant / "data"),
                                             str(tenant / "tmp"), mode], stdin=fh, timeout=settings.LAB_BUILD_TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError_(last_lines(result.stderr.decode(errors="replace"), 2)
                                or f"the SQLite restore failed (exit code {result.returncode})")

    @_user_errors
    def remove(self, name: str) -> None:
        """Every process of the instance's user ends, then its folders go (fd-based
        removal, no link followed), then its cgroups and its user."""
        check_name(name)
        root = self.dir(name)
        if self._legacy(name) or (self.instances_root / f"{MIGRATING}{name}").exists():
            self._migrate(name)  # one way to take an instance apart: the current one
        if not os.path.lexists(root):  # (a removal killed half-way: what may be left)
            self._remove_user_if_ours(name)
            self._remove_cgroups(name, [])
            return
        meta = self._meta(name)
        self._stop_supervisor(name)
        self._kill_leftovers(name)
        shutil.rmtree(root, ignore_errors=True)
        if os.path.lexists(root):
            raise RuntimeError_(f"could not remove {root}")
        self._remove_cgroups(name, meta.get("cgroups") or [])
        self._remove_user_if_ours(name)
        self._prune_venvs()

    def _remove_cgroups(self, name: str, recorded: list[str]) -> None:
        """The recorded cgroups and those where this manager would put them now (nothing
        runs in them any more)."""
        here = self.limits.dirs(name) if self.limits.kind != "rlimit" else []
        left = recorded + [d for d in here if d not in recorded]
        # A cgroup is busy until the kernel has reaped its last task (after a fork bomb: a
        # moment after the kill): again for up to 10 s.
        deadline = time.monotonic() + 10
        while left := Limits.remove(left):
            if time.monotonic() >= deadline:
                raise RuntimeError_(f"could not remove the cgroups of {name}: {', '.join(left)}")
            time.sleep(0.1)

    def _remove_user_if_ours(self, name: str) -> None:
        if self.own_users and self.is_root:
            try:
                self._delete_user(name)
            except RuntimeError_ as exc:
                if "is not this manager's" not in str(exc):
                    raise  # someone else's user of that name: never ours to delete

    @_user_errors
    def logs(self, name: str, component: str = "app", tail: int = 200) -> str:
        check_name(name)
        if component not in COMPONENTS + (CANDIDATE, RETIRED):
            raise RuntimeError_(f"unknown component {component!r} (app, db or redis)")
        info = self._state(name).get("processes", {}).get(component)
        log = os.path.basename(str((info or {}).get("log") or ""))
        if not re.fullmatch(r"[a-z-]+-[0-9a-f]{12}\.log", log):
            return ""
        return self._tail(self.dir(name) / "logs" / log, tail)

    @staticmethod
    def _tail(path: Path, lines: int) -> str:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 256 * 1024))
                data = fh.read()
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-max(1, int(lines)):]) + "\n"

    def ensure_protections(self) -> None:
        """Nothing beyond this machine's firewall (the sweep applies that)."""

    @_user_errors
    def owned_instances(self) -> set[str]:
        if not self.instances_root.exists():
            return set()
        found = set()
        for folder in self.instances_root.iterdir():
            name = folder.name
            if name.startswith(MIGRATING):
                name = name[len(MIGRATING):]
                if _legacy_manager(folder) == self.manager_id:
                    found.add(name)
                continue
            if name.startswith(".") or not folder.is_dir() or folder.is_symlink():
                continue
            if self._meta(name).get("manager") == self.manager_id:
                found.add(name)
            elif self._legacy(name) and _legacy_manager(folder) == self.manager_id:
                found.add(name)
        return found | self._users_left()

    def _users_left(self) -> set[str]:
        """Instances whose user is left without a folder (a removal killed between its steps)."""
        if not self.own_users:
            return set()
        prefix = f"oTree Lab {self.manager_id} instance "
        low, high = self.app_uids
        return {entry.pw_gecos[len(prefix):] for entry in pwd.getpwall()
                if entry.pw_gecos.startswith(prefix) and low <= entry.pw_uid <= high
                and INSTANCE_NAME.fullmatch(entry.pw_gecos[len(prefix):])
                and entry.pw_name == self.user_name(entry.pw_gecos[len(prefix):])
                and not os.path.lexists(self.dir(entry.pw_gecos[len(prefix):]))}

    def processes(self, name: str) -> list[int]:
        """Pids of the instance's supervisor and of every process it runs (for tests and
        the stray-process check)."""
        state = self._state(name)
        pids = [state["supervisor"]] if self.supervisor_alive(name) and state.get("supervisor") else []
        return pids + [p["pid"] for p in (state.get("processes") or {}).values() if p.get("pid") and p.get("running")]

    # --- what holds ----------------------------------------------------------------------------------

    def protections(self, name: str) -> list:
        meta = self._meta(name)
        users = self.own_users
        entry = None
        if users:
            try:
                entry = self._our_entry(name)
            except RuntimeError_:
                entry = None
        who = f"user {entry.pw_name} (uid {entry.pw_uid})" if entry else f"a user of its own ({self.user_name(name)})"
        lines = []
        if users:
            lines.append(Protection("Files", True, (
                f"Runs as {who}: other instances' folders and the manager's data, secrets and logs are closed to it; "
                "its metadata, logs and releases belong to the manager and are read-only to it; its backups are taken "
                "with its own rights.")))
        else:
            lines.append(Protection("Files", False, (
                "Runs as the manager's own user (LAB_PROCESS_ISOLATION=none): it can read and change every instance "
                "and the manager's data, secrets and database. Run the manager as root with "
                "LAB_PROCESS_ISOLATION=users, or use Docker.")))
        net = _firewall_status() if users else None
        if net is None:
            detail = ("No firewall for the instances' users: its code reaches every service of this machine "
                      "on loopback and the host's addresses, and other instances' ports. Run the manager as root "
                      "(instances/netguard.py sets the rules)." if users else
                      "Nothing separates it from this machine's services or other instances (isolation none).")
            lines.append(Protection("Host and other instances", False, detail))
            lines.append(Protection("Outside network", False, "Not restricted: LAB_EGRESS needs the firewall."))
        else:
            lines.append(Protection("Host and other instances", net.enforced, (
                f"{net.detail}. Unix sockets of the host that every user may open (e.g. a system PostgreSQL's) stay "
                "reachable: the process runtime shares the machine's files." if net.enforced else net.detail)))
            egress = settings.LAB_EGRESS
            lines.append(Protection("Outside network", net.enforced, (
                ("Open (LAB_EGRESS=open): its code may call outside services." if egress == "open" else
                 "Closed (LAB_EGRESS=deny): its code reaches nothing outside this machine.") if net.enforced
                else net.detail)))
        kind = meta.get("limits") or ("" if not meta else "rlimit")
        how = Limits(kind or "rlimit").describe()
        if kind in ("v1", "v2"):
            lines.append(Protection("Memory", True, (
                f"Each process at most the instance's memory limit of address space (RLIMIT_AS); the whole instance "
                f"capped by {how['memory']}.")))
            lines.append(Protection("CPU", True, f"The whole instance at most its CPU limit ({how['cpu']})."))
            lines.append(Protection("Processes", True, f"The whole instance at most {PIDS} processes and threads "
                                                       f"({how['pids']}): a fork bomb stops there."))
        else:
            why = meta.get("limits_why") or self.limits.why
            lines.append(Protection("Memory", True, "Each process at most the instance's memory limit of address space "
                                                    "(RLIMIT_AS); no limit for the instance as a whole (no cgroups)."))
            lines.append(Protection("CPU", False, (
                f"Not capped (no usable cgroups: {why}): it runs at a lower priority (nice {NICE}), so a busy loop "
                "slows other instances only when the machine is busy. Give the manager cgroups (root; systemd "
                "Delegate=yes).")))
            lines.append(Protection("Processes", users, (
                f"At most {PIDS} processes and threads for its user (RLIMIT_NPROC): a fork bomb stops there."
                if users else "Not limited per instance (isolation none).")))
        lines.append(Protection("Builds", users, (
            "Environments are built by a build user of their own (not the instance's), with the instance's limits; "
            "sealed read-only before any instance uses them; shared only between identical plain requirements; "
            "the lab's wheel cache is written by the manager alone (wheels PyPI published) and read-only to builds "
            "and instances."
            if users else "Builds run as the manager's own user.")))
        return lines

    # --- the previous layout -------------------------------------------------------------------------

    def _legacy(self, name: str) -> bool:
        """An instance of the previous version: its folder belongs to its user, or (without
        per-instance users) it has data folders at the top and no tenant/."""
        root = self.dir(name)
        try:
            info = os.lstat(root)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(info.st_mode):
            return False
        if info.st_uid != os.geteuid():
            return True
        return not os.path.lexists(root / TENANT) and any(os.path.lexists(root / s) for s in ("pg", "data", "run"))

    def _migrate(self, name: str) -> dict:
        """An old-layout instance into the current layout, keeping its data (see the module
        text). Resumable: a migration killed half-way continues from where it stopped."""
        root = self.dir(name)
        aside = self.instances_root / f"{MIGRATING}{name}"
        if self._legacy(name):
            info = os.lstat(root)
            self._check_legacy_owner(name, info.st_uid)
            self._stop_legacy(name, info.st_uid, info.st_gid)
            if os.path.lexists(aside):
                raise RuntimeError_(f"cannot migrate {name}: {aside} exists already")
            os.rename(root, aside)  # in the manager's folder: the tenant cannot interfere
        old = os.lstat(aside)
        old_uid, old_gid = old.st_uid, old.st_gid
        self._check_legacy_owner(name, old_uid)
        self._killall(old_uid, old_gid)  # nothing of the old user may run while its files move
        entry = self._make_folders(name)
        ids = (entry.pw_uid, entry.pw_gid) if entry else (os.geteuid(), os.getegid())
        tenant = self.tenant_dir(name)
        aside_fd = os.open(aside, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        tenant_fd = os.open(tenant, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for sub in ("pg", "data", "home"):
                if not lexists_at(aside_fd, sub):
                    continue
                if lexists_at(tenant_fd, sub):
                    os.rmdir(sub, dir_fd=tenant_fd)  # the new, empty one (OSError when not empty: nothing is lost)
                os.rename(sub, sub, src_dir_fd=aside_fd, dst_dir_fd=tenant_fd)
            if old_uid != ids[0]:
                chown_tree_at(tenant_fd, from_uid=old_uid, uid=ids[0], gid=ids[1])
            if lexists_at(tenant_fd, "pg"):  # the old postmaster's lock (it is stopped): removed as the tenant
                self._run_tenant(name, ["/bin/rm", "-f", "--", str(tenant / "pg" / "postmaster.pid")], timeout=60)
            for sub in TENANT_DIRS:
                if not lexists_at(tenant_fd, sub):
                    os.mkdir(sub, 0o700, dir_fd=tenant_fd)
                    os.chown(sub, *ids, dir_fd=tenant_fd, follow_symlinks=False)
            db = "postgresql" if exists_in(tenant, "pg", "PG_VERSION") else "sqlite"
            self._migrate_releases(name, aside_fd, old_uid, ids[1])
        finally:
            os.close(aside_fd)
            os.close(tenant_fd)
        meta = {"layout": LAYOUT, "name": name, "manager": _legacy_manager(aside) or self.manager_id,
                "user": entry.pw_name if entry else "", "uid": entry.pw_uid if entry else None, "db": db,
                "created": time.time(), "migrated": time.time(), "cgroups": []}
        self._write_meta(name, meta)
        shutil.rmtree(aside, ignore_errors=True)  # what is left: the old metadata, logs, sockets, releases (copied)
        self._delete_legacy_user(name, old_uid, old_gid)
        return meta

    def _check_legacy_owner(self, name: str, uid: int) -> None:
        """An old-layout folder is migrated (its owner's processes killed) only when it
        belongs to the previous version's user of this instance (or to the manager)."""
        if uid == os.geteuid():
            return
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            entry = None
        if uid == 0 or entry is None or entry.pw_name != self.legacy_user_name(name) \
                or entry.pw_gecos != f"oTree Lab instance {name}":
            raise RuntimeError_(f"{self.dir(name)} belongs to uid {uid}, not to the previous version's user of {name}: "
                                "not migrated (move it away, or give it to that user)")

    def _stop_legacy(self, name: str, uid: int, gid: int) -> None:
        """The old supervisor and everything it ran: SIGTERM (PostgreSQL shuts down cleanly),
        then SIGKILL for what is left."""
        if uid not in (0, os.geteuid()):
            self._killall(uid, gid, graceful=STOP_TIMEOUT)
            return
        # Without per-instance users the old supervisor ran as the manager's user: its own lock and state.
        state = read_own_json(self.dir(name) / "state.json", os.geteuid()) or {}
        pid = state.get("supervisor")
        if isinstance(pid, int) and pid > 1 and self.supervisor_alive(name):
            _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT + 20
            while self.supervisor_alive(name) and time.monotonic() < deadline:
                time.sleep(0.05)

    def _migrate_releases(self, name: str, aside_fd: int, old_uid: int, group: int) -> None:
        """Each old release folder copied into a root-owned one: only what the old user
        owned (regular files without other links, folders, links as links); `.lab-venv`
        must name a finished environment."""
        try:
            releases_fd = os.open("releases", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=aside_fd)
        except OSError:
            return
        try:
            for entry in os.listdir(releases_fd):
                if not re.fullmatch(r"r\d+", entry) or os.path.lexists(self.dir(name) / "releases" / entry):
                    continue
                tmp = self.dir(name) / "releases" / f".{entry}.{uuid.uuid4().hex[:6]}"
                try:
                    src = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=releases_fd)
                except OSError:
                    continue
                try:
                    os.mkdir(tmp, 0o700)
                    copy_owned(src, tmp, old_uid)
                finally:
                    os.close(src)
                key = ""
                try:
                    key = read_small(tmp / RELEASE_VENV).strip()
                except OSError:
                    pass
                if not VENV_KEY.fullmatch(key) or not (self.venvs_root / key / VENV_MARK).exists():
                    shutil.rmtree(tmp, ignore_errors=True)  # no environment it may use: push again to rebuild
                    continue
                self._finish_release(name, tmp, key, group)
                os.rename(tmp, self.dir(name) / "releases" / entry)
        finally:
            os.close(releases_fd)

    def _delete_legacy_user(self, name: str, uid: int, gid: int) -> None:
        if uid in (0, os.geteuid()) or not self.is_root:
            return
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return
        if entry.pw_name != self.legacy_user_name(name) or entry.pw_gecos != f"oTree Lab instance {name}":
            return  # not the previous version's user of this instance: left alone
        self._killall(uid, gid)
        self._clean_shared_tmp(uid, gid)
        subprocess.run([_program("userdel"), entry.pw_name], capture_output=True, timeout=30)


class _BuildSlot:
    """A build slot for a with-block: a build user (a uid from LAB_PROCESS_BUILDER_UIDS)
    that no other build on this host uses meanwhile (a host-wide flock per uid), every
    process of it killed before use and after, and its cgroup with the build's limits.
    Without per-instance users: the manager's own user. The block gets {"identity",
    "uid", "cgroups"}."""

    def __init__(self, runtime: ProcessRuntime, *, out, deadline: float, amounts: Amounts):
        self.runtime, self.out, self.deadline, self.amounts = runtime, out, deadline, amounts
        self.fh = None
        self.value: dict = {}

    def __enter__(self) -> dict:
        runtime = self.runtime
        if not runtime.own_users:
            self.value = {"identity": None, "uid": os.geteuid(), "cgroups": []}
            return self.value
        low, high = runtime.builder_uids
        uids = list(range(low, min(high, low + BUILD_SLOTS - 1) + 1))
        folder = runtime._builder_lock_dir()
        said = False
        while self.fh is None:
            for uid in uids:
                fh = open(folder / f"builder-{uid}.lock", "a")
                if not _locked(fh, keep=True):
                    self.fh, chosen = fh, uid
                    break
                fh.close()
            else:
                if time.monotonic() > self.deadline:
                    raise BuildFailed("every build slot stayed busy until the build's time limit")
                if not said:
                    self.out("Waiting for a free build slot\n")
                    said = True
                time.sleep(0.5)
        try:
            runtime._killall(chosen, chosen)  # a dead build's daemon never meets this build
            cgroups = []
            if runtime.limits.kind != "rlimit":
                cgroups = runtime.limits.dirs(f"build-{chosen}")
                try:
                    runtime.limits.apply(cgroups, self.amounts)
                except OSError:
                    cgroups = []
        except BaseException:
            self.fh.close()
            raise
        self.value = {"identity": {"uid": chosen, "gid": chosen}, "uid": chosen, "cgroups": cgroups}
        return self.value

    def __exit__(self, *exc):
        try:
            self.runtime._kill_builder(self.value)
            Limits.remove(self.value.get("cgroups") or [])
        finally:
            if self.fh is not None:
                self.fh.close()  # releases the slot


class _Deadline:
    """Kills a process group at a monotonic deadline (a build's time limit)."""

    def __init__(self, proc: subprocess.Popen, deadline: float):
        import threading

        self.fired = False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire, args=(proc,))
        self._timer.daemon = True
        self._timer.start()

    def _fire(self, proc):
        self.fired = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cancel(self):
        self._timer.cancel()


# --- small helpers ------------------------------------------------------------------------------------

def _locked(fh, keep: bool = False) -> bool:
    """Whether another process holds the lock of the open file `fh` (`keep`: when not, we
    keep holding it)."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    if not keep:
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


class _flock:
    """An exclusive flock on `path` for a with-block; `as` gives whether it had to wait."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> bool:
        self.fh = open(self.path, "a")
        waited = _locked(self.fh, keep=True)
        if waited:
            fcntl.flock(self.fh, fcntl.LOCK_EX)
        return waited

    def __exit__(self, *exc):
        self.fh.close()


def _program(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _signal(pid: int, sig) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _free_id(low: int, high: int) -> int:
    """A user and group id in [low, high] nobody has: after the highest taken one (ids are
    not reused soon: a deleted instance's leftovers never meet a new one), else the lowest free."""
    import grp

    taken = {e.pw_uid for e in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    inside = sorted(i for i in taken if low <= i <= high)
    if not inside or inside[-1] < high:
        return (inside[-1] + 1) if inside else low
    for candidate in range(low, high + 1):
        if candidate not in taken:
            return candidate
    raise RuntimeError_(f"no free user id left in LAB_PROCESS_UIDS ({low}-{high})")


def _group_id(name: str) -> int | None:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _legacy_manager(folder: Path) -> str:
    """The manager id in an old-layout instance.json (in a folder of the tenant's: read
    without following links, only when it is a plain file of the manager's or the
    folder's owner without other links, and only this one field is used: at worst the
    tenant makes another manager's sweep take its own instance apart)."""
    try:
        owner = os.lstat(folder).st_uid
        fd = os.open(folder / "instance.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid not in (owner, os.geteuid()) or info.st_nlink != 1:
            return ""
        try:
            value = json.loads(fh.read(65536)).get("manager", "")
        except (ValueError, AttributeError):
            return ""
    return value if isinstance(value, str) and re.fullmatch(r"[a-z0-9]{1,16}", value) else ""


def _firewall():
    """The firewall rules for the instances' users (instances/netguard.py); never raises."""
    from instances import netguard

    return netguard.ensure()


def _firewall_status():
    """The firewall's status for the instance page (read at most every 15 s per process)."""
    from instances import netguard

    try:
        return netguard.status(max_age=15)
    except Exception:  # noqa: BLE001 - the page must render; the protection shows as not enforced
        return None


BACKEND = ProcessRuntime  # instances.runtime finds a backend by this name (the module is the backend)
