"""`python manage.py setup_manager`: what `make run` does before labserver, as one command —
the compose install's one-shot `migrate` service.

Applies the migrations; when no superuser exists yet, creates the first lab manager and
prints its one-time password (the box labserver prints), so `docker compose logs migrate`
shows it once.
"""

import sys

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from manager.supervisor import first_superuser_box


class Command(BaseCommand):
    help = "Apply the migrations and create the first lab manager (printing its one-time password)."

    def handle(self, *args, **options):
        from manager.accounts.services import ensure_first_superuser

        call_command("migrate", interactive=False, verbosity=options["verbosity"])
        created = ensure_first_superuser()
        if created is None:
            self.stdout.write("A lab manager account exists already: no one-time password to show.\n")
            return
        user, password = created
        sys.stdout.write("\n" + first_superuser_box(settings.LAB_PUBLIC_URL, user.username, password) + "\n\n")
        sys.stdout.flush()
