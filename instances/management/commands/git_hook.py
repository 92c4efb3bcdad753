"""`manage.py git_hook pre-receive|post-receive`: run by the instances' bare repositories
(installed by instances.git.repos.prepare_repo); not meant to be run by hand."""

import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Git hook of an instance repository (called by git during a push)."
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("hook", choices=["pre-receive", "post-receive"])

    def handle(self, *args, hook, **options):
        from instances.git.hooks import run

        try:
            code = run(hook)
        except BrokenPipeError:  # the pusher pressed Ctrl-C: the deploy goes on without us
            code = 1
        sys.stdout.flush()
        sys.exit(code)
