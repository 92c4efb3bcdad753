"""`python manage.py labservice NAME`: one of labserver's children on its own, in the
foreground — what each service of `docker-compose.yml` runs.

The command line is the supervisor's (`manager.supervisor.default_specs()` and the
labserver's Caddy), so `make run` and the compose install never drift apart: a child
given by a command line is exec'd (it becomes this process: signals and exit code are
its own); so is Caddy, after the checks `instances.proxy.launch_caddy` makes (TLS
settings, certificate files, ports: a bad configuration stops the service with the
reason), with a detached helper that loads the routes from the database once it
answers. Any other launched child (the embedded Redis) runs as a child that gets this
process's SIGTERM/SIGINT and whose exit code this command returns.
"""

import os
import signal
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from manager.management.commands.labserver import caddy_spec
from manager.supervisor import ChildSpec, SupervisorError, default_specs


def service_specs() -> dict[str, ChildSpec]:
    """{name: spec} of every child labserver would start with these settings."""
    return {spec.name: spec for spec in [*default_specs(), caddy_spec()]}


def service_env(spec: ChildSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for key, value in spec.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def exec_caddy(env: dict[str, str]) -> None:
    """Caddy as this process (its signals and exit code, and no Python of ~80 MB beside it
    while it runs): `proxy.prepare_caddy()` (as for labserver's child), then a detached
    helper process loads the routes from the database once Caddy answers, and exits."""
    from django.db import connections

    from instances import proxy

    try:
        argv = proxy.prepare_caddy()  # TLS settings, certificate files, ports: TLSConfigError is a CommandError
    except proxy.CaddyMissing as exc:
        raise CommandError(str(exc)) from None
    sock = proxy.admin_socket()
    connections.close_all()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:  # the helper: forks again, so that the init process reaps it, not Caddy
        try:
            if os.fork() == 0:
                try:
                    if proxy.wait_until_up():
                        proxy.sync_routes()
                    else:
                        sys.stderr.write(f"Caddy did not answer on {sock}; its routes are loaded by the next sweep\n")
                finally:
                    sys.stderr.flush()
                    os._exit(0)
        finally:
            os._exit(0)
    os.wait()  # the first helper exits at once
    os.execve(argv[0], argv, proxy.caddy_env(env))


class Command(BaseCommand):
    help = "Run one of the manager's processes (web, worker, bots, beat, sshd, caddy) in the foreground."

    requires_system_checks = []  # the exec'd program checks what it needs (web, workers: Django's own checks)

    def add_arguments(self, parser):
        parser.add_argument("name", help="the child's name in labserver (web, worker, bots, beat, sshd, caddy)")

    def handle(self, *args, name, **options):
        specs = service_specs()
        spec = specs.get(name)
        if spec is None:
            extra = ""
            if name == "redis":
                extra = " (the embedded Redis runs only when REDIS_URL is unset; the compose install has its own redis service)"
            raise CommandError(f"unknown service {name!r}{extra}; the services are: {', '.join(specs)}")
        os.chdir(settings.BASE_DIR)
        env = service_env(spec)
        if spec.argv is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execvpe(spec.argv[0], spec.argv, env)  # never returns
        if name == "caddy":
            exec_caddy(env)  # never returns
        try:
            proc = spec.launch(env=env)
        except SupervisorError as exc:
            raise CommandError(str(exc)) from None

        def forward(signum, frame):
            if proc.poll() is None:
                proc.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)
        code = proc.wait()
        if code:
            sys.exit(code if code > 0 else 128 - code)
