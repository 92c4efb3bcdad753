from pathlib import Path

from django.conf import settings


def backup_dir() -> Path:
    path = settings.DATA_DIR / "backups"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)  # participants' data: readable by the manager's user only
    return path
