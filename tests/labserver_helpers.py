"""Run the real `manage.py labserver` as a user would, in its own data dir and port.

Used by the slow tests and the notification benchmark. Every wait has a deadline, and
`stop()` always leaves no process behind.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from tests.waits import wait_until

BASE_DIR = Path(__file__).resolve().parent.parent
READY_LINE = r"oTree Lab Manager is running on "


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def new_data_dir() -> Path:
    # Short: the embedded Redis socket lives under it (unix socket paths are limited).
    return Path(tempfile.mkdtemp(prefix="lab-", dir="/tmp"))


def child_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("REDIS_URL", "DATABASE_URL", "LAB_PUBLIC_URL", "LAB_PUBLIC_HOST", "LAB_SMTP_HOST"):
        env.pop(key, None)
    env.update(LAB_DATA_DIR=str(data_dir), LAB_HOST="127.0.0.1", LAB_PORT=str(port), PYTHONUNBUFFERED="1",
               LAB_SSH_PORT=str(free_port()))  # several labservers (tests, engineers) on one machine
    env.update(extra)
    return env


_migrated: list[Path] = []  # the data dir migrated once in this process (its database is the template)


def migrate(data_dir: Path, port: int, timeout: float = 180) -> None:
    """A migrated database in `data_dir`, as `manage.py migrate` leaves it: migrated once per
    process (in a data dir of its own), then that fresh file is copied (migrate takes ~5 s).
    Only the database: the labserver makes its data dir's secrets itself, as on a first start."""
    if not _migrated:
        template = Path(tempfile.mkdtemp(prefix="lab-migrated-", dir="/tmp"))
        atexit.register(shutil.rmtree, template, ignore_errors=True)
        result = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"], cwd=BASE_DIR, env=child_env(template, port),
            capture_output=True, text=True, timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{result.stdout}\n{result.stderr}")
        _migrated.append(template)
    for name in ("manager.sqlite3", "manager.sqlite3-wal"):  # (no -wal once migrate has closed it)
        if (_migrated[0] / name).exists():
            shutil.copyfile(_migrated[0] / name, Path(data_dir) / name)


class LabServer:
    """One `manage.py labserver` subprocess and everything it printed."""

    def __init__(self, data_dir: Path, port: int, echo: bool = False, **extra_env: str):
        self.data_dir = data_dir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.echo = echo
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "labserver"], cwd=BASE_DIR, env=child_env(data_dir, port, **extra_env),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._known: dict[int, psutil.Process] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if self.echo:
                print(line, flush=True)
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60, since: int = 0) -> re.Match:
        """The first match of `pattern` in an output line after line `since`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        checked = since
        with self._cond:
            while True:
                for line in self.lines[checked:]:
                    found = regex.search(line)
                    if found:
                        return found
                checked = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"labserver exited ({self.proc.returncode}) before printing {pattern!r}:\n"
                                         + self._tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"labserver did not print {pattern!r} within {timeout} s:\n" + self._tail())
                self._cond.wait(min(left, 0.5))

    def _tail(self, n: int = 80) -> str:
        return "\n".join(self.lines[-n:])

    def wait_ready(self, timeout: float = 120) -> None:
        self.wait_for(READY_LINE, timeout)
        self.remember_processes()

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def remember_processes(self) -> None:
        for p in self.descendants():
            self._known[p.pid] = p

    def known_alive(self) -> list[psutil.Process]:
        alive = []
        for p in self._known.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    def child(self, *words: str) -> psutil.Process | None:
        """The supervisor's direct child whose command line contains all `words`."""
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        for p in children:
            try:
                cmd = " ".join(p.cmdline())
            except psutil.NoSuchProcess:
                continue
            if all(w in cmd for w in words):
                return p
        return None

    def get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return resp.status, resp.read().decode()

    def terminate(self, timeout: float = 40) -> int:
        """SIGTERM the supervisor and wait for it; returns its exit code."""
        self.remember_processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"labserver did not stop within {timeout} s after SIGTERM:\n" + self._tail()) from None
        self._reader.join(timeout=5)
        return code

    def kill_everything(self) -> None:
        """Last-resort cleanup: no process of this server survives a failing test."""
        self.remember_processes()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for p in self.known_alive():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self._reader.join(timeout=5)


def first_superuser(server: LabServer, timeout: float = 120) -> tuple[str, str]:
    user = server.wait_for(r"Username:\s+(\S+)", timeout).group(1)
    password = server.wait_for(r"Password:\s+(\S+)", 10).group(1)
    return user, password


def remove_data_dir(data_dir: Path) -> None:
    shutil.rmtree(data_dir, ignore_errors=True)


def remove_instances(data_dir: Path, port: int, timeout: float = 180, **extra_env: str) -> None:
    """Remove every Docker resource (containers, networks, volumes, release images) of
    the instances of the labserver that ran in `data_dir` (its own manager id only)."""
    code = (
        "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); django.setup()\n"
        "from instances.runtime import available_runtimes\n"
        "[rt.remove(n) for rt in available_runtimes() for n in rt.owned_instances()]\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=BASE_DIR, env=child_env(data_dir, port, **extra_env),
                   timeout=timeout, capture_output=True)


class Daphne:
    """daphne alone serving the manager (manager.asgi) on 127.0.0.1:`port` with `env` (the
    test's database and data dir, as the caller sets them): for tests that need the real web
    server without labserver's other children. Output goes to `log_path`."""

    def __init__(self, port: int, env: dict[str, str], log_path: Path, timeout: float = 60):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "manager.asgi:application"],
            cwd=BASE_DIR, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz/", timeout=2) as response:
                    if response.status == 200:
                        return True
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError("daphne exited")
            return False

        try:
            wait_until(healthy, timeout, 0.1, "daphne's health check")
        except AssertionError:
            self.stop()
            raise AssertionError(f"daphne did not come up:\n{self.output()}") from None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if not self.log.closed:
            self.log.close()
