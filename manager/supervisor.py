"""The one supervisor behind `manage.py labserver` (and thereby `make run`).

It starts every process the manager needs as a child, prefixes and forwards their
output, restarts a child that dies, and stops them all on Ctrl-C or SIGTERM.

A child is described by a `ChildSpec`; `default_specs()` lists them in start order.
Adding a process (the git SSH server, ...) is one more `ChildSpec(...)` line there. It
knows no app: the labserver command adds the apps' children (Caddy, `instances.proxy`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

STOP_TIMEOUT = 10.0  # seconds a stage of children gets to exit after SIGTERM
READY_TIMEOUT = 90.0  # seconds all children get to report ready at start
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a child that ran this long before dying is restarted without delay growth


@dataclass
class ChildSpec:
    """What to run. Exactly one of `argv` and `launch` is given.

    name        short label, used as the output prefix (`web    | ...`)
    argv        the command line
    env         variables added to (value None: removed from) the supervisor's environment
    launch      instead of argv: a callable(**popen_kwargs) -> Popen (e.g. the embedded Redis,
                which clears a stale socket before it starts)
    ready       callable(child) -> bool, polled until True; None means ready once started
    barrier     True: the children after this one start only once it is ready
    stop_order  children stop in increasing stop_order; equal ones stop together
    """

    name: str
    argv: list[str] | None = None
    env: dict[str, str | None] = field(default_factory=dict)
    launch: Callable[..., subprocess.Popen] | None = None
    ready: Callable[[Child], bool] | None = None
    barrier: bool = False
    stop_order: int = 5


class Child:
    def __init__(self, spec: ChildSpec):
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.reader: threading.Thread | None = None
        self.started_at = 0.0
        self.ready = False
        self.restart_at: float | None = None
        self.backoff = BACKOFF_FIRST
        self.restarts = 0
        self.recent: deque[str] = deque(maxlen=200)  # last lines, for output-based ready checks

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# --- ready checks ----------------------------------------------------------------------

def http_ok(url: str) -> Callable[[Child], bool]:
    def check(child: Child) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    return check


def output_matches(pattern: str) -> Callable[[Child], bool]:
    regex = re.compile(pattern)

    def check(child: Child) -> bool:
        return any(regex.search(line) for line in list(child.recent))

    return check


def redis_pings(socket_path: Path) -> bool:
    """Whether a Redis answers on the unix socket (within a second)."""
    import redis

    try:
        return bool(redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def redis_answers(socket_path: Path) -> Callable[[Child], bool]:
    return lambda child: redis_pings(socket_path)


# --- child process set-up -----------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    _prctl = _libc.prctl if _libc is not None else None
except (OSError, AttributeError):  # pragma: no cover - exotic libc
    _prctl = None


def _child_preexec(parent_pid: int) -> Callable[[], None] | None:
    """In the child, before exec: die with the supervisor even if it is SIGKILLed."""
    if _prctl is None:
        return None

    def preexec():
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            if exc.errno == errno.EADDRNOTAVAIL:
                raise SupervisorError(f"LAB_HOST={host} is not an address of this machine") from None
            raise
    return False


class SupervisorError(Exception):
    """A reason not to start, meant for the user."""


# --- the supervisor ---------------------------------------------------------------------------

class Supervisor:
    def __init__(self, specs: list[ChildSpec], *, out=None, cwd: Path | None = None,
                 ready_message: str = "", after_ready: Callable[[], None] | None = None,
                 stop_timeout: float = STOP_TIMEOUT, ready_timeout: float = READY_TIMEOUT):
        if len({s.name for s in specs}) != len(specs):
            raise ValueError("child names must be unique")
        self.children = [Child(s) for s in specs]
        self.out = out or sys.stdout
        self.cwd = cwd
        self.ready_message = ready_message
        self.after_ready = after_ready
        self.stop_timeout = stop_timeout
        self.ready_timeout = ready_timeout
        self.width = max([len(s.name) for s in specs] + [3])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._signals = 0

    # output
    def write(self, name: str, line: str) -> None:
        with self._lock:
            try:
                self.out.write(f"{name:<{self.width}} | {line}\n")
                self.out.flush()
            except (OSError, ValueError):  # our own stdout is gone (closed pipe): keep supervising
                pass

    def log(self, message: str) -> None:
        self.write("lab", message)

    def _forward(self, child: Child, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            child.recent.append(line)
            self.write(child.name, line)
        stream.close()

    # processes
    def _env(self, spec: ChildSpec) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        for key, value in spec.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def _spawn(self, child: Child) -> None:
        """Start (or restart) a child. Always called from the main thread: PDEATHSIG fires
        when the *thread* that forked the child ends."""
        spec = child.spec
        kwargs = dict(
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=self._env(spec), cwd=self.cwd, start_new_session=True,
            preexec_fn=_child_preexec(os.getpid()),
        )
        if spec.launch is not None:
            proc = spec.launch(**kwargs)
        else:
            proc = subprocess.Popen(spec.argv, **kwargs)
        child.proc = proc
        child.started_at = time.monotonic()
        child.ready = spec.ready is None
        child.restart_at = None
        child.recent.clear()
        child.reader = threading.Thread(target=self._forward, args=(child, proc.stdout), daemon=True,
                                        name=f"output-{spec.name}")
        child.reader.start()

    def _check_ready(self, child: Child) -> bool:
        if not child.ready and child.alive() and child.spec.ready is not None:
            try:
                child.ready = bool(child.spec.ready(child))
            except Exception as exc:  # a broken check must not take the supervisor down
                self.log(f"ready check of {child.name} failed: {exc!r}")
        return child.ready

    @staticmethod
    def _signal_group(child: Child, sig: int) -> bool:
        """Signal the child's whole process group; False when nothing is left in it."""
        if child.proc is None:
            return False
        try:
            os.killpg(child.proc.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _group_alive(self, child: Child) -> bool:
        return self._signal_group(child, 0)

    def _reap(self, child: Child) -> int | None:
        """After the child itself exited: kill what is left of its group (celery pool
        processes, shells) and collect its output thread."""
        code = child.proc.poll() if child.proc else None
        if child.proc is not None and self._group_alive(child):
            self._signal_group(child, signal.SIGKILL)
        if child.reader is not None:
            child.reader.join(timeout=2)
        return code

    @staticmethod
    def describe_exit(code: int | None) -> str:
        if code is None:
            return "exited"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name} (exit code {code})"
            except ValueError:
                return f"was killed by signal {-code} (exit code {code})"
        return f"exited with code {code}"

    def _handle_deaths(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is None:
                continue
            if child.restart_at is None and child.proc.poll() is not None:
                code = self._reap(child)
                ran = now - child.started_at
                if ran >= STABLE_AFTER:
                    child.backoff = BACKOFF_FIRST
                delay = child.backoff
                child.backoff = min(child.backoff * 2, BACKOFF_MAX)
                child.restart_at = now + delay
                child.ready = False
                self.log(f"{child.name} (pid {child.proc.pid}) {self.describe_exit(code)} after {ran:.1f} s; "
                         f"restarting in {delay:.0f} s")
            elif child.restart_at is not None and now >= child.restart_at and not self._stop.is_set():
                old = child.proc.pid
                self._spawn(child)
                child.restarts += 1
                self.log(f"{child.name} restarted (pid {child.proc.pid}, was {old}; restart #{child.restarts})")

    # start / run / stop
    def _on_signal(self, signum, frame) -> None:
        self._signals += 1
        self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    def _wait_ready(self, children: list[Child], deadline: float) -> bool:
        while not self._stop.is_set():
            self._handle_deaths()
            if all(self._check_ready(c) for c in children):
                return True
            if time.monotonic() > deadline:
                return False
            self._stop.wait(0.1)
        return False

    def start(self) -> bool:
        """Start the children in order, honouring barriers. True when all became ready."""
        deadline = time.monotonic() + self.ready_timeout
        pending: list[Child] = []
        for child in self.children:
            if self._stop.is_set():
                return False
            self._spawn(child)
            self.log(f"started {child.name} (pid {child.pid})")
            pending.append(child)
            if child.spec.barrier:
                if not self._wait_ready([child], deadline):
                    if not self._stop.is_set():
                        raise SupervisorError(f"{child.name} did not become ready within {self.ready_timeout:.0f} s")
                    return False
        ok = self._wait_ready(pending, deadline)
        if not ok and not self._stop.is_set():
            waiting = ", ".join(c.name for c in pending if not c.ready)
            self.log(f"WARNING: still not ready after {self.ready_timeout:.0f} s: {waiting} (see its output above)")
        return ok

    def run(self) -> int:
        """Start everything, supervise until a signal, stop everything. Returns the exit code."""
        installed = threading.current_thread() is threading.main_thread()
        old_handlers = {}
        if installed:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            try:
                ok = self.start()
            except SupervisorError as exc:
                self.log(f"ERROR: {exc}")
                self.stop()
                return 1
            if not self._stop.is_set():
                if ok and self.ready_message:
                    self.log(self.ready_message)
                if self.after_ready is not None:
                    self.after_ready()
            while not self._stop.is_set():
                self._handle_deaths()
                self._stop.wait(0.2)
            self.log("stopping ...")
            self.stop()
            self.log("stopped")
            return 0
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        """SIGTERM each stage of children (process groups), wait bounded, then SIGKILL."""
        for order in sorted({c.spec.stop_order for c in self.children}):
            # A child waiting for its restart was reaped already (its group SIGKILLed).
            stage = [c for c in self.children
                     if c.spec.stop_order == order and c.proc is not None and c.restart_at is None]
            for child in stage:
                if child.alive() or self._group_alive(child):
                    self._signal_group(child, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            while time.monotonic() < deadline:
                if self._signals >= 2:  # a second Ctrl-C: do not wait any longer
                    break
                if not any(c.alive() or self._group_alive(c) for c in stage):
                    break
                time.sleep(0.05)
            for child in stage:
                if child.alive() or self._group_alive(child):
                    self.log(f"{child.name} did not stop within {self.stop_timeout:.0f} s: killing it")
                    self._signal_group(child, signal.SIGKILL)
                    try:
                        child.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:  # pragma: no cover
                        pass
                self._reap(child)


# --- the manager's children ---------------------------------------------------------------------

def default_specs() -> list[ChildSpec]:
    """The processes of the manager, in start order."""
    from django.conf import settings

    from manager import datadir, embedded_redis

    py = sys.executable
    host, port = settings.LAB_HOST, settings.LAB_PORT
    url_host = f"[{host}]" if ":" in host else host
    # Children see the same, absolute data dir even when LAB_DATA_DIR was relative.
    env = {"LAB_DATA_DIR": str(settings.DATA_DIR), "DJANGO_SETTINGS_MODULE": "manager.settings"}
    specs: list[ChildSpec] = []
    if settings.LAB_EMBEDDED_REDIS:
        sock = datadir.redis_socket_path()
        specs.append(ChildSpec(
            "redis",
            launch=lambda **kw: embedded_redis.start(settings.DATA_DIR, sock, **kw),
            ready=redis_answers(sock), barrier=True, stop_order=9,
        ))
    # The workers' prefork pools (hard time limits need processes) shrink when idle: a
    # process is forked from the worker's main process (Django and the tasks already
    # imported) when a task arrives, up to the maximum, and goes 10-20 s after the last
    # task (Celery's autoscaler, checking every AUTOSCALE_KEEPALIVE s; with its default of
    # 30 s the beat's sweeps every 60 s kept the worker's pool up most of the time); an idle
    # manager keeps only the main processes (compose, idle: worker 199 -> 110 MiB, bots
    # 182 -> 109 MiB, bench/compose_up.py).
    worker_env = {**env, "AUTOSCALE_KEEPALIVE": "10"}
    specs += [
        ChildSpec("web", [py, "-m", "daphne", "-b", host, "-p", str(port), "manager.asgi:application"],
                  env=env, ready=http_ok(f"http://{url_host}:{port}/healthz/"), stop_order=0),
        ChildSpec("worker", [py, "-m", "celery", "-A", "manager", "worker", "-l", "INFO",
                             "--autoscale", "2,0", "-n", "worker@%h"],
                  env=worker_env, ready=output_matches(r"\bready\.$"), stop_order=1),
        ChildSpec("bots", [py, "-m", "celery", "-A", "manager", "worker", "-l", "INFO", "-Q", "bots",
                           "--autoscale", f"{settings.LAB_BOT_RUNS},0", "-n", "bots@%h"],
                  env=worker_env, ready=output_matches(r"\bready\.$"), stop_order=1),
        ChildSpec("beat", [py, "-m", "celery", "-A", "manager", "beat", "-l", "INFO",
                           "-s", str(settings.CELERY_BEAT_SCHEDULE_FILENAME)],
                  env=env, ready=output_matches(r"beat: Starting"), stop_order=1),
        ChildSpec("sshd", [py, "manage.py", "git_sshd"], env=env,
                  ready=output_matches(r"git SSH server listening"), stop_order=0),
    ]
    return specs  # the labserver command adds Caddy (the apps' part, instances.proxy)


def first_superuser_box(url: str, username: str, password: str) -> str:
    lines = [
        "First lab manager account created",
        "",
        f"  URL:       {url}/",
        f"  Username:  {username}",
        f"  Password:  {password}",
        "",
        "This is a one-time password: you will be asked to",
        "change it at first login. It is not shown again.",
    ]
    width = max(len(line) for line in lines) + 4
    border = "+" + "=" * width + "+"
    return "\n".join([border, *[f"|  {line:<{width - 2}}|" for line in lines], border])
