"""`python manage.py labservice NAME`: one of labserver's children on its own, in the
foreground — what each service of `docker-compose.yml` runs.

The command line is the supervisor's (`manager.supervisor.default_specs()` and the
labserver's Caddy), so `make run` and the compose install never drift apart: a child
given by a command line is exec'd (it becomes this process: signals and exit code are
its own); Caddy (started by `instances.proxy.launch_caddy`, which loads the routes from
the database once it answers) runs as a child that gets this process's SIGTERM/SIGINT
and whose exit code this command returns (launch_caddy first checks the TLS settings,
certificate files and ports: a bad configuration stops the service with the reason).
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
