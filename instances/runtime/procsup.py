"""The per-instance process supervisor of the `process` runtime, and the launcher of
every program the runtime runs as an instance's (or a build's) user.

    python -I -S procsup.py INSTANCE_DIR [TOKEN]        the supervisor
    python -I -S procsup.py exec CONFIG_JSON ARGV...    become the user in CONFIG, exec ARGV
    python -I -S procsup.py killall UID GID [SIGNAL]    SIGKILL (or SIGNAL) to every process of UID

Standard library only, so it starts fast and small.

The supervisor runs as the manager's user (root), never as the tenant: the tenant cannot
signal it, rewrite its files or redirect its logs. One supervisor per instance keeps the
instance's processes (PostgreSQL, Redis, the oTree app, a deploy's candidate app) running
as `INSTANCE_DIR/spec.json` says, independent of the manager: the manager may restart (or
die) and the instance goes on; the next manager re-adopts it through the files below.

Files in INSTANCE_DIR (a folder of the supervisor's own user, which it checks; no one else
may write there):
  spec.json        desired state, written by the manager, re-read on SIGHUP (and every
                   few seconds): {"processes": {role: {argv, env, cwd, stop_signal,
                   memory_mb, stop_timeout}}, "identity": {"uid", "gid"} or null,
                   "cgroups": [folders], "nproc": N or null, "nice": N}
  state.json       what runs: {role: {key, pid, started, restarts, last_exit, log}}, the
                   supervisor's pid; rewritten on every change
  supervisor.lock  held (flock) for the supervisor's whole life: at most one per instance,
                   and "alive?" is answered without trusting a pid
  logs/<role>-<key>.log  each process's output, opened by the supervisor (the child only
                   gets the open file)

Before starting anything the supervisor moves itself into the instance's cgroups (so
every process of the instance counts against its process, CPU and memory limits). Each
child is started as `identity`: rlimits (address space per process, process count per
user) and priority first, then groups, gid and uid are dropped, then the parent-death
signal is set (the kernel clears it on a credential change, so it must come after), then
the working folder is entered (as the tenant: root never enters a tenant's folder).

A process is identified by the hash of its spec: the manager promotes a candidate app by
giving the role "app" the candidate's spec (same hash, so nothing restarts). A process
that exits is restarted with a growing back-off; every process runs in its own process
group, which is killed as a whole when the process stops or dies. Children die with the
supervisor (PR_SET_PDEATHSIG); a new supervisor first kills the process groups its
predecessor left (checked by start time). SIGTERM stops everything (apps first, the
database last), then kills every process left of the instance's user (one that left its
process group, e.g. a daemon) and exits.

`exec` is the same start for one-off programs of the manager (a build's pip, the settings
reader, pg_dump and the SQLite copy of a backup, initdb): it joins the given cgroups,
applies the limits, drops to the user, sets the parent-death signal, enters the folder and
execs. `killall` drops to the user and sends SIGKILL to every process that user may signal
(kill(-1)): the kernel walks the process list under a lock that also holds back fork, so a
fork loop cannot outrun it. Neither ever runs anything as uid 0.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time

ROLE_ORDER = ("app-old", "app", "app-next", "redis", "db")  # stop order: apps first, the database last
POLL = 0.2
RESPEC_EVERY = 5.0  # seconds: re-read spec.json even without SIGHUP (a lost signal heals)
MAX_BACKOFF = 30.0
STABLE_AFTER = 30.0  # a process that ran this long restarts without back-off
LOG_LIMIT = 20 * 2**20  # a log longer than this keeps its last MiB
PR_SET_PDEATHSIG = 1
KILLALL_ROUNDS = 50


def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def proc_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux), None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def write_json(path: str, data) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_json(path: str, default):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return default


# --- becoming a user ------------------------------------------------------------------------------

def join_cgroups(folders) -> None:
    """Move this process into each cgroup folder (its children are born there)."""
    for folder in folders or ():
        with open(os.path.join(folder, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))


def become(identity: dict | None, *, memory_mb=None, nproc=None, nice=0, cwd=None, pdeathsig=signal.SIGKILL,
           parent: int | None = None, umask: int | None = None) -> None:
    """Limits, then the user, then the parent-death signal, then the folder (see the module
    text). Raises OSError/ValueError when something cannot be done: the caller never runs
    the program then."""
    if memory_mb:
        limit = int(memory_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if nproc:
        resource.setrlimit(resource.RLIMIT_NPROC, (int(nproc), int(nproc)))
    if nice:
        os.nice(int(nice))
    if identity:
        uid, gid = int(identity["uid"]), int(identity["gid"])
        if uid == 0 or gid == 0:
            raise ValueError("refusing to run a program of an instance or build as root")
        os.setgroups([int(g) for g in identity.get("groups") or []])
        os.setgid(gid)
        os.setuid(uid)  # as root: real, effective and saved uid
        if os.getuid() != uid or os.geteuid() != uid:
            raise OSError("the user change did not take")
    if sys.platform.startswith("linux") and pdeathsig:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(pdeathsig), 0, 0, 0)
        except (OSError, AttributeError):
            pass
        if parent is not None and os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
    if umask is not None:
        os.umask(umask)
    if cwd:
        os.chdir(cwd)


def killall(uid: int, gid: int, sig=signal.SIGKILL) -> None:
    """In a child dropped to `uid`: `sig` to every process of that user (kill(-1) spares
    only the caller; the kernel's permission check makes sure nobody else's is hit)."""
    if int(uid) == 0:
        raise ValueError("refusing to signal every process of root")
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(int(gid))
            os.setuid(int(uid))
            for _ in range(KILLALL_ROUNDS if sig == signal.SIGKILL else 1):
                try:
                    os.kill(-1, sig)
                except ProcessLookupError:
                    break  # nothing (else) left
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


# --- the supervisor -------------------------------------------------------------------------------

class Child:
    def __init__(self, key: str, spec: dict, log_path: str, settings: dict):
        self.key, self.spec, self.log_path = key, spec, log_path
        self.settings = settings  # identity, nproc, nice (the spec's top level)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.start_ticks: int | None = None
        self.restarts = 0
        self.failures = 0  # exits in a row without running STABLE_AFTER seconds
        self.next_start = 0.0
        self.last_exit: int | None = None

    def start(self) -> None:
        pdeath = signal.Signals[self.spec.get("stop_signal", "SIGTERM")]
        me = os.getpid()

        def prepare():  # in the child, before exec (the supervisor is single-threaded)
            become(self.settings.get("identity"), memory_mb=self.spec.get("memory_mb"),
                   nproc=self.settings.get("nproc"), nice=self.settings.get("nice") or 0,
                   cwd=self.spec.get("cwd") or None, pdeathsig=pdeath, parent=me, umask=0o077)

        try:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            log = os.fdopen(fd, "ab", buffering=0)
        except OSError:
            log = open(os.devnull, "ab", buffering=0)
        try:
            self.proc = subprocess.Popen(
                self.spec["argv"], env=self.spec.get("env") or {}, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=prepare, close_fds=True, start_new_session=True,
            )
        except (OSError, subprocess.SubprocessError, ValueError) as exc:  # e.g. a program that is gone
            log.write(f"[supervisor] cannot start {self.spec['argv'][0]}: {exc}\n".encode())
            self.proc = None
            self.last_exit = 127
            self._schedule_restart()
            return
        finally:
            log.close()
        self.started = time.monotonic()
        self.start_ticks = proc_start_ticks(self.proc.pid)

    def _schedule_restart(self) -> None:
        self.failures += 1
        self.next_start = time.monotonic() + min(MAX_BACKOFF, 0.5 * 2 ** (self.failures - 1))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reap(self) -> bool:
        """True when the process has exited since the last look (its group is killed)."""
        if self.proc is None or self.proc.poll() is None:
            return False
        self.last_exit = self.proc.returncode
        _kill_group(self.proc.pid, signal.SIGKILL)  # what it left behind
        if time.monotonic() - self.started >= STABLE_AFTER:
            self.failures = 0
        self._schedule_restart()
        self.restarts += 1
        self.proc = None
        return True

    def stop(self, timeout: float | None = None) -> None:
        if self.proc is None:
            return
        sig = signal.Signals[self.spec.get("stop_signal", "SIGTERM")]
        timeout = float(self.spec.get("stop_timeout", 10) if timeout is None else timeout)
        if self.proc.poll() is None:
            _kill_group(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    def describe(self, role: str) -> dict:
        return {"key": self.key, "pid": self.proc.pid if self.proc else None, "start_ticks": self.start_ticks,
                "running": self.alive(), "restarts": self.restarts, "last_exit": self.last_exit,
                "log": os.path.basename(self.log_path), "argv0": self.spec["argv"][0], "role": role}


def _kill_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_leftovers(state: dict) -> None:
    """The process groups a dead predecessor left behind. A group is ours when its leader
    is the recorded process (same start time) or gone: a number in use as a process group
    is never given to a new process, so nobody else can own it."""
    for info in (state.get("processes") or {}).values():
        pid, ticks = info.get("pid"), info.get("start_ticks")
        if not isinstance(pid, int) or pid <= 1:
            continue
        now = proc_start_ticks(pid)
        if now is None or now == ticks:
            _kill_group(pid, signal.SIGKILL)


class Supervisor:
    def __init__(self, root: str, token: str = ""):
        self.root = root
        self.token = token  # written into state.json: the manager knows this supervisor answered
        self.spec_path = os.path.join(root, "spec.json")
        self.state_path = os.path.join(root, "state.json")
        self.logs = os.path.join(root, "logs")
        self.children: dict[str, Child] = {}  # by key
        self.roles: dict[str, str] = {}  # role -> key
        self.settings: dict = {}
        self.cgroups: list[str] = []
        self.stopping = False
        self.reload = True
        self.last_spec = 0.0
        self.dirty = True
        self.serial = None  # the spec's serial last applied (the manager waits for it)

    def on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self.reload = True
        else:
            self.stopping = True

    def apply_spec(self) -> None:
        spec = read_json(self.spec_path, None)
        self.last_spec = time.monotonic()
        if spec is None:
            return
        if spec.get("serial") != self.serial:
            self.serial = spec.get("serial")
            self.dirty = True
        cgroups = [c for c in spec.get("cgroups") or [] if isinstance(c, str)]
        if cgroups != self.cgroups:
            try:
                join_cgroups(cgroups)  # before anything starts: every process of the instance is inside
                self.cgroups = cgroups
            except OSError as exc:
                print(f"[supervisor] cannot join the instance's cgroups: {exc}", file=sys.stderr, flush=True)
        settings = {"identity": spec.get("identity"), "nproc": spec.get("nproc"), "nice": spec.get("nice")}
        wanted = {role: (spec_key(p), p) for role, p in (spec.get("processes") or {}).items()
                  if isinstance(p, dict) and isinstance(p.get("argv"), list) and p["argv"]}
        keys = {key for key, _ in wanted.values()}
        # Stop what no role names any more, before starting anything new (ports, data dirs).
        for key in [k for k in self.children if k not in keys]:
            self.children.pop(key).stop()
            self.dirty = True
        self.settings = settings
        for role, (key, pspec) in wanted.items():
            if key not in self.children:
                child = Child(key, pspec, os.path.join(self.logs, f"{role}-{key}.log"), settings)
                self.children[key] = child
                child.start()
                self.dirty = True
        if {r: k for r, (k, _) in wanted.items()} != self.roles:
            self.roles = {r: k for r, (k, _) in wanted.items()}
            self.dirty = True

    def tick(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.reap():
                self.dirty = True
            if child.proc is None and now >= child.next_start:
                child.settings = self.settings
                child.start()
                self.dirty = True
            if child.proc is not None:
                _trim_log(child.log_path)

    def write_state(self) -> None:
        processes = {role: self.children[key].describe(role) for role, key in self.roles.items() if key in self.children}
        write_json(self.state_path, {"supervisor": os.getpid(), "token": self.token, "serial": self.serial,
                                     "processes": processes, "updated": time.time()})
        self.dirty = False

    def stop_all(self) -> None:
        by_role = {key: role for role, key in self.roles.items()}
        order = sorted(self.children, key=lambda k: ROLE_ORDER.index(by_role[k]) if by_role.get(k) in ROLE_ORDER else 0)
        for key in order:
            self.children[key].stop()
        self.children.clear()
        self.roles = {}
        identity = self.settings.get("identity")
        if identity and int(identity.get("uid", 0)) not in (0, os.getuid()):
            killall(identity["uid"], identity["gid"])  # what left its process group (a daemon)
        self.write_state()

    def run(self) -> int:
        # A signal wakes the loop at once (the manager waits for a new spec to be applied).
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        kill_leftovers(read_json(self.state_path, {}))
        self.write_state()
        while not self.stopping:
            if self.reload or time.monotonic() - self.last_spec >= RESPEC_EVERY:
                self.reload = False
                self.apply_spec()
            self.tick()
            if self.dirty:
                self.write_state()
            if select.select([wake_r], [], [], POLL)[0]:
                os.read(wake_r, 512)
        self.stop_all()
        return 0


def _trim_log(path: str) -> None:
    try:
        if os.path.getsize(path) <= LOG_LIMIT:
            return
        with open(path, "rb") as fh:
            fh.seek(-2**20, os.SEEK_END)
            tail = fh.read()
        with open(path, "r+b") as fh:  # the child appends (O_APPEND): it goes on at the new end
            fh.write(tail)
            fh.truncate(len(tail))
    except OSError:
        pass


def _own_folder(root: str) -> bool:
    """The instance folder belongs to this process's user and no one else may write there."""
    try:
        info = os.lstat(root)
    except OSError:
        return False
    return info.st_uid == os.geteuid() and not info.st_mode & 0o022 and os.path.isdir(root) and not os.path.islink(root)


def supervise(argv: list[str]) -> int:
    root = os.path.abspath(argv[1])
    token = argv[2] if len(argv) > 2 else ""
    if not _own_folder(root):
        print(f"[supervisor] {root} is not a folder of this user closed to others: not supervising it",
              file=sys.stderr, flush=True)
        return 2
    # Detach: the starter (a worker of the manager) gets its child back at once; this
    # process lives on in a session of its own, adopted by init.
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    os.umask(0o077)
    logs = os.path.join(root, "logs")
    os.makedirs(logs, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(root, "supervisor.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    lock = os.fdopen(fd, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another supervisor runs this instance
    return Supervisor(root, token).run()


def exec_as(argv: list[str]) -> int:
    """`exec CONFIG ARGV...`: CONFIG = {"identity", "cgroups", "memory_mb", "nproc", "nice",
    "cwd", "parent", "umask", "own_stdin"}."""
    config = json.loads(argv[2])
    program = argv[3:]
    if not program:
        print("procsup exec: no program", file=sys.stderr)
        return 2
    try:
        # A pipe made by the manager belongs to it: a program that opens /dev/stdin (initdb's
        # --pwfile) as the user may not. `own_stdin`: the (small) input is moved into a
        # pipe made after the user change.
        data = os.read(0, 65536) if config.get("own_stdin") else None
        join_cgroups(config.get("cgroups"))
        become(config.get("identity"), memory_mb=config.get("memory_mb"), nproc=config.get("nproc"),
               nice=config.get("nice") or 0, cwd=config.get("cwd"), parent=config.get("parent"),
               umask=config.get("umask"))
        if data is not None:
            read_end, write_end = os.pipe()
            os.write(write_end, data)
            os.close(write_end)
            os.dup2(read_end, 0)
            os.close(read_end)
        os.execvp(program[0], program)
    except (OSError, ValueError) as exc:
        print(f"procsup exec: cannot start {program[0]}: {exc}", file=sys.stderr, flush=True)
        return 126


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "exec":
        return exec_as(argv)
    if len(argv) in (4, 5) and argv[1] == "killall":
        killall(int(argv[2]), int(argv[3]), signal.Signals[argv[4]] if len(argv) == 5 else signal.SIGKILL)
        return 0
    return supervise(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
