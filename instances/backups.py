"""Where backups live: LAB_DATA_DIR/backups, and the copy of every finished backup in the
lab's second folder, LAB_BACKUP_COPY_DIR/<instance name>/ (README "Scheduled backups").

A copy is written atomically (a temporary file, fsync, rename), mode 0600, in a folder of
mode 0700 per instance; nothing inside LAB_BACKUP_COPY_DIR is followed when it is a link
(the folder itself may be one: it is the lab's setting). A copy that fails is logged and
leaves `Backup.copied_at` empty; the backup itself stays, and the scheduler tries again.
"""

import logging
import os
import secrets
from pathlib import Path

from django.conf import settings
from django.utils import timezone

log = logging.getLogger(__name__)

COPY_CHUNK = 1024 * 1024
DONE = "done"  # Backup.Status.DONE (the models import this module: `row` is an instances.models.Backup)


def backup_dir() -> Path:
    path = settings.DATA_DIR / "backups"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)  # participants' data: readable by the manager's user only
    return path


def _plain(name: str) -> bool:
    """A single file or folder name (what the manager generated; nothing that climbs)."""
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


def files_of(row) -> list[str]:
    """The backup's files in LAB_DATA_DIR/backups: the dump and the data export beside it."""
    return [name for name in (row.filename, row.data_filename) if _plain(name)]


def _instance_folder(instance_name: str, *, create: bool) -> int | None:
    """A descriptor of LAB_BACKUP_COPY_DIR/<instance_name> (made with mode 0700 when
    `create`); None when it does not exist and is not to be made. Never a link."""
    if not _plain(instance_name):
        raise OSError(f"not a folder name: {instance_name!r}")
    root = os.open(settings.LAB_BACKUP_COPY_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if create:
            try:
                os.mkdir(instance_name, 0o700, dir_fd=root)
            except FileExistsError:
                pass
        try:
            return os.open(instance_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
        except FileNotFoundError:
            if create:
                raise
            return None
    finally:
        os.close(root)


def _copy_into(source: Path, folder: int, name: str) -> None:
    """`source` into the folder `folder` as `name`: a temporary file first, synced, then
    renamed over `name` (a reader never sees half a file)."""
    temporary = f".{name}.{secrets.token_hex(4)}.partial"
    src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=folder)
        try:
            try:
                os.fchmod(dst, 0o600)
                while chunk := os.read(src, COPY_CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(dst, view):]
                os.fsync(dst)
            finally:
                os.close(dst)
            os.rename(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:  # a failure or a time limit: no half copy stays
            try:
                os.unlink(temporary, dir_fd=folder)
            except OSError:
                pass
            raise
    finally:
        os.close(src)
    try:
        os.fsync(folder)  # the rename itself on disk (some network file systems refuse: the copy is there)
    except OSError:
        pass


def copy_backup(row) -> bool:
    """Copy a finished backup's files to LAB_BACKUP_COPY_DIR/<instance>/ and record when
    (`copied_at`). False (and a log line saying why) when there is no copy folder, the
    backup is not finished, or the copy failed; never raises for a failed copy."""
    if not settings.LAB_BACKUP_COPY_DIR or row.status != DONE or not files_of(row):
        return False
    try:
        folder = _instance_folder(row.instance_name, create=True)
        try:
            for name in files_of(row):
                _copy_into(backup_dir() / name, folder, name)
        finally:
            os.close(folder)
    except OSError as exc:
        log.warning("copying backup %s to LAB_BACKUP_COPY_DIR (%s) failed: %s", row.filename,
                    settings.LAB_BACKUP_COPY_DIR, exc)
        return False
    row.copied_at = timezone.now()
    type(row).objects.filter(pk=row.pk).update(copied_at=row.copied_at)
    return True


def remove_files(row) -> None:
    """Remove a backup's files, here and in the copy folder (the row is the caller's)."""
    for name in files_of(row):
        (backup_dir() / name).unlink(missing_ok=True)
    if not settings.LAB_BACKUP_COPY_DIR:
        return
    try:
        folder = _instance_folder(row.instance_name, create=False)
        if folder is None:
            return
        try:
            for name in files_of(row):
                try:
                    os.unlink(name, dir_fd=folder)
                except FileNotFoundError:
                    pass
        finally:
            os.close(folder)
    except OSError as exc:
        log.warning("removing the copy of backup %s from LAB_BACKUP_COPY_DIR failed: %s", row.filename, exc)


# --- restoring and uploading (README "Restore") ------------------------------------------------

SUFFIX_LABEL = {".dump": "a PostgreSQL dump (pg_dump -Fc)", ".sqlite3": "an SQLite database"}
DATABASE_LABEL = {".dump": "a PostgreSQL database", ".sqlite3": "an SQLite database"}


def file_format(path: Path) -> str:
    """".dump" or ".sqlite3" by the file's first bytes (read by the manager, no link
    followed; the file is never opened as a database here), "" for anything else."""
    from instances.runtime.base import backup_format

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as fh:
        return backup_format(fh.read(16))


def restore_problem(backup, suffix: str | None) -> str:
    """Why `backup` cannot be restored into an instance whose backups end in `suffix`
    (None: any database backup will do, the instance being made for it), or ""."""
    if backup.kind == "repository":  # (by value: the models import this module)
        return (f"{backup.filename} is the git history of a deleted instance, not a database backup: "
                "it cannot be restored into a database")
    if backup.status != DONE:
        return (f"the backup {backup.filename or backup.pk} is {backup.get_status_display()}: only a complete "
                "backup can be restored")
    if not backup.filename or not _plain(backup.filename) or not backup.path.is_file():
        return f"the file of the backup {backup.filename or backup.pk} is missing from LAB_DATA_DIR/backups"
    found = file_format(backup.path)
    if not found:
        return f"{backup.filename} is neither a PostgreSQL dump (pg_dump -Fc) nor an SQLite database"
    if suffix is not None and found != suffix:
        return (f"{backup.filename} is {SUFFIX_LABEL[found]}, but the instance has "
                f"{DATABASE_LABEL.get(suffix, suffix)}: only {SUFFIX_LABEL.get(suffix, suffix)} can be restored into it")
    return ""


def upload_name(instance_name: str, suffix: str) -> str:
    """A generated name for an uploaded backup (never the uploaded file's own name)."""
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    return f"{instance_name}-{stamp}-upload-{secrets.token_hex(3)}{suffix}"
