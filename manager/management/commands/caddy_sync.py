"""`python manage.py caddy_sync`: load Caddy's routes from the database now.

labserver does this whenever Caddy starts, every release switch and the sweep (every
minute) do it too; this is for an operator who wants it at once.
"""

import json

from django.core.management.base import BaseCommand, CommandError

from instances import proxy


class Command(BaseCommand):
    help = "Rebuild the reverse proxy's (Caddy's) routes from the database and load them."

    def handle(self, *args, **options):
        result = proxy.sync_routes()
        self.stdout.write(json.dumps(result))
        if not result.get("loaded") and result.get("reason") != "unchanged":
            raise CommandError(f"routes not loaded: {result.get('reason')}")
