"""`python manage.py restore_manager FILE|- [--force]`: put back a `backup_manager`
archive — the database and the data dir — e.g. to roll back an upgrade. Stop the
manager's services first. A database that holds accounts is replaced only with --force."""

import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from manager.backup import BackupError, read_backup


class Command(BaseCommand):
    help = "Restore the manager's database and data dir from a backup_manager archive (stop the manager first)."

    def add_arguments(self, parser):
        parser.add_argument("input", help="the backup (.tar.gz), or - for stdin")
        parser.add_argument("--force", action="store_true",
                            help="replace a database that holds accounts, and the data dir (rollback)")

    def handle(self, *args, input, force, **options):
        try:
            if input == "-":
                manifest = read_backup(sys.stdin.buffer, force=force)
            else:
                path = Path(input).expanduser()
                if not path.is_file():
                    raise CommandError(f"no backup at {path}")
                with open(path, "rb") as fh:
                    manifest = read_backup(fh, force=force)
        except BackupError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Restored the manager's {manifest['database']} database and data dir from the backup "
                          f"of {manifest['created']}. Start the manager's services again (they migrate when "
                          "the code is newer).\n")
