"""`python manage.py create_token USERNAME [--name NAME]`: print a new personal access
token, and nothing else, on stdout (so a script can capture it)."""

from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from manager.accounts import services
from manager.accounts.models import User


class Command(BaseCommand):
    help = "Create a personal access token (JSON API, HTTPS git) for USERNAME and print it."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", help='What the token is for (default: "created on the command line <date>").')

    def handle(self, *args, username, name=None, **options):
        user = User.objects.filter(username__iexact=username.strip()).first()
        if user is None:
            raise CommandError(f"There is no account with the username {username!r}.")
        if not user.is_active:
            raise CommandError(
                f"The account {user.username} is deactivated; its tokens would be refused. Reactivate it first."
            )
        if name is None:
            name = f"created on the command line {timezone.localtime():%Y-%m-%d %H:%M}"
        try:
            # The audit log names "system" as the creator: whoever runs this on the server.
            _, raw = services.create_token(user, name=name, actor=AnonymousUser(), throttled=False)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        self.stdout.write(raw)
