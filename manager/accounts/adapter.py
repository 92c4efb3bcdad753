from allauth.account.adapter import DefaultAccountAdapter


class LabAccountAdapter(DefaultAccountAdapter):
    """Accounts are created by lab managers only: no public sign-up."""

    def is_open_for_signup(self, request):
        return False

    def get_password_change_redirect_url(self, request):
        from django.urls import reverse

        return reverse("dashboard")
