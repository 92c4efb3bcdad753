"""The `process` runtime: instances as plain processes on this machine, no Docker.

Per instance, under `LAB_DATA_DIR/instances/<name>/` (mode 700):

  instance.json   which database it has (chosen once: PostgreSQL when its server binaries
                  are found, else SQLite), its user, the manager that owns it
  pg/             its own PostgreSQL cluster (unix socket only, in run/)
  data/           its SQLite database (without PostgreSQL), and oTree's db.sqlite3 file
  run/            sockets: PostgreSQL's and its own Redis's (the embedded redis-server)
  releases/r<N>/  one directory per release (the pushed tree); `.lab-venv` names its
                  virtual environment
  home/           the processes' HOME (pip's cache)
  spec.json, state.json, logs/, supervisor.lock: the supervisor's (procsup.py)

Virtual environments live in `LAB_DATA_DIR/venvs/<hash>/`, one per distinct
requirements.txt (and Python version), shared by every release and instance with the same
requirements: a code-only push installs nothing. A finished environment is read-only to
the instances.

Each instance has a supervisor (procsup.py, started detached) that keeps its processes
running, restarts them when they die and survives the manager; `ensure` starts it when
it is not running (found by its lock, not a pid) and re-adopts it otherwise.

When the manager runs as root, every instance runs as a system user of its own
(`otl-<name>`, created with useradd): instances cannot read each other's files or the
manager's. Otherwise everything runs as the manager's user. Memory is limited per process
with RLIMIT_AS (address space). There is no network isolation: apps listen on 127.0.0.1
only, and the proxy (Caddy) publishes them.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import pwd
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from .base import (
    CANDIDATE, COMPONENTS, POSTGRES_TUNING, RETIRED, SQL_IDENTIFIER, AppSpec, ComponentState, Health, InstanceSpec,
    InstanceState, RuntimeError_, check_name, free_port, last_lines, setting, user_errors, wait_http,
    wait_services,
)

SUPERVISOR = Path(__file__).with_name("procsup.py")
POSTGRES_ARGS = {"listen_addresses": "", "unix_socket_permissions": "0700", **POSTGRES_TUNING}
PG_TOOLS = ("initdb", "postgres", "pg_dump")
VENV_MARK = ".complete"
RELEASE_VENV = ".lab-venv"
STOP_TIMEOUT = 20
VENV_GRACE = 3600  # seconds an unreferenced environment is kept (a build may be about to use it)
PASS_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CERT", "PIP_TRUSTED_HOST", "PIP_FIND_LINKS", "HTTP_PROXY",
            "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE")


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
    """The Python of the instances' environments and supervisors: the one the manager runs
    on, unless it lies where the instances' users cannot reach it (e.g. under /root, as
    pyenv installs it): then the system's."""
    candidates = [getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    if own_users:
        for candidate in candidates:
            if os.access(candidate, os.X_OK) and reachable_by_all(candidate):
                return candidate
    return candidates[0]


def redis_server_binary() -> str:
    from manager.embedded_redis import server_binary

    return server_binary()


def _os_error(runtime, method: str, exc: Exception) -> RuntimeError_ | None:
    if isinstance(exc, (OSError, subprocess.SubprocessError)):
        return RuntimeError_(f"{method.replace('_', ' ').strip()}: {exc}")
    return None


_user_errors = user_errors(_os_error)  # OS errors leave a public method as a RuntimeError_ with a short text


class ProcessRuntime:
    """`base.Runtime` with plain processes (see the module's text)."""

    name = "process"

    def __init__(self, *, root: Path | str | None = None, manager_id: str | None = None, pg_bin: str | None = None,
                 ready_timeout: float | None = None, python: str | None = None, users: bool | None = None):
        from django.conf import settings

        base = Path(root or settings.DATA_DIR)
        self.data_root = base
        self.instances_root = base / "instances"
        self.venvs_root = base / "venvs"
        self.manager_id = manager_id if manager_id is not None else setting("LAB_MANAGER_ID", "lab")
        self.pg_bin = find_pg_bin(pg_bin if pg_bin is not None else setting("LAB_PG_BIN", ""))
        self.ready_timeout = ready_timeout if ready_timeout is not None else setting("LAB_READY_TIMEOUT", 30)
        self.own_users = (os.geteuid() == 0) if users is None else users
        self.python = python or setting("LAB_PROCESS_PYTHON", "") or default_python(self.own_users)

    @property
    def isolation(self) -> str:
        who = ("each instance runs as a system user of its own, so instances cannot read each other's files"
               if self.own_users else "every instance runs as the manager's own user (no isolation between "
               "instances beyond separate directories, ports and databases)")
        return (f"Plain processes on this machine (no Docker): its own PostgreSQL or SQLite, Redis and app port; "
                f"{who}; memory is capped per process (address space); no network isolation.")

    # --- paths and metadata -----------------------------------------------------------

    def available(self) -> bool:
        return os.name == "posix"

    def dir(self, name: str) -> Path:
        return self.instances_root / name

    def _meta(self, name: str) -> dict:
        try:
            return json.loads((self.dir(name) / "instance.json").read_text())
        except (OSError, ValueError):
            return {}

    limits_cpu = False

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

    def _ids(self, name: str) -> tuple[int, int] | None:
        """(uid, gid) the instance runs as; None: the manager's own."""
        user = self._meta(name).get("user")
        if not user:
            return None
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise RuntimeError_(f"the system user {user} of {name} no longer exists") from None
        return entry.pw_uid, entry.pw_gid

    @staticmethod
    def user_name(name: str) -> str:
        if len(name) <= 28:
            return f"otl-{name}"
        return f"otl-{name[:21]}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"

    def _create_user(self, name: str) -> str:
        user = self.user_name(name)
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            pass
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        result = subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", str(self.dir(name) / "home"),
             "--shell", "/usr/sbin/nologin", "--comment", f"oTree Lab instance {name}", user],
            capture_output=True, text=True, timeout=30)
        if result.returncode not in (0, 9):  # 9: it exists (created meanwhile)
            raise RuntimeError_(f"cannot create the system user {user} for {name}: "
                                f"{last_lines(result.stderr or result.stdout)}")
        return user

    def _chown(self, path: Path, ids: tuple[int, int] | None, *, recursive: bool = False) -> None:
        if ids is None:
            return
        os.chown(path, *ids, follow_symlinks=False)
        if recursive:
            for root, dirs, files in os.walk(path):
                for item in dirs + files:
                    os.chown(os.path.join(root, item), *ids, follow_symlinks=False)

    def _as_user(self, name: str | None) -> dict:
        """subprocess arguments that run a program as the instance's user (none: as ours)."""
        ids = self._ids(name) if name else None
        return {"user": ids[0], "group": ids[1], "extra_groups": []} if ids else {}

    def _run_as(self, name: str | None, argv: list[str], *, env: dict | None = None, timeout: float = 60,
                cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=env if env is not None else self._base_env(name), cwd=cwd,
                              capture_output=True, timeout=timeout, **self._as_user(name))

    def _base_env(self, name: str | None) -> dict[str, str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "PYTHONUNBUFFERED": "1"}
        if name:
            env["HOME"] = str(self.dir(name) / "home")
        env.update({k: os.environ[k] for k in PASS_ENV if k in os.environ})
        return env

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
        for path in (self.data_root, self.instances_root):
            os.chmod(path, os.stat(path).st_mode & 0o7770 | 0o711)
        os.chmod(self.venvs_root, 0o755)
        for entry in self.data_root.iterdir():
            if entry.name not in (self.instances_root.name, self.venvs_root.name) and not entry.is_symlink():
                mode = entry.stat().st_mode & 0o7777
                if mode & 0o007:
                    os.chmod(entry, mode & ~0o007)

    def _tool(self, source: str | Path) -> str:
        """A program of the manager's that instances run (the supervisor, redis-server): as
        it is, or, with per-instance users, a copy in `instances/.tools/` that they can
        reach wherever the manager is installed (refreshed when the original changes)."""
        source = Path(source)
        if not self.own_users:
            return str(source)
        tools = self.instances_root / ".tools"
        tools.mkdir(mode=0o755, parents=True, exist_ok=True)
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

    def _create(self, name: str) -> dict:
        """The instance's folder, user and metadata (once)."""
        meta = self._meta(name)
        if meta:
            return meta
        self._prepare_root()
        root = self.dir(name)
        root.mkdir(mode=0o700, exist_ok=True)
        user = self._create_user(name) if self.own_users else ""
        meta = {"name": name, "manager": self.manager_id, "user": user,
                "db": "postgresql" if self.pg_bin else "sqlite", "created": time.time()}
        entry = pwd.getpwnam(user) if user else None
        ids = (entry.pw_uid, entry.pw_gid) if entry else None
        for sub in ("run", "data", "releases", "home", "logs"):
            (root / sub).mkdir(mode=0o700, exist_ok=True)
            self._chown(root / sub, ids)
        self._chown(root, ids)
        tmp = root / "instance.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, root / "instance.json")
        return meta

    # --- the supervisor -----------------------------------------------------------------

    def _spec(self, name: str) -> dict:
        try:
            return json.loads((self.dir(name) / "spec.json").read_text())
        except (OSError, ValueError):
            return {"processes": {}}

    def _write_spec(self, name: str, spec: dict, *, timeout: float = STOP_TIMEOUT + 40) -> None:
        """Write the desired processes; a running supervisor is told and has applied it
        (started and stopped what changed) when this returns. The same processes again:
        nothing to write, nobody to wake (the sweep's pass over a healthy instance)."""
        if spec["processes"] == self._spec(name).get("processes") and self.supervisor_alive(name):
            return
        spec = {**spec, "serial": uuid.uuid4().hex}
        path = self.dir(name) / "spec.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(spec, fh, indent=1, sort_keys=True)
        self._chown(tmp, self._ids(name))
        os.replace(tmp, path)
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

    def _state(self, name: str) -> dict:
        try:
            return json.loads((self.dir(name) / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def supervisor_alive(self, name: str) -> bool:
        """Whether a supervisor holds the instance's lock (no pid is trusted)."""
        path = self.dir(name) / "supervisor.lock"
        if not path.exists():
            return False
        with open(path, "a") as fh:
            return _locked(fh)

    def _supervisor_pid(self, name: str) -> int | None:
        pid = self._state(name).get("supervisor")
        return pid if isinstance(pid, int) and self.supervisor_alive(name) else None

    def _signal_supervisor(self, name: str, sig) -> None:
        pid = self._supervisor_pid(name)
        if pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _start_supervisor(self, name: str, timeout: float = 10) -> None:
        """Start the instance's supervisor unless one runs (it reads spec.json as it starts)."""
        if self.supervisor_alive(name):
            return
        root = self.dir(name)
        ids = self._ids(name)
        for path in (root / "supervisor.lock", root / "state.json", root / "logs" / "supervisor.log"):
            path.touch()
            self._chown(path, ids)
        token = uuid.uuid4().hex
        with open(root / "logs" / "supervisor.log", "ab") as log:
            # It detaches itself (forks, new session): it outlives the worker and the manager.
            subprocess.run([self.python, "-I", "-S", self._tool(SUPERVISOR), str(root), token], cwd=root,
                           env=self._base_env(name), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                           close_fds=True, timeout=30, **self._as_user(name))
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
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while self.supervisor_alive(name):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                self._kill_leftovers(name)
                break
            time.sleep(0.05)

    def _kill_leftovers(self, name: str) -> None:
        from .procsup import kill_leftovers

        kill_leftovers(self._state(name))

    # --- process specs --------------------------------------------------------------------

    def _db_process(self, name: str, spec: InstanceSpec) -> dict:
        args = [str(self.pg_bin / "postgres"), "-D", str(self.dir(name) / "pg"), "-k", str(self.dir(name) / "run")]
        for key, value in POSTGRES_ARGS.items():
            args += ["-c", f"{key}={value}"]
        return {"argv": args, "env": self._base_env(name), "cwd": str(self.dir(name)), "stop_signal": "SIGINT",
                "memory_mb": max(256, spec.db_memory_mb), "stop_timeout": STOP_TIMEOUT}

    def _redis_process(self, name: str, spec: InstanceSpec) -> dict:
        maxmemory = max(8, spec.redis_memory_mb * 3 // 4)
        args = [self._tool(redis_server_binary()), "--port", "0", "--unixsocket", str(self.dir(name) / "run" / "redis.sock"),
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(self.dir(name) / "run"),
                "--maxmemory", f"{maxmemory}mb", "--maxmemory-policy", "noeviction"]
        return {"argv": args, "env": self._base_env(name), "cwd": str(self.dir(name)), "stop_signal": "SIGTERM",
                "memory_mb": max(64, spec.redis_memory_mb * 2), "stop_timeout": STOP_TIMEOUT}

    def service_urls(self, name: str, spec: InstanceSpec) -> dict[str, str]:
        run = self.dir(name) / "run"
        if self.database_kind(name) == "postgresql":
            user, password = quote(spec.db_user, safe=""), quote(spec.db_password, safe="")
            database = f"postgresql://{user}:{password}@/{spec.db_name}?host={run}"
        else:
            database = f"sqlite:///{self.dir(name) / 'data' / 'db.sqlite3'}"
        return {"DATABASE_URL": database, "REDIS_URL": f"unix://{run / 'redis.sock'}"}

    def _app_process(self, name: str, spec: InstanceSpec, app: AppSpec, port: int, generation: int = 0) -> dict:
        release = self._release_dir(app.image)
        venv = self._venv_of(release)
        command = list(app.command or ["otree", "prodserver", str(app.port)])
        # The port argument: oTree's prodserver takes ADDR:PORT (loopback only: the proxy
        # publishes it); any other command gets the bare port.
        bind = f"127.0.0.1:{port}" if command[:2] == ["otree", "prodserver"] else str(port)
        argv = [str(venv / "bin" / command[0])] + [bind if a == str(app.port) else a for a in command[1:]]
        env = {**self._base_env(name), "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "PORT": str(port),
               **app.env, **self.service_urls(name, spec)}
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
        self._write_spec(name, {"processes": processes})
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
        if meta["db"] == "postgresql":
            self._init_cluster(name, spec)
        processes = dict(self._spec(name).get("processes") or {})
        processes["redis"] = self._redis_process(name, spec)
        if meta["db"] == "postgresql":
            processes["db"] = self._db_process(name, spec)
        self._write_spec(name, {"processes": processes})
        self._start_supervisor(name)
        self._wait_services(name, spec, self.ready_timeout)
        return processes

    def _init_cluster(self, name: str, spec: InstanceSpec) -> None:
        pgdata = self.dir(name) / "pg"
        if (pgdata / "PG_VERSION").exists():
            return
        if pgdata.exists():
            shutil.rmtree(pgdata)  # an initdb killed half-way
        ids = self._ids(name)
        fd, pwfile = tempfile.mkstemp(dir=self.dir(name) / "run")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(spec.db_password + "\n")
            self._chown(Path(pwfile), ids)
            result = self._run_as(name, [str(self.pg_bin / "initdb"), "-D", str(pgdata), "-U", spec.db_user,
                                         f"--pwfile={pwfile}", "-A", "scram-sha-256", "-E", "UTF8",
                                         "--locale=C.UTF-8", "--no-sync"], timeout=120)
        finally:
            os.unlink(pwfile)
        if result.returncode != 0:
            shutil.rmtree(pgdata, ignore_errors=True)
            raise RuntimeError_(f"initdb for {name} failed: {last_lines(result.stderr.decode(errors='replace'))}")
        os.sync()  # the new cluster is durable before it is used

    def _connect_db(self, name: str, spec: InstanceSpec, dbname: str, timeout: float = 2):
        import psycopg

        return psycopg.connect(host=str(self.dir(name) / "run"), user=spec.db_user, password=spec.db_password,
                               dbname=dbname, connect_timeout=max(1, int(timeout)), autocommit=True)

    def _db_ready(self, name: str, spec: InstanceSpec) -> bool:
        """PostgreSQL answers, and has the app's database (made the first time)."""
        import psycopg

        try:
            with self._connect_db(name, spec, "postgres") as conn:
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [spec.db_name]).fetchone()
                if not exists:
                    conn.execute(f'CREATE DATABASE "{spec.db_name}" OWNER "{spec.db_user}"')
            return True
        except psycopg.Error:
            return False

    def _redis_answers(self, name: str) -> bool:
        import redis

        try:
            client = redis.Redis(unix_socket_path=str(self.dir(name) / "run" / "redis.sock"), socket_timeout=1,
                                 socket_connect_timeout=1)
            return bool(client.ping())
        except redis.RedisError:
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
        if not self.image_exists(spec.app.image):
            raise RuntimeError_(f"the release {spec.app.image} is not built (or no longer kept)")
        processes = self._ensure_services(spec)
        processes.pop(CANDIDATE, None)
        processes.pop(RETIRED, None)
        candidate = self._app_process(name, spec, spec.app, free_port())
        self._write_spec(name, {"processes": {**processes, CANDIDATE: candidate}})
        url = f"http://127.0.0.1:{candidate['port']}"
        try:
            wait_http(lambda: self._check_started(name, CANDIDATE, candidate) or url, timeout, out=out,
                      last_words=lambda: last_lines(self.logs(name, CANDIDATE, tail=40), 4))
            if before_switch is not None:
                before_switch()
        except BaseException:
            self._write_spec(name, {"processes": processes})
            raise
        promoted = {**processes, "app": candidate}
        if "app" in processes:
            promoted[RETIRED] = processes["app"]
        self._write_spec(name, {"processes": promoted})
        return url

    def _check_started(self, name: str, role: str, process: dict) -> str:
        """'' while the role's process runs (or is about to); RuntimeError_ once it exited."""
        from .procsup import spec_key

        info = self._state(name).get("processes", {}).get(role)
        if info and info.get("key") == spec_key(process) and (info.get("restarts") or (info.get("last_exit") is not None and not info.get("running"))):
            tail = last_lines(self.logs(name, role, tail=40), 4)
            raise RuntimeError_(f"the app exited with code {info.get('last_exit')} while starting"
                                + (f": {tail}" if tail else ""))
        return ""

    @_user_errors
    def retire_app(self, name: str) -> None:
        check_name(name)
        processes = dict(self._spec(name).get("processes") or {})
        if processes.pop(RETIRED, None) is not None:
            self._write_spec(name, {"processes": processes})

    def _release_dir(self, image: str) -> Path:
        name, _, number = (image or "").partition("/")
        if not name or not number.startswith("r") or not number[1:].isdigit():
            raise RuntimeError_(f"{image!r} is not a release of the process runtime")
        return self.dir(name) / "releases" / number

    def _venv_of(self, release: Path) -> Path:
        try:
            key = (release / RELEASE_VENV).read_text().strip()
        except OSError:
            raise RuntimeError_(f"the release {release.name} has no environment (rebuild it: push again)") from None
        return self.venvs_root / key

    @_user_errors
    def image_exists(self, image: str) -> bool:
        try:
            release = self._release_dir(image)
            return release.is_dir() and (self._venv_of(release) / VENV_MARK).exists()
        except RuntimeError_:
            return False

    @_user_errors
    def prune_images(self, name: str, keep_releases: set[str]) -> list[str]:
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
                used.add(mark.read_text().strip())
            except OSError:
                pass
        for venv in self.venvs_root.glob("*") if self.venvs_root.exists() else []:
            if venv.is_dir() and venv.name not in used:
                mark = venv / VENV_MARK
                age = time.time() - (mark.stat().st_mtime if mark.exists() else venv.stat().st_mtime)
                if age > VENV_GRACE:
                    shutil.rmtree(venv, ignore_errors=True)

    # --- builds --------------------------------------------------------------------------------

    def venv_key(self, requirements: bytes) -> str:
        version = subprocess.run([self.python, "-c", "import sys; print(sys.version)"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
        lines = sorted({line.strip() for line in requirements.decode(errors="replace").splitlines() if line.strip()
                        and not line.strip().startswith("#")})
        return hashlib.sha256((version + "\n" + "\n".join(lines)).encode()).hexdigest()[:16]

    @_user_errors
    def build_release(self, name: str, number: int, ctx: Path, *, out, timeout: float, memory_mb: int = 1024,
                      cpus: float = 1.0) -> str:
        """The release's folder (the tree) and its environment (made unless an identical
        one exists). Returns the release's reference `<name>/r<number>`."""
        from instances import otree_project

        check_name(name)
        self._create(name)
        deadline = time.monotonic() + timeout
        key = self.venv_key((ctx / "requirements.txt").read_bytes())
        venv = self.venvs_root / key
        if (venv / VENV_MARK).exists():
            out(f"requirements.txt unchanged: reusing the environment {key} (nothing to install)\n")
            os.utime(venv / VENV_MARK)
        else:
            self._make_venv(name, venv, ctx / "requirements.txt", out=out, deadline=deadline)
        release = self.dir(name) / "releases" / f"r{number}"
        tmp = release.with_name(f".{release.name}.{uuid.uuid4().hex[:6]}")
        shutil.copytree(ctx, tmp, symlinks=True, ignore=shutil.ignore_patterns(*otree_project.IGNORED))
        (tmp / RELEASE_VENV).write_text(key + "\n")
        # oTree keeps its SQLite database in ./db.sqlite3: the instance's own file, across releases.
        (tmp / "db.sqlite3").unlink(missing_ok=True)
        (tmp / "db.sqlite3").symlink_to(self.dir(name) / "data" / "db.sqlite3")
        self._chown(tmp, self._ids(name), recursive=True)
        if release.exists():
            shutil.rmtree(release)  # a rebuild of the same number (a killed worker's)
        os.rename(tmp, release)
        out(f"Release folder {release.name} ready\n")
        return f"{name}/r{number}"

    def _make_venv(self, name: str, venv: Path, requirements: Path, *, out, deadline: float) -> None:
        from instances import otree_project

        self._prepare_root()
        lock_path = self.venvs_root / f".{venv.name}.lock"
        with open(lock_path, "a") as lock:
            if _locked(lock):
                out("Waiting for another build of the same requirements\n")
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (venv / VENV_MARK).exists():
                out(f"requirements.txt: the environment {venv.name} was just made by another build\n")
                return
            if venv.exists():
                shutil.rmtree(venv)  # a build killed half-way
            ids = self._ids(name)
            venv.mkdir()
            os.chmod(venv, 0o755)
            self._chown(venv, ids)
            req = venv / ".requirements.txt"
            shutil.copy(requirements, req)
            self._chown(req, ids)
            out(f"Creating the environment {venv.name} (python {self.python})\n")
            self._stream(name, [self.python, "-m", "venv", str(venv)], out=out, deadline=deadline, what="venv")
            out("pip install -r requirements.txt\n")
            env = {**self._base_env(name), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_PROGRESS_BAR": "off",
                   "PIP_ROOT_USER_ACTION": "ignore", "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"}
            text = self._stream(name, [str(venv / "bin" / "pip"), "install", "-r", str(req)], out=out,
                                deadline=deadline, what="pip", env=env)
            if text is not None:
                shutil.rmtree(venv, ignore_errors=True)
                raise otree_project.BuildFailed(otree_project.explain_pip(text) or f"pip install failed: {last_lines(text, 4)}")
            if ids is not None:  # finished: read-only to every instance
                self._chown(venv, (0, 0), recursive=True)
                subprocess.run(["chmod", "-R", "go-w", str(venv)], check=True, timeout=120)
            (venv / VENV_MARK).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))

    def _stream(self, name: str, argv: list[str], *, out, deadline: float, what: str, env=None) -> str | None:
        """Run `argv` as the instance's user, its output streamed to `out`; None on
        success, else its output (BuildFailed at the deadline)."""
        from instances import otree_project

        proc = subprocess.Popen(argv, env=env or self._base_env(name), cwd=self.dir(name) / "home",
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, umask=0o022,  # environments: readable by all
                                **self._as_user(name))
        seen = []
        timer = _Deadline(proc, deadline)
        try:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode(errors="replace")
                seen.append(line)
                out(line)
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if timer.fired:
            raise otree_project.BuildFailed(f"the build took longer than its time limit ({what})")
        return None if proc.returncode == 0 else "".join(seen)

    @_user_errors
    def introspect(self, name: str, image: str, *, timeout: float = 60) -> dict:
        from instances import otree_project

        release = self._release_dir(image)
        python = self._venv_of(release) / "bin" / "python"
        env = {**self._base_env(name), "OTREE_PRODUCTION": "1"}
        try:
            result = self._run_as(name, [str(python), "-c", otree_project.INTROSPECT, str(release)], env=env, cwd=release,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise otree_project.BuildFailed(f"reading settings.py took longer than {timeout:g} s") from None
        return otree_project.parse_introspection(result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace"))

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
                           or (component == "db" and _socket_exists(self.dir(name) / "run", ".s.PGSQL.5432")))
                found[component] = ComponentState(Health.RUNNING if answers else Health.STARTING,
                                                  note or ("" if answers else "not answering yet"))
            else:
                found[component] = ComponentState(Health.STARTING if info.get("restarts") else Health.EXITED,
                                                  f"exit code {info.get('last_exit')}")
        app = spec.get("app")
        url = f"http://127.0.0.1:{app['port']}" if app and processes.get("app") else ""
        return InstanceState(db=found["db"], redis=found["redis"], app=found["app"], app_url=url)

    # --- operations --------------------------------------------------------------------------------

    @_user_errors
    def restart_app(self, name: str) -> None:
        check_name(name)
        processes = dict(self._spec(name).get("processes") or {})
        app = processes.get("app")
        if app is None:
            return
        processes["app"] = {**app, "generation": int(app.get("generation", 0)) + 1}  # a new key: restarted
        self._write_spec(name, {"processes": processes})
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
    def backup_database(self, name: str, spec: InstanceSpec, dest: Path) -> int:
        check_name(name)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            if self.database_kind(name) == "postgresql":
                if not self._db_ready(name, spec):
                    raise RuntimeError_(f"the database of {name} is not running")
                env = {**self._base_env(None), "PGPASSWORD": spec.db_password}
                with open(tmp, "wb") as fh:
                    result = subprocess.run([str(self.pg_bin / "pg_dump"), "-Fc", "-h", str(self.dir(name) / "run"),
                                             "-U", spec.db_user, "-d", spec.db_name], stdout=fh,
                                            stderr=subprocess.PIPE, env=env, timeout=3600)
                    fh.flush()
                    os.fsync(fh.fileno())
                if result.returncode != 0:
                    raise RuntimeError_(f"pg_dump of {name} failed (exit code {result.returncode}): "
                                        f"{last_lines(result.stderr.decode(errors='replace'))}")
                with open(tmp, "rb") as fh:
                    if fh.read(5) != b"PGDMP":
                        raise RuntimeError_(f"pg_dump of {name} wrote no custom-format archive")
            else:
                source = self.dir(name) / "data" / "db.sqlite3"
                src = sqlite3.connect(f"file:{source}?mode=ro", uri=True) if source.exists() else sqlite3.connect(":memory:")
                dst = sqlite3.connect(tmp)
                try:
                    src.backup(dst)  # consistent even while the app writes
                finally:
                    dst.close()
                    src.close()
            size = tmp.stat().st_size
            os.replace(tmp, dest)
            return size
        finally:
            tmp.unlink(missing_ok=True)

    def remove_build_leftovers(self, name: str) -> None:
        """Nothing: a killed build's programs ran as the worker's children and ended with it;
        a half-made environment is made again by the next otree_project."""

    def backup_suffix(self, name: str) -> str:
        return ".dump" if self.database_kind(name) == "postgresql" else ".sqlite3"

    @_user_errors
    def reset_database(self, name: str, spec: InstanceSpec) -> None:
        check_name(name)
        if self.database_kind(name) == "postgresql":
            import psycopg

            for value in (spec.db_name, spec.db_user):
                if not SQL_IDENTIFIER.fullmatch(value or ""):
                    raise RuntimeError_(f"{value!r} is not a lowercase SQL identifier")
            try:
                with self._connect_db(name, spec, "postgres", timeout=5) as conn:
                    # WITH (FORCE) ends the app's connections first (PostgreSQL 13+).
                    conn.execute(f'DROP DATABASE IF EXISTS "{spec.db_name}" WITH (FORCE)')
                    conn.execute(f'CREATE DATABASE "{spec.db_name}" OWNER "{spec.db_user}"')
            except psycopg.Error as exc:
                raise RuntimeError_(f"resetting the database of {name} failed: {last_lines(str(exc))}") from None
        else:
            data = self.dir(name) / "data"
            for suffix in ("", "-journal", "-wal", "-shm"):
                (data / f"db.sqlite3{suffix}").unlink(missing_ok=True)
        # The app is not restarted here: the caller does that (the reconciler's restart).

    @_user_errors
    def remove(self, name: str) -> None:
        check_name(name)
        root = self.dir(name)
        if not root.exists():
            return
        user = self._meta(name).get("user")
        self._stop_supervisor(name)
        self._kill_leftovers(name)
        shutil.rmtree(root, ignore_errors=True)
        if root.exists():
            raise RuntimeError_(f"could not remove {root}")
        if user and self.own_users:
            userdel = shutil.which("userdel") or "/usr/sbin/userdel"
            subprocess.run([userdel, user], capture_output=True, timeout=30)
        self._prune_venvs()

    @_user_errors
    def logs(self, name: str, component: str = "app", tail: int = 200) -> str:
        check_name(name)
        if component not in COMPONENTS + (CANDIDATE, RETIRED):
            raise RuntimeError_(f"unknown component {component!r} (app, db or redis)")
        info = self._state(name).get("processes", {}).get(component)
        if not info or not info.get("log"):
            return ""
        return self._tail(Path(info["log"]), tail)

    @staticmethod
    def _tail(path: Path, lines: int) -> str:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 256 * 1024))
                data = fh.read()
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-max(1, int(lines)):]) + "\n"

    @_user_errors
    def owned_instances(self) -> set[str]:
        if not self.instances_root.exists():
            return set()
        return {folder.name for folder in self.instances_root.iterdir()
                if folder.is_dir() and self._meta(folder.name).get("manager") == self.manager_id}

    def processes(self, name: str) -> list[int]:
        """Pids of the instance's supervisor and of every process it runs (for tests and
        the stray-process check)."""
        state = self._state(name)
        pids = [state["supervisor"]] if self.supervisor_alive(name) and state.get("supervisor") else []
        return pids + [p["pid"] for p in (state.get("processes") or {}).values() if p.get("pid") and p.get("running")]


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


def _locked(fh) -> bool:
    """Whether another process holds the lock of the open file `fh`."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def _socket_exists(folder: Path, name: str) -> bool:
    return (folder / name).exists()
