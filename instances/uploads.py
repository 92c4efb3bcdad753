"""Uploaded files (a backup made elsewhere): written to a temporary file as they arrive
(0600, in the backups folder, so storing one is a rename), never held in memory, and
refused past LAB_BACKUP_UPLOAD_MAX_MB — the rest of the body is read and dropped, so the
client reads the refusal. `request.upload_refused` then says why (the view answers 413)."""

import os
import tempfile

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler, StopUpload

from instances.backups import backup_dir


def upload_limit() -> int:
    return settings.LAB_BACKUP_UPLOAD_MAX_MB * 1024 * 1024


def too_large_message() -> str:
    return (f"The file is larger than the {settings.LAB_BACKUP_UPLOAD_MAX_MB} MB an upload may have "
            "(LAB_BACKUP_UPLOAD_MAX_MB); nothing was stored.")


class LimitedFile(UploadedFile):
    """An upload on disk at `path` (removed by `discard`, or moved by the one who keeps it)."""

    def __init__(self, path: str, name: str, size: int, content_type: str | None):
        super().__init__(open(path, "rb"), name=name, content_type=content_type, size=size)
        self.path = path

    def temporary_file_path(self):
        return self.path

    def close(self) -> None:
        """Also at the end of every request (Django closes its uploaded files): a file no
        one kept (moved away) goes, whatever view got it (a 404, a form refused)."""
        try:
            super().close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    discard = close


class LimitedUploadHandler(FileUploadHandler):
    chunk_size = 1024 * 1024

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        fd, self._path = tempfile.mkstemp(prefix=".upload-", suffix=".partial", dir=backup_dir())
        self._fh = os.fdopen(fd, "wb")
        self._size = 0

    def receive_data_chunk(self, raw_data, start):
        self._size += len(raw_data)
        if self._size > upload_limit():
            self._abandon()
            self.request.upload_refused = too_large_message()
            raise StopUpload(connection_reset=False)  # the rest is read and dropped
        self._fh.write(raw_data)
        return None

    def file_complete(self, file_size):
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return LimitedFile(self._path, self.file_name, file_size, self.content_type)

    def upload_interrupted(self):
        self._abandon()

    def _abandon(self):
        fh = getattr(self, "_fh", None)
        if fh is not None and not fh.closed:
            fh.close()
        path = getattr(self, "_path", None)
        if path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


STALE_SECONDS = 24 * 3600


def sweep_stale(max_age: float = STALE_SECONDS) -> int:
    """Temporary upload files older than `max_age` (a web process killed mid-upload): removed
    by the sweep. Returns how many."""
    import time

    removed = 0
    folder = backup_dir()
    for path in folder.glob(".upload-*.partial"):
        try:
            if path.is_file() and not path.is_symlink() and time.time() - path.lstat().st_mtime > max_age:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed
