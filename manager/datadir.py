"""LAB_DATA_DIR: where the embedded default keeps all of its state.

Importable without Django settings (the settings module and `labserver` both use it).
"""

import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet

from manager.env import env_str

BASE_DIR = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    path = Path(env_str("LAB_DATA_DIR", str(BASE_DIR / "var"))).expanduser()
    if not path.is_absolute():
        path = (Path.cwd() / path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_or_create(path: Path, make) -> str:
    """Return the secret stored at `path`, creating it exactly once.

    O_EXCL makes the creation race-free when several processes start together
    (web, worker and beat all import settings at the same moment).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.parent.stat().st_mode & 0o077:  # (older data dirs made it 755)
        os.chmod(path.parent, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process may be writing it right now
            value = path.read_text().strip()
            if value:
                return value
            import time

            time.sleep(0.02)
        raise RuntimeError(f"secret file {path} is empty; delete it to regenerate")
    value = make()
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value


def django_secret_key() -> str:
    return _read_or_create(data_dir() / "secrets" / "django_secret_key", lambda: secrets.token_urlsafe(50))


def encryption_key() -> str:
    """The key that encrypts secrets at rest (Fernet)."""
    return _read_or_create(data_dir() / "secrets" / "encryption.key", lambda: Fernet.generate_key().decode())


def redis_socket_path() -> Path:
    return data_dir() / "run" / "redis.sock"


def embedded_redis_url() -> str:
    return f"unix://{redis_socket_path()}"
