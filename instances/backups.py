from pathlib import Path

from django.conf import settings


def backup_dir() -> Path:
    path = settings.DATA_DIR / "backups"
    path.mkdir(parents=True, exist_ok=True)
    return path
