"""/api/v1/users: accounts, for lab managers (superusers) only."""

from django.http import HttpRequest, HttpResponse
from ninja import Router, Status
from ninja.errors import HttpError

from manager.accounts import services
from manager.accounts.models import User
from manager.api.auth import managers_only
from manager.api.errors import responses
from manager.api.schemas import UserBudgetIn, UserIn, UserOut
from manager.texts import problem

router = Router(tags=["users"])


@router.get(
    "", summary="List accounts", response=responses({200: list[UserOut]}, 403), auth=managers_only("list accounts")
)
def list_users(request: HttpRequest):
    """All accounts, active and deactivated, by username."""
    return User.objects.order_by("username")


@router.post(
    "",
    summary="Create an account and send the invitation",
    response=responses({201: UserOut}, 400, 403, 409, 422),
    auth=managers_only("create accounts"),
)
def create_user(request: HttpRequest, payload: UserIn, response: HttpResponse):
    """Create an account without a password; its owner is e-mailed an invitation link to
    set one. Username and e-mail address must be unused (ignoring case): 409 otherwise."""
    user = services.create_user(
        request.auth, username=payload.username, email=payload.email, name=payload.name,
        is_superuser=payload.is_superuser, request=request,
    )
    response["Location"] = f"/api/v1/users/{user.username}"
    return Status(201, user)


@router.get(
    "/{username}", summary="One account", response=responses({200: UserOut}, 403, 404),
    auth=managers_only("view accounts"),
)
def get_user(request: HttpRequest, username: str):
    """One account, by username (ignoring case)."""
    # A NUL or lone surrogate names no account (and PostgreSQL could not compare it).
    user = User.objects.filter(username__iexact=username).first() if not problem(username) else None
    if user is None:
        raise HttpError(404, f"There is no account with the username {username!r}.")
    return user


@router.patch(
    "/{username}", summary="Change an account's monthly bot budget", response=responses({200: UserOut}, 403, 404, 422),
    auth=managers_only("change accounts"),
)
def update_user(request: HttpRequest, username: str, payload: UserBudgetIn):
    """`{"bot_monthly_budget_usd": 20}` caps what the account's bot runs spend per calendar
    month (UTC); `null` gives it the lab's default. Runs over the cap stop; new ones are
    refused until the month ends."""
    user = get_user(request, username)
    return services.set_bot_budget(request.auth, user, payload.bot_monthly_budget_usd, request=request)
