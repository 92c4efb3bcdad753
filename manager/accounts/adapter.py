from allauth.account.adapter import DefaultAccountAdapter


class LabAccountAdapter(DefaultAccountAdapter):
    """Accounts are created by lab managers only: no public sign-up."""

    def is_open_for_signup(self, request):
        return False
