"""Bearer-token authentication for the JSON API.

Only `Authorization: Bearer <personal access token>` is accepted; the session cookie of
the web interface is ignored, so the API has no CSRF surface. Only a hash of each token
is stored (see `manager.accounts.services.authenticate_token`), and tokens of
deactivated accounts are refused there.

A token of a user who still has to replace a generated one-time password
(`must_change_password`) keeps working: tokens can only be created by someone who
already holds the account (after logging in, or by a lab manager on the server's command
line), the forced password change exists to retire a password that was shown on a
screen, not a token, and scripts cannot answer a password form anyway.
"""

from django.http import HttpRequest
from ninja.errors import AuthenticationError, AuthorizationError
from ninja.security import HttpBearer

from manager.accounts.models import User
from manager.accounts.services import authenticate_token

MISSING = (
    "Authentication required: send the header 'Authorization: Bearer <token>' with a personal "
    "access token (create one under Settings → Access tokens, or with `manage.py create_token`)."
)
WRONG_SCHEME = "The Authorization header must have the form 'Authorization: Bearer <token>'."
EMPTY = "The Authorization header has no token after 'Bearer'."
INVALID = "The access token is invalid or has been revoked, or its account is deactivated."
CHALLENGE = 'Bearer realm="oTree Lab Manager API"'  # the WWW-Authenticate header of every 401


class TokenAuthenticationError(AuthenticationError):
    """A 401; `error` goes into the WWW-Authenticate header (RFC 6750)."""

    def __init__(self, message: str, error: str = ""):
        super().__init__(401, message)
        self.error = error

    @property
    def www_authenticate(self) -> str:
        value = CHALLENGE
        if self.error:
            value += f', error="{self.error}"'
        return value


class BearerToken(HttpBearer):
    """`Authorization: Bearer <token>`; with `managers_only` (a phrase such as "list
    accounts") also refuses non-superusers with 403 before the request body is read."""

    openapi_bearerFormat = "personal access token"
    openapi_description = (
        "A personal access token, created under Settings → Access tokens or with "
        "`python manage.py create_token USERNAME`."
    )

    def __init__(self, managers_only: str | None = None):
        super().__init__()
        self.managers_only = managers_only

    def __call__(self, request: HttpRequest) -> User:
        value = request.headers.get(self.header, "").strip()
        if not value:
            raise TokenAuthenticationError(MISSING)
        scheme, _, raw = value.partition(" ")
        if scheme.lower() != "bearer":
            raise TokenAuthenticationError(WRONG_SCHEME, "invalid_request")
        raw = raw.strip()
        if not raw:
            raise TokenAuthenticationError(EMPTY, "invalid_request")
        return self.authenticate(request, raw)

    def authenticate(self, request: HttpRequest, token: str) -> User:
        user = authenticate_token(token)
        if user is None:
            raise TokenAuthenticationError(INVALID, "invalid_token")
        # Views and services see the token's owner, never the session's user.
        request.user = user
        if self.managers_only and not user.is_superuser:
            raise AuthorizationError(403, f"Only lab managers may {self.managers_only}.")
        return user


def managers_only(action: str) -> BearerToken:
    return BearerToken(managers_only=action)
