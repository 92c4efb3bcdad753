"""The old runtime's `from .base import ...`: today's interface module (unchanged names)."""

from instances.runtime.base import *  # noqa: F401,F403
from instances.runtime.base import (  # noqa: F401 - names the old module imports
    CANDIDATE, COMPONENTS, POSTGRES_TUNING, RETIRED, SQL_IDENTIFIER, AppSpec, ComponentState, Health, InstanceSpec,
    InstanceState, RuntimeError_, check_name, free_port, last_lines, user_errors, wait_http, wait_services,
)


def setting(name: str, default):
    """The old runtime's settings helper (today's backends read `settings.X`)."""
    from django.conf import settings

    return getattr(settings, name, default)
