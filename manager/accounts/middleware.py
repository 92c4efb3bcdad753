from django.shortcuts import redirect
from django.urls import reverse

# Pages a user with a one-time password may still reach.
_ALLOWED_PREFIXES = ("/accounts/password/change/", "/accounts/logout/", "/static/")


class ForcePasswordChangeMiddleware:
    """Until a user with a generated one-time password picks their own, every page
    leads to the change-password form."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        if (
            user is not None
            and user.is_authenticated
            and getattr(user, "must_change_password", False)
            and not request.path.startswith(_ALLOWED_PREFIXES)
            and not request.path.startswith("/api/")
        ):
            return redirect(reverse("account_change_password") + "?first=1")
        return self.get_response(request)
