"""Audit events for what happens through django-allauth's own views."""

from allauth.account.signals import password_changed, password_reset, password_set
from allauth.mfa.signals import authenticator_added, authenticator_removed
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver

from manager.audit.services import record


@receiver(user_logged_in)
def _logged_in(sender, request, user, **kwargs):
    record(user, "auth.login", user, f"{user.username} logged in", request)


@receiver(user_logged_out)
def _logged_out(sender, request, user, **kwargs):
    if user is not None:
        record(user, "auth.logout", user, f"{user.username} logged out", request)


@receiver(user_login_failed)
def _login_failed(sender, credentials, request=None, **kwargs):
    login = str(credentials.get("username") or credentials.get("email") or "")[:100]
    record(None, "auth.login_failed", None, f"failed login as {login!r}", request, login=login)


def _password_changed_by_user(request, user, what):
    if user.must_change_password:
        user.must_change_password = False
        user.save(update_fields=["must_change_password"])
    record(user, what, user, f"{user.username}: {what.split('.')[1].replace('_', ' ')}", request)


@receiver(password_changed)
def _password_changed(sender, request, user, **kwargs):
    _password_changed_by_user(request, user, "auth.password_change")


@receiver(password_set)
def _password_set(sender, request, user, **kwargs):
    _password_changed_by_user(request, user, "auth.password_set")


@receiver(password_reset)
def _password_reset(sender, request, user, **kwargs):
    _password_changed_by_user(request, user, "auth.password_reset")


@receiver(authenticator_added)
def _mfa_added(sender, request, authenticator, **kwargs):
    user = authenticator.user
    record(user, "mfa.add", user, f"{user.username} turned on two-factor ({authenticator.type})", request,
           type=authenticator.type)


@receiver(authenticator_removed)
def _mfa_removed(sender, request, authenticator, **kwargs):
    user = authenticator.user
    record(user, "mfa.remove", user, f"{user.username} removed two-factor ({authenticator.type})", request,
           type=authenticator.type)
