"""`manage.py git_sshd`: the git service (started by labserver as its `sshd` child): the
git-over-SSH server and the hook service that runs every push's hooks (SSH and HTTPS)."""

import asyncio
import errno

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Serve git push/fetch over SSH on LAB_HOST:LAB_SSH_PORT until stopped."
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("--host", default=settings.LAB_HOST)
        parser.add_argument("--port", type=int, default=settings.LAB_SSH_PORT)

    def handle(self, *args, host, port, **options):
        from instances.git import hookservice
        from instances.git.repos import hook_socket_path
        from instances.git.sshserver import host_key_path, start_server

        async def main():
            try:
                server = await start_server(host, port)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise CommandError(f"Port {port} on {host} is already in use: set LAB_SSH_PORT to a free port "
                                       "for git over SSH.") from None
                raise CommandError(f"Cannot listen on {host}:{port} for git over SSH: {exc}") from None
            hooks = await hookservice.start()
            self.stdout.write(f"git SSH server listening on {host}:{port} (host key {host_key_path()}); "
                              f"git hooks on {hook_socket_path()}")
            self.stdout.flush()
            async with server, hooks:
                await asyncio.gather(server.wait_closed(), hooks.serve_forever())

        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            pass
