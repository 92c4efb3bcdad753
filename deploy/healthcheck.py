#!/usr/bin/env python3
"""Health checks of the compose install's manager services (docker-compose.yml):
`python deploy/healthcheck.py NAME`, exit 0 when healthy. Standard library only, and no
Django: a check costs a few milliseconds, except the workers' (a Celery ping, ~2 s)."""

import http.client
import os
import socket
import subprocess
import sys

TIMEOUT = 10


def _loopback(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def web() -> bool:
    conn = http.client.HTTPConnection(_loopback(os.environ.get("LAB_HOST", "127.0.0.1")),
                                      int(os.environ.get("LAB_PORT", "8000")), timeout=TIMEOUT)
    conn.request("GET", "/healthz/")
    return conn.getresponse().status == 200


def sshd() -> bool:
    host = _loopback(os.environ.get("LAB_HOST", "127.0.0.1"))
    with socket.create_connection((host, int(os.environ.get("LAB_SSH_PORT", "2222"))), timeout=TIMEOUT) as sock:
        return sock.recv(64).startswith(b"SSH-")


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=TIMEOUT)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(self.path)


def caddy() -> bool:
    conn = _UnixHTTP(os.path.join(os.environ["LAB_DATA_DIR"], "caddy", "admin.sock"))
    conn.request("GET", "/config/")
    return conn.getresponse().status == 200


def _celery(node: str) -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "manager", "inspect", "ping", "--timeout", "5",
         "-d", f"{node}@{socket.gethostname()}"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, timeout=60)
    return result.returncode == 0


def beat() -> bool:
    import glob  # the schedule file (its name gets a suffix from the dbm module), written once beat runs

    return bool(glob.glob(os.path.join(glob.escape(os.environ["LAB_DATA_DIR"]), "celerybeat-schedule*")))


CHECKS = {"web": web, "sshd": sshd, "caddy": caddy, "beat": beat,
          "worker": lambda: _celery("worker"), "bots": lambda: _celery("bots")}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CHECKS:
        sys.exit(f"usage: healthcheck.py {{{','.join(CHECKS)}}}")
    try:
        ok = CHECKS[sys.argv[1]]()
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", with the reason in docker inspect
        print(f"{sys.argv[1]}: {exc}")
        ok = False
    sys.exit(0 if ok else 1)
