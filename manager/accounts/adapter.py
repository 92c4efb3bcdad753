from types import SimpleNamespace

from allauth.account.adapter import DefaultAccountAdapter
from django.conf import settings
from django.urls import reverse


class LabAccountAdapter(DefaultAccountAdapter):
    """Accounts are created by lab managers only: no public sign-up."""

    def is_open_for_signup(self, request):
        return False

    def get_password_change_redirect_url(self, request):
        return reverse("dashboard")

    def send_mail(self, template_prefix, email, context):
        # allauth's e-mails greet "from <site name>": use the lab's name, not the Host header.
        site = SimpleNamespace(name=settings.LAB_NAME, domain=settings.LAB_PUBLIC_HOST)
        super().send_mail(template_prefix, email, {**context, "current_site": site})
