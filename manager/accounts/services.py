"""Accounts: the rules for users, SSH keys and access tokens.

Views, the JSON API and management commands call these; none of them repeats a rule.
Each function validates everything before it writes anything, so bad input never
leaves a half-saved account.
"""

import secrets
from datetime import timedelta

from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.utils import timezone

from manager import throttle
from manager.accounts.models import AccessToken, SSHKey, User, hash_token
from manager.accounts.sshkeys import parse_public_key
from manager.audit.services import record
from manager.texts import check_text
from manager.jobs import services as jobs


class Conflict(ValidationError):
    """The input is well-formed but collides with existing data (HTTP 409)."""


class NotAllowed(Exception):
    """The action is refused for a reason the user must be told."""


# --- users ----------------------------------------------------------------------------

def _text_errors(**fields: tuple[str, str]) -> dict[str, list[str]]:
    """{field: [message]} for each (value, label) that is no text a database column or a
    terminal holds (manager.texts: NUL, lone surrogates, control characters)."""
    errors = {}
    for field, (value, label) in fields.items():
        try:
            check_text(value, field=field, label=label, single_line=True)
        except ValidationError as exc:
            errors.update(exc.message_dict)
    return errors


def _clean_user_fields(*, username: str, email: str, name: str, instance: User | None = None) -> dict:
    username = username or ""
    email = email or ""
    name = name or ""
    errors = _text_errors(username=(username, "The username"), email=(email, "The e-mail address"),
                          name=(name, "The name"))
    if errors:
        raise ValidationError(errors)
    username, email, name = username.strip(), email.strip(), name.strip()
    errors: dict[str, list[str]] = {}
    conflicts: dict[str, list[str]] = {}
    if not username:
        errors["username"] = ["A username is required."]
    elif len(username) > 150:
        errors["username"] = [f"At most 150 characters (this one has {len(username)})."]
    else:
        try:
            UnicodeUsernameValidator()(username)
        except ValidationError:
            errors["username"] = ["Use only letters, digits and @ . + - _ (no spaces)."]
    if not email:
        errors["email"] = ["An e-mail address is required: the invitation is sent there."]
    elif len(email) > 254:
        errors["email"] = ["At most 254 characters."]
    else:
        try:
            validate_email(email)
        except ValidationError:
            errors["email"] = [f"{email!r} is not a valid e-mail address."]
    if len(name) > 150:
        errors["name"] = [f"At most 150 characters (this one has {len(name)})."]
    others = User.objects.exclude(pk=instance.pk) if instance else User.objects.all()
    if "username" not in errors and others.filter(username__iexact=username).exists():
        conflicts["username"] = [f"The username {username!r} is already taken."]
    if "email" not in errors and others.filter(email__iexact=email).exists():
        conflicts["email"] = [f"The e-mail address {email} already belongs to another account."]
    if errors:
        raise ValidationError({**errors, **conflicts})
    if conflicts:
        raise Conflict(conflicts)
    return {"username": username, "email": email, "name": name}


def create_user(actor, *, username: str, email: str, name: str = "", is_superuser: bool = False, request=None) -> User:
    """Create an account without a password and e-mail its owner a link to set one."""
    fields = _clean_user_fields(username=username, email=email, name=name)
    try:
        with transaction.atomic():
            user = User(**fields, is_superuser=is_superuser, is_staff=is_superuser)
            user.set_unusable_password()
            user.save()
            record(actor, "user.create", user, f"created {user.role.lower()} account {user.username}", request,
                   email=user.email, is_superuser=is_superuser)
            send_invitation(actor, user)
    except IntegrityError:  # a concurrent request took the name between check and insert
        raise Conflict({"username": ["That username or e-mail address was just taken."]}) from None
    return user


def send_invitation(actor, user: User):
    from manager.accounts.tasks import send_invitation as task

    if not user.is_active:
        raise NotAllowed(f"{user.username} is deactivated; activate the account before sending an invitation.")
    return jobs.start(task, user=actor, kind="accounts.invite", label=f"Invitation to {user.username}",
                      args=[user.pk], link=f"/users/{user.pk}/")


KEEP = object()
MAX_BOT_BUDGET = 1_000_000.0  # USD a month


def clean_bot_budget(value) -> float | None:
    """A monthly bot budget in USD: a number >= 0, or None (the lab's default)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or not 0 <= value <= MAX_BOT_BUDGET:
        raise ValidationError({"bot_monthly_budget_usd": [
            f"must be a number of US dollars from 0 to {MAX_BOT_BUDGET:g}, or empty for the lab's default"]})
    return float(value)


def update_user(actor, user: User, *, username: str, email: str, name: str, bot_monthly_budget_usd=KEEP,
                request=None) -> User:
    fields = _clean_user_fields(username=username, email=email, name=name, instance=user)
    if bot_monthly_budget_usd is not KEEP:
        fields["bot_monthly_budget_usd"] = clean_bot_budget(bot_monthly_budget_usd)
    changed = {k: v for k, v in fields.items() if getattr(user, k) != v}
    if not changed:
        return user
    with transaction.atomic():
        for key, value in changed.items():
            setattr(user, key, value)
        user.save(update_fields=list(changed))
        record(actor, "user.update", user, "changed " + ", ".join(sorted(changed)), request, changed=sorted(changed))
    return user


def set_bot_budget(actor, user: User, value, request=None) -> User:
    """The user's monthly bot budget (USD; None: the lab's default). Lab managers only."""
    if actor is None or not actor.is_superuser:
        raise NotAllowed("Only lab managers may set bot budgets.")
    value = clean_bot_budget(value)
    if user.bot_monthly_budget_usd != value:
        with transaction.atomic():
            user.bot_monthly_budget_usd = value
            user.save(update_fields=["bot_monthly_budget_usd"])
            record(actor, "user.update", user, f"set {user.username}'s monthly bot budget to "
                   + (f"${value:g}" if value is not None else "the lab's default"), request,
                   changed=["bot_monthly_budget_usd"])
    return user


def _other_active_superusers(user: User):
    return User.objects.filter(is_superuser=True, is_active=True).exclude(pk=user.pk)


def set_superuser(actor, user: User, value: bool, request=None) -> User:
    if user.is_superuser == value:
        return user
    if not value:
        if actor is not None and user.pk == actor.pk:
            raise NotAllowed("You cannot remove your own lab-manager rights; ask another lab manager.")
        if user.is_active and not _other_active_superusers(user).exists():
            raise NotAllowed(f"{user.username} is the last active lab manager; promote someone else first.")
    with transaction.atomic():
        user.is_superuser = user.is_staff = value
        user.save(update_fields=["is_superuser", "is_staff"])
        record(actor, "user.promote" if value else "user.demote", user,
               f"{'promoted' if value else 'demoted'} {user.username}", request)
    return user


def set_active(actor, user: User, value: bool, request=None) -> User:
    if user.is_active == value:
        return user
    if not value:
        if actor is not None and user.pk == actor.pk:
            raise NotAllowed("You cannot deactivate your own account.")
        if user.is_superuser and not _other_active_superusers(user).exists():
            raise NotAllowed(f"{user.username} is the last active lab manager and cannot be deactivated.")
    with transaction.atomic():
        user.is_active = value
        user.save(update_fields=["is_active"])
        record(actor, "user.activate" if value else "user.deactivate", user,
               f"{'reactivated' if value else 'deactivated'} {user.username}", request)
    if not value:
        end_sessions(user)
    return user


def delete_user(actor, user: User, request=None) -> None:
    if actor is not None and user.pk == actor.pk:
        raise NotAllowed("You cannot delete your own account; ask another lab manager.")
    if user.is_superuser and user.is_active and not _other_active_superusers(user).exists():
        raise NotAllowed(f"{user.username} is the last active lab manager and cannot be deleted.")
    owned = list(user.instances.values_list("name", flat=True)[:5]) if hasattr(user, "instances") else []
    if owned:
        raise NotAllowed(f"{user.username} owns the instances {', '.join(owned)}: transfer or delete them first.")
    with transaction.atomic():
        record(actor, "user.delete", user, f"deleted account {user.username}", request, email=user.email)
        end_sessions(user)
        user.delete()


def end_sessions(user: User) -> None:
    """Log the user out everywhere (after deactivation or deletion)."""
    from django.contrib.sessions.models import Session

    for session in Session.objects.filter(expire_date__gt=timezone.now()).iterator():
        if str(session.get_decoded().get("_auth_user_id")) == str(user.pk):
            session.delete()


def generate_password() -> str:
    return secrets.token_urlsafe(15)


# --- SSH keys -------------------------------------------------------------------------

MAX_SSH_KEY = 16000


def add_ssh_key(user: User, *, title: str, key: str, request=None) -> SSHKey:
    check_text(title or "", field="title", label="The title", single_line=True)
    check_text(key or "", field="key", max_length=MAX_SSH_KEY, label="The key")
    parsed = parse_public_key(key)
    title = (title or "").strip() or parsed.comment or parsed.key_type
    check_text(title, field="title", label="The title (the key's comment)", single_line=True)
    if len(title) > 100:
        raise ValidationError({"title": [f"At most 100 characters (this one has {len(title)})."]})
    existing = SSHKey.objects.filter(fingerprint=parsed.fingerprint).first()
    if existing is not None:
        if existing.user_id == user.pk:
            raise Conflict({"key": [f"You have already added this key (as {existing.title!r})."]})
        raise Conflict({"key": ["This key is already in use by another account. Each person needs their own key."]})
    try:
        with transaction.atomic():
            obj = SSHKey.objects.create(
                user=user, title=title, key_type=parsed.key_type, public_key=parsed.public_key,
                bits=parsed.bits, fingerprint=parsed.fingerprint,
            )
            record(user, "sshkey.add", obj, f"added SSH key {title!r}", request, fingerprint=parsed.fingerprint)
    except IntegrityError:
        raise Conflict({"key": ["This key was just added."]}) from None
    return obj


def remove_ssh_key(user: User, key: SSHKey, request=None) -> None:
    with transaction.atomic():
        record(user, "sshkey.remove", key, f"removed SSH key {key.title!r}", request, fingerprint=key.fingerprint)
        key.delete()


# --- personal access tokens -----------------------------------------------------------

LAST_USED_RESOLUTION = timedelta(minutes=1)


def create_token(user: User, *, name: str, actor=None, request=None,
                 throttled: bool = True) -> tuple[AccessToken, str]:
    """Return the token row and the raw token, which is shown once and never stored.
    `throttled=False`: the machine's operator (`manage.py create_token`), never rate-limited."""
    name = check_text(name or "", field="name", label="The name", single_line=True).strip()
    if not name:
        raise ValidationError({"name": ["Give the token a name, e.g. the laptop or script it is for."]})
    if len(name) > 100:
        raise ValidationError({"name": [f"At most 100 characters (this one has {len(name)})."]})
    raw = AccessToken.generate()
    with throttle.take("token", user if throttled else None), transaction.atomic():
        token = AccessToken.objects.create(user=user, name=name, token_hash=hash_token(raw), prefix=raw[:10])
        record(actor or user, "token.create", token, f"created access token {name!r} for {user.username}", request)
    return token, raw


def revoke_token(user: User, token: AccessToken, request=None) -> None:
    with transaction.atomic():
        record(user, "token.revoke", token, f"revoked access token {token.name!r}", request)
        token.delete()


def authenticate_token(raw: str) -> User | None:
    """The active user a raw token belongs to, or None. Records when it was last used."""
    if not raw or len(raw) > 200:
        return None
    token = AccessToken.objects.select_related("user").filter(token_hash=hash_token(raw)).first()
    if token is None or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        AccessToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token.user


def ensure_first_superuser() -> tuple[User, str] | None:
    """When no superuser exists, create `admin` with a one-time password (changed at first
    login) and return it with the password; otherwise None."""
    if User.objects.filter(is_superuser=True).exists():
        return None
    username = "admin"
    n = 1
    while User.objects.filter(username__iexact=username).exists():
        n += 1
        username = f"admin{n}"
    password = generate_password()
    with transaction.atomic():
        user = User(username=username, email=f"{username}@localhost", name="Lab manager",
                    is_superuser=True, is_staff=True, must_change_password=True)
        user.set_password(password)
        user.save()
        record(None, "user.create", user, f"created first lab manager {username} (one-time password)")
    return user, password
