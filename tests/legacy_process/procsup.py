"""The per-instance process supervisor of the `process` runtime.

    python -I -S procsup.py INSTANCE_DIR [TOKEN]

One supervisor per instance keeps the instance's processes (PostgreSQL, Redis, the oTree
app, a deploy's candidate app) running as `INSTANCE_DIR/spec.json` says, independent of
the manager: the manager may restart (or die) and the instance goes on; the next manager
re-adopts it through the files below. Standard library only, so it starts fast and small.

Files in INSTANCE_DIR:
  spec.json        desired processes: {"processes": {role: {argv, env, cwd, stop_signal,
                   memory_mb, stop_timeout}}}; written by the manager, re-read on SIGHUP
                   (and every few seconds)
  state.json       what runs: {role: {key, pid, started, restarts, last_exit, log}}, the
                   supervisor's pid; rewritten on every change
  supervisor.lock  held (flock) for the supervisor's whole life: at most one per instance,
                   and "alive?" is answered without trusting a pid
  logs/<key>.log   each process's output

A process is identified by the hash of its spec: the manager promotes a candidate app by
giving the role "app" the candidate's spec (same hash, so nothing restarts). A process
that exits is restarted with a growing back-off; every process runs in its own process
group, which is killed as a whole when the process stops or dies (no orphans, e.g. oTree's
timeout worker). Children die with the supervisor (PR_SET_PDEATHSIG on Linux); a new
supervisor first kills the process groups its predecessor left (checked by start time).
SIGTERM stops everything (apps first, the database last) and exits.
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
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_json(path: str, default):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return default


class Child:
    def __init__(self, key: str, spec: dict, log_path: str):
        self.key, self.spec, self.log_path = key, spec, log_path
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.start_ticks: int | None = None
        self.restarts = 0
        self.failures = 0  # exits in a row without running STABLE_AFTER seconds
        self.next_start = 0.0
        self.last_exit: int | None = None

    def start(self) -> None:
        memory = self.spec.get("memory_mb")
        pdeath = signal.Signals[self.spec.get("stop_signal", "SIGTERM")]

        def prepare():  # in the child, before exec
            os.setsid()  # its own process group: stopped as a whole
            if sys.platform.startswith("linux"):
                try:
                    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(pdeath), 0, 0, 0)
                except (OSError, AttributeError):
                    pass
            if memory:
                limit = int(memory) * 2**20
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        try:
            os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
            log = open(self.log_path, "ab", buffering=0)
        except OSError:
            log = open(os.devnull, "ab", buffering=0)
        try:
            self.proc = subprocess.Popen(
                self.spec["argv"], cwd=self.spec.get("cwd") or None, env=self.spec.get("env") or {},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=prepare, close_fds=True,
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
                "log": self.log_path, "argv0": self.spec["argv"][0], "role": role}


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
        if not pid:
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
        wanted = {role: (spec_key(p), p) for role, p in (spec.get("processes") or {}).items()
                  if isinstance(p, dict) and isinstance(p.get("argv"), list) and p["argv"]}
        keys = {key for key, _ in wanted.values()}
        # Stop what no role names any more, before starting anything new (ports, data dirs).
        for key in [k for k in self.children if k not in keys]:
            self.children.pop(key).stop()
            self.dirty = True
        for role, (key, pspec) in wanted.items():
            if key not in self.children:
                child = Child(key, pspec, os.path.join(self.logs, f"{role}-{key}.log"))
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


def main(argv: list[str]) -> int:
    root = os.path.abspath(argv[1])
    token = argv[2] if len(argv) > 2 else ""
    # Detach: the starter (a worker of the manager) gets its child back at once; this
    # process lives on in a session of its own, adopted by init.
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    lock = open(os.path.join(root, "supervisor.lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another supervisor runs this instance
    os.umask(0o077)
    return Supervisor(root, token).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
