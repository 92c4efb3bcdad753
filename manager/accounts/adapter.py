from types import SimpleNamespace

from allauth.account.adapter import DefaultAccountAdapter
from allauth.core.internal.httpkit import clean_client_ip
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
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

    def get_client_ip(self, request):
        # Behind LAB_PROXY_HOPS proxies the client is the X-Forwarded-For entry that many
        # from the end. A shorter header means the request skipped the outer proxies (it
        # reached an inner one directly): its first entry is then the address that proxy
        # saw, the real client. (allauth itself would answer such a request with a 500.)
        try:
            return super().get_client_ip(request)
        except ImproperlyConfigured:
            first = request.headers.get("x-forwarded-for", "").split(",")[0]
            ip = clean_client_ip(first) if first.strip() else None
            ip = ip or clean_client_ip(request.META.get("REMOTE_ADDR") or "")
            if not ip:
                raise PermissionDenied("Unable to determine client IP address") from None
            return ip
