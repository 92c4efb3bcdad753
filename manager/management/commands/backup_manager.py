"""`python manage.py backup_manager FILE|-`: the manager's database and data dir in one
.tar.gz (see manager/backup.py); `-` writes it to stdout (e.g. out of a container:
`docker compose exec -T worker python manage.py backup_manager - > lab-backup.tar.gz`)."""

import os
import sys
import tempfile
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from manager.backup import BackupError, write_backup


class Command(BaseCommand):
    help = "Back up the manager: its database (pg_dump or SQLite's backup API) and its data dir, as one .tar.gz."

    def add_arguments(self, parser):
        parser.add_argument("output", help="the file to write (.tar.gz), or - for stdout")

    def handle(self, *args, output, **options):
        if output == "-":
            if sys.stdout.isatty():
                raise CommandError("refusing to write the backup to a terminal: redirect stdout to a file")
            try:
                write_backup(sys.stdout.buffer)
                sys.stdout.buffer.flush()
            except BackupError as exc:
                raise CommandError(str(exc)) from None
            return
        path = Path(output).expanduser().resolve()
        if path.is_dir():
            raise CommandError(f"{path} is a folder: give the backup's file name, e.g. {path}/lab-backup.tar.gz")
        if not path.parent.is_dir():
            raise CommandError(f"the folder {path.parent} does not exist")
        # Written beside the target and renamed at the end: never a half-written backup under its name.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), 0o600)  # it holds the secrets keys
                manifest = write_backup(fh, outputs=(Path(tmp), path))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BackupError as exc:
            raise CommandError(str(exc)) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        size = path.stat().st_size
        self.stdout.write(f"Backed up the manager ({manifest['database']} database and {manifest['data_dir']}) "
                          f"to {path} ({size / 1e6:.1f} MB).\n")
