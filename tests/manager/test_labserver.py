"""`manage.py labserver` run as a user runs it: real Redis, daphne, Celery worker and beat."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import redis

from tests.labserver_helpers import (
    BASE_DIR, LabServer, child_env, first_superuser, free_port, migrate, new_data_dir, remove_data_dir,
)
from tests.waits import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def lab_dir():
    data_dir = new_data_dir()
    yield data_dir
    remove_data_dir(data_dir)


def _socket_unused(path) -> bool:
    if not path.exists():
        return True
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return True
    return False


def test_first_start_prints_password_restarts_dead_worker_and_stops_cleanly_then_a_second_start_keeps_it(lab_dir):
    """The first start (its one-time password, a worker restarted, SIGTERM stops all), then
    a second start on the same data dir: no new password, and a third labserver on its port
    refuses to start while the second keeps serving."""
    port = free_port()
    migrate(lab_dir, port)
    server = LabServer(lab_dir, port)
    try:
        username, password = first_superuser(server)
        assert username == "admin"
        assert len(password) >= 12
        assert "change it at first login" in server.output
        server.wait_ready()
        assert server.get("/healthz/") == (200, "ok")
        for name in ("redis", "web", "worker", "beat"):
            assert f"started {name} (pid" in server.output

        # Every child runs in its own process group (the terminal's Ctrl-C reaches only the supervisor).
        worker = server.child("celery", "worker")
        assert worker is not None, server.output
        assert os.getpgid(worker.pid) == worker.pid != os.getpgid(server.proc.pid)

        # A worker that dies is restarted, and the log says so.
        mark = server.mark()
        old_pid = worker.pid
        worker.kill()
        server.wait_for(rf"worker \(pid {old_pid}\) was killed by SIGKILL", 15, since=mark)
        server.wait_for(rf"worker restarted \(pid \d+, was {old_pid}", 30, since=mark)
        new_worker = wait_until(
            lambda: (w := server.child("celery", "worker")) and w.pid != old_pid and w, 30, 0.2, "a new worker"
        )
        assert new_worker.is_running()
        server.wait_for(r"worker@\S+ ready\.", 60, since=mark)  # and it serves again
        assert server.get("/healthz/") == (200, "ok")

        # SIGTERM stops everything: no child survives, Redis' socket is gone, exit code 0.
        server.remember_processes()
        remembered = server.known_alive()
        assert len(remembered) >= 4
        assert server.terminate() == 0
        wait_until(lambda: not server.known_alive(), 10, 0.2, "every child of the supervisor gone")
        assert _socket_unused(lab_dir / "run" / "redis.sock")
        assert "lab    | stopped" in server.output
        with pytest.raises(OSError):
            server.get("/healthz/", timeout=2)
    finally:
        server.kill_everything()

    second = LabServer(lab_dir, port)
    try:
        second.wait_ready()
        assert "Password:" not in second.output
        assert "First lab manager account" not in second.output

        # A third one on the same port refuses to start, saying why.
        third = subprocess.run(
            [sys.executable, "manage.py", "labserver"], cwd=BASE_DIR, env=child_env(lab_dir, port),
            capture_output=True, text=True, timeout=60,
        )
        assert third.returncode != 0
        assert f"Port {port}" in third.stderr and "already in use" in third.stderr
        assert second.get("/healthz/") == (200, "ok")  # and the running one is untouched
        assert second.terminate() == 0
        assert not second.known_alive()
    finally:
        second.kill_everything()
    assert not psutil.pid_exists(second.proc.pid) or psutil.Process(second.proc.pid).status() == psutil.STATUS_ZOMBIE


def test_external_redis_every_child_and_a_killed_supervisor_takes_its_children(lab_dir, tmp_path):
    """With REDIS_URL set, labserver starts no Redis of its own and everything uses the given
    one; the git SSH server and the bot-run worker start beside web, worker and beat; and when
    the supervisor is killed outright (SIGKILL: no cleanup of its own) every child goes too
    (PR_SET_PDEATHSIG), none left behind."""
    from manager import embedded_redis

    redis_dir = Path(tempfile.mkdtemp(prefix="xr-", dir="/tmp"))  # short: a unix socket path
    sock = redis_dir / "run" / "redis.sock"
    external = embedded_redis.start(redis_dir, sock, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        embedded_redis.wait_ready(sock, timeout=10, proc=external)
        port = free_port()
        migrate(lab_dir, port)
        ssh_port = free_port()
        server = LabServer(lab_dir, port, REDIS_URL=f"unix://{sock}", LAB_SSH_PORT=str(ssh_port))
        server.wait_ready()
        assert server.get("/healthz/") == (200, "ok")
        for name in ("web", "worker", "bots", "beat", "sshd"):
            assert f"started {name} (pid" in server.output, name
        assert "started redis" not in server.output and not (lab_dir / "run" / "redis.sock").exists()
        bots = server.child("celery", "-Q", "bots")
        sshd = server.child("manage.py", "git_sshd")
        assert bots is not None and sshd is not None, server.output
        server.wait_for(r"bots@\S+ ready\.", 60)
        with socket.create_connection(("127.0.0.1", ssh_port), timeout=10) as conn:  # the git SSH server
            conn.settimeout(10)
            assert conn.recv(64).startswith(b"SSH-2.0-")
        # The broker and the cache are the external Redis.
        client = redis.Redis(unix_socket_path=str(sock), socket_timeout=5)
        wait_until(lambda: any(key.startswith(b"_kombu.binding.") for key in client.keys("*")), 30, 0.2,
                   "the workers' queues in the external Redis")
        assert {b"_kombu.binding.celery", b"_kombu.binding.bots"} <= set(client.keys("_kombu.binding.*"))

        # SIGKILL the supervisor: its children die with it.
        server.remember_processes()
        children = server.known_alive()
        assert len(children) >= 5, children
        server.proc.kill()
        server.proc.wait(timeout=10)
        wait_until(lambda: not server.known_alive(), 30, 0.2, "every child gone after the supervisor was killed")
        assert external.poll() is None and client.ping()  # the external Redis is not the labserver's to stop
    finally:
        if server is not None:
            server.kill_everything()
        external.terminate()
        external.wait(timeout=10)
        shutil.rmtree(redis_dir, ignore_errors=True)
