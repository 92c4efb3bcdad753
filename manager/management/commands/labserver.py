"""`python manage.py labserver`: the whole manager in one foreground process.

Starts the embedded Redis (unless REDIS_URL is set), the web server, the Celery worker
and Celery beat; forwards their output; restarts what dies; Ctrl-C stops everything.
"""

import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor

from instances import netguard, proxy
from manager import datadir
from manager.supervisor import (
    ChildSpec, Supervisor, SupervisorError, default_specs, first_superuser_box, port_in_use, redis_pings,
)


def apply_firewall() -> str:
    """The instances' firewall (instances.netguard), applied before anything starts (the
    minute sweep and every instance start keep it); returns the line labserver prints."""
    status = netguard.ensure()
    return f"firewall: {status.detail}" if status.enforced else f"WARNING firewall {status.detail}"


def caddy_preflight() -> None:
    """The checks before Caddy starts, for labserver and the compose install's caddy
    service (`manage.py labservice caddy`) alike: the TLS settings, certificate and key
    files and ports (`instances.proxy.check_tls`; raises proxy.TLSConfigError, a
    CommandError whose message names the variable and what to do)."""
    proxy.check_tls()


def caddy_spec() -> ChildSpec:
    """Caddy in front of the instances (instances.proxy): admin API on a unix socket under
    LAB_DATA_DIR; once it answers, the routes are loaded from the database."""

    def launch(**popen_kwargs):
        try:
            return proxy.launch_caddy(**popen_kwargs)
        except proxy.CaddyMissing as exc:
            raise SupervisorError(str(exc)) from None

    return ChildSpec("caddy", launch=launch, ready=lambda child: proxy.admin_answers(), stop_order=2)


class Command(BaseCommand):
    help = "Run the whole oTree Lab Manager (web, workers, scheduler, embedded Redis) until Ctrl-C."

    requires_system_checks = "__all__"

    def handle(self, *args, **options):
        self._check_migrated()
        self._check_free()
        caddy_preflight()  # LAB_TLS: certificate files and LAB_HTTPS_PORT/LAB_HTTP_PORT, before anything starts
        created = self._first_superuser()
        connections.close_all()  # the supervisor itself keeps no database connection open
        self.stdout.write(apply_firewall() + "\n")

        public_url = settings.LAB_PUBLIC_URL

        shown = []

        def show_first_superuser():
            if created is not None and not shown:
                user, password = created
                box = first_superuser_box(public_url, user.username, password)
                sys.stdout.write("\n" + box + "\n\n")
                sys.stdout.flush()
                shown.append(True)

        supervisor = Supervisor(
            [*default_specs(), caddy_spec()],
            out=sys.stdout,
            cwd=settings.BASE_DIR,
            ready_message=f"oTree Lab Manager is running on {public_url} — Ctrl-C stops it",
            after_ready=show_first_superuser,  # last, so that the children's output does not bury it
        )
        try:
            code = supervisor.run()
        finally:
            show_first_superuser()  # stopped or failed before all were ready: never lose the password
        if code:
            raise CommandError("labserver stopped because a process could not start (see above)")

    def _check_migrated(self):
        connection = connections[DEFAULT_DB_ALIAS]
        executor = MigrationExecutor(connection)
        if executor.migration_plan(executor.loader.graph.leaf_nodes()):
            raise CommandError(
                "The database is not up to date. Run `python manage.py migrate` first (`make run` does it for you)."
            )

    def _check_free(self):
        host, port = settings.LAB_HOST, settings.LAB_PORT
        try:
            busy = port_in_use(host, port)
        except SupervisorError as exc:
            raise CommandError(str(exc)) from None
        if busy:
            raise CommandError(
                f"Port {port} on {host} is already in use: is another labserver (or another program) running? "
                f"Stop it, or start this one with another port, e.g. LAB_PORT={port + 1} make run"
            )
        if settings.LAB_EMBEDDED_REDIS:
            sock = datadir.redis_socket_path()
            if sock.exists() and redis_pings(sock):
                raise CommandError(
                    f"A Redis already answers on {sock}: another labserver uses LAB_DATA_DIR={settings.DATA_DIR}. "
                    "Stop it first, or use another LAB_DATA_DIR."
                )

    def _first_superuser(self):
        from manager.accounts.services import ensure_first_superuser

        return ensure_first_superuser()
