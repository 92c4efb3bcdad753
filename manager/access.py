"""Access helpers for views (healthchecks style): one decorator per rule."""

from functools import wraps

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied


def superuser_required(view):
    """Lab managers only: anonymous users go to the login page, others get 403."""

    @login_required
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.is_superuser:
            raise PermissionDenied("Only lab managers may open this page.")
        return view(request, *args, **kwargs)

    return wrapper
