from django.conf import settings
"""Logging in, passwords and two-factor login, through allauth's pages as a user uses them.

Changing and resetting a password, turning on TOTP two-factor login, no public sign-up,
the login rate limit, and the forced change of a one-time password.
"""

import base64
import hashlib
import hmac
import html
import re
import struct
import time

import pytest
from allauth.mfa.models import Authenticator
from django.core import mail
from django.test import Client

from manager.accounts.models import User
from manager.audit.models import AuditEvent
from tests.conftest import ANN_PASSWORD, BOB_PASSWORD, make_persona

pytestmark = pytest.mark.django_db

PASSWORD = "Quiet-harbour-71"  # of the one-time admin account, and mallory's try at a sign-up
NEW_PASSWORD = "Brisk-lantern-58"
LOGIN = "/accounts/login/"
CHANGE = "/accounts/password/change/"


def page_text(response) -> str:
    body = response.content.decode()
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", body, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def totp(secret: str, at: float | None = None, step: int = 30, digits: int = 6) -> str:
    """RFC 6238 (HMAC-SHA1), written out here so the test does not trust allauth's code."""
    key = base64.b32decode(secret.upper() + "=" * (-len(secret) % 8))
    counter = int((time.time() if at is None else at) // step)
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF
    return f"{value % 10 ** digits:0{digits}d}"


def current_totp(secret: str) -> str:
    """The code of now, taken far enough from a 30 s boundary that the server (which
    allows no clock drift by default) computes the same one; waits at most 2 s."""
    left = 30 - time.time() % 30
    if left < 2:
        time.sleep(left + 0.05)
    return totp(secret)


@pytest.fixture
def ann(db):
    """ann as these pages greet her ("Hello, Ann") and mail her (ann@uni.test)."""
    return make_persona("ann", name="Ann Arbor", email="ann@uni.test")


def log_in(client, login, password, **kwargs):
    return client.post(LOGIN, {"login": login, "password": password}, **kwargs)


def is_logged_in(client) -> bool:
    return client.get("/").status_code == 200


# --- changing the password -----------------------------------------------------------


def test_change_password(ann):
    client = Client()
    assert log_in(client, "ann", ANN_PASSWORD).status_code == 302
    response = client.get(CHANGE)
    assert response.status_code == 200 and "Change password" in page_text(response)

    response = client.post(CHANGE, {"oldpassword": ANN_PASSWORD, "password1": NEW_PASSWORD, "password2": NEW_PASSWORD},
                           follow=True)
    assert response.redirect_chain[-1][0] == "/"
    assert "Hello, Ann" in page_text(response)  # still logged in after the change
    ann.refresh_from_db()
    assert ann.check_password(NEW_PASSWORD)
    assert is_logged_in(client)

    assert log_in(Client(), "ann", ANN_PASSWORD).status_code == 200  # the old one: the form again
    other = Client()
    assert log_in(other, "ann", NEW_PASSWORD).status_code == 302
    assert is_logged_in(other)


def test_changing_the_password_logs_out_the_other_sessions(ann):
    phone, laptop = Client(), Client()
    log_in(phone, "ann", ANN_PASSWORD)
    log_in(laptop, "ann", ANN_PASSWORD)
    laptop.post(CHANGE, {"oldpassword": ANN_PASSWORD, "password1": NEW_PASSWORD, "password2": NEW_PASSWORD})
    assert is_logged_in(laptop)
    assert not is_logged_in(phone)


@pytest.mark.parametrize("login", ["ann", "ANN", "ann@uni.test", "Ann@Uni.Test"])
def test_log_in_with_username_or_e_mail_in_any_case(ann, login):
    client = Client()
    response = log_in(client, login, ANN_PASSWORD)
    assert response.status_code == 302 and response["Location"] == "/"
    assert is_logged_in(client)


@pytest.mark.parametrize("new, message", [
    ("short1A", "This password is too short. It must contain at least 10 characters."),
    ("password123", "This password is too common."),
    ("8405719263", "This password is entirely numeric."),
    ("ann@uni.test", "The password is too similar to the"),
])
def test_weak_new_password_is_refused_with_the_reason(ann, new, message):
    client = Client()
    log_in(client, "ann", ANN_PASSWORD)
    response = client.post(CHANGE, {"oldpassword": ANN_PASSWORD, "password1": new, "password2": new})
    assert response.status_code == 200
    assert message in page_text(response)
    ann.refresh_from_db()
    assert ann.check_password(ANN_PASSWORD)


def test_wrong_current_password_or_mismatch_is_refused(ann):
    client = Client()
    log_in(client, "ann", ANN_PASSWORD)
    response = client.post(CHANGE, {"oldpassword": "not-it-at-all", "password1": NEW_PASSWORD,
                                    "password2": NEW_PASSWORD})
    assert "Please type your current password." in page_text(response)
    response = client.post(CHANGE, {"oldpassword": ANN_PASSWORD, "password1": NEW_PASSWORD,
                                    "password2": NEW_PASSWORD + "x"})
    assert "You must type the same password each time." in page_text(response)
    ann.refresh_from_db()
    assert ann.check_password(ANN_PASSWORD)


# --- resetting a forgotten password --------------------------------------------------


def test_reset_forgotten_password_by_e_mail(ann):
    client = Client()
    response = client.post("/accounts/password/reset/", {"email": "ANN@uni.test"}, follow=True)
    assert response.redirect_chain[-1][0] == "/accounts/password/reset/done/"
    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert message.to == ["ann@uni.test"]
    assert "Password Reset" in message.subject
    # The e-mail speaks in the lab's name, not the Host header of the request.
    assert f"Hello from {settings.LAB_NAME}!" in message.body
    link = re.search(r"https?://[^/\s]+(/accounts/password/reset/key/\S+/)", message.body).group(1)

    response = client.get(link, follow=True)
    assert response.status_code == 200
    form_url = response.redirect_chain[-1][0]
    assert "set-password" in form_url
    response = client.post(form_url, {"password1": "short", "password2": "short"})
    assert "This password is too short" in page_text(response)
    response = client.post(form_url, {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD}, follow=True)
    assert response.redirect_chain[-1][0] == "/accounts/password/reset/key/done/"
    ann.refresh_from_db()
    assert ann.check_password(NEW_PASSWORD)

    fresh = Client()
    assert log_in(fresh, "ann", NEW_PASSWORD).status_code == 302
    assert is_logged_in(fresh)
    # The link was used up.
    response = Client().get(link, follow=True)
    assert "The password reset link was invalid, possibly because it has already been used." in page_text(response)
    assert "Set Password" not in page_text(response)
    assert AuditEvent.objects.filter(action="auth.password_reset", actor=ann).exists()


def test_reset_for_an_unknown_address_reveals_nothing_and_offers_no_sign_up(ann):
    known = Client().post("/accounts/password/reset/", {"email": "ann@uni.test"})
    unknown = Client().post("/accounts/password/reset/", {"email": "nobody@uni.test"})
    assert known.status_code == unknown.status_code == 302
    assert known["Location"] == unknown["Location"]  # the page does not tell them apart
    (notice,) = [m for m in mail.outbox if m.to == ["nobody@uni.test"]]
    assert "/accounts/password/reset/key/" not in notice.body
    # There is no public sign-up, so the mail must not send them to one.
    assert "/accounts/signup/" not in notice.body
    assert "ask your lab manager" in notice.body


# --- two-factor login (TOTP) ---------------------------------------------------------


def activate_totp(client, capture, password=ANN_PASSWORD) -> str:
    """Turn on TOTP as a user does: allauth first asks for the password again
    (reauthentication: a login does not count), then shows the secret."""
    response = client.get("/accounts/2fa/totp/activate/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/reauthenticate/?next=%2Faccounts%2F2fa%2Ftotp%2Factivate%2F"
    response = client.post(response["Location"], {"password": password}, follow=True)
    assert response.redirect_chain[-1][0] == "/accounts/2fa/totp/activate/"
    assert response.status_code == 200
    secret = response.context["form"].secret
    assert secret in response.content.decode()  # shown on the page for manual entry
    assert "Activate" in page_text(response)
    # A wrong code does not activate.
    wrong = f"{(int(totp(secret)) + 1) % 10 ** 6:06d}"
    response = client.post("/accounts/2fa/totp/activate/", {"code": wrong})
    assert response.status_code == 200 and "Incorrect code." in page_text(response)
    assert not Authenticator.objects.filter(type="totp").exists()
    with capture(execute=True):  # allauth announces the new authenticator on commit
        response = client.post("/accounts/2fa/totp/activate/", {"code": current_totp(secret)}, follow=True)
    assert response.status_code == 200
    return secret


def test_turn_on_totp_and_log_in_with_it(ann, django_capture_on_commit_callbacks):
    client = Client()
    assert log_in(client, "ann", ANN_PASSWORD).status_code == 302
    assert "Two-factor login off" in page_text(client.get("/settings/"))
    secret = activate_totp(client, django_capture_on_commit_callbacks)
    assert Authenticator.objects.filter(user=ann, type="totp").exists()
    assert "Two-factor login on" in page_text(client.get("/settings/"))
    assert AuditEvent.objects.filter(action="mfa.add", actor=ann).exists()

    client.post("/accounts/logout/")
    assert not is_logged_in(client)

    # The password alone now leads to the second step, not into the app.
    response = log_in(client, "ann", ANN_PASSWORD)
    assert response.status_code == 302 and response["Location"] == "/accounts/2fa/authenticate/"
    assert not is_logged_in(client)
    response = client.get("/accounts/2fa/authenticate/")
    assert response.status_code == 200

    wrong = f"{(int(totp(secret)) + 1) % 10 ** 6:06d}"
    response = client.post("/accounts/2fa/authenticate/", {"code": wrong})
    assert response.status_code == 200 and "Incorrect code." in page_text(response)
    assert not is_logged_in(client)

    response = client.post("/accounts/2fa/authenticate/", {"code": current_totp(secret)}, follow=True)
    assert response.redirect_chain[-1][0] == "/"
    assert "Hello, Ann" in page_text(response)
    assert is_logged_in(client)


def test_totp_activation_asks_for_the_password_again(ann):
    client = Client()
    assert log_in(client, "ann", ANN_PASSWORD).status_code == 302
    response = client.get("/accounts/2fa/totp/activate/", follow=True)
    assert response.redirect_chain[-1][0].startswith("/accounts/reauthenticate/")
    response = client.post(response.redirect_chain[-1][0], {"password": "not-my-password"})
    assert response.status_code == 200
    assert "Incorrect password." in page_text(response)
    assert client.get("/accounts/2fa/totp/activate/").status_code == 302  # still not allowed in
    assert not Authenticator.objects.exists()


# --- no public sign-up ---------------------------------------------------------------


def test_no_public_sign_up():
    response = Client().get("/accounts/signup/")
    assert response.status_code == 200
    assert "No public sign-up" in page_text(response)
    assert "Ask your lab manager for an account" in page_text(response)

    response = Client().post("/accounts/signup/", {
        "email": "mallory@evil.test", "username": "mallory", "password1": PASSWORD, "password2": PASSWORD,
    })
    assert response.status_code == 200 and "No public sign-up" in page_text(response)
    assert not User.objects.exists()


# --- login rate limit ----------------------------------------------------------------


def test_login_is_refused_after_five_failed_attempts(ann, bob):
    client = Client()
    for _ in range(5):
        response = log_in(client, "ann", "wrong-password")
        assert response.status_code == 200
        assert "The username and/or password you specified are not correct." in page_text(response)

    response = log_in(client, "ann", ANN_PASSWORD)  # the right password, too late
    assert response.status_code == 200
    assert "Too many failed login attempts. Try again later." in page_text(response)
    assert not is_logged_in(client)
    # Not even from another browser, nor by the e-mail address... (same account key)
    assert "Too many failed login attempts" in page_text(log_in(Client(), "ANN", ANN_PASSWORD))
    # ...while other accounts are unaffected.
    assert log_in(Client(), "bob", BOB_PASSWORD).status_code == 302


def test_failed_logins_are_audited_without_the_password(ann):
    log_in(Client(), "ann", "my-wrong-secret-99")
    event = AuditEvent.objects.get(action="auth.login_failed")
    assert event.data == {"login": "ann"}
    assert "my-wrong-secret-99" not in str(event.data) + event.summary


# --- one-time passwords --------------------------------------------------------------


def test_one_time_password_must_be_changed_before_anything_else(ann):
    boss = User.objects.create_user("admin", "admin@localhost", PASSWORD, is_superuser=True, is_staff=True,
                                    must_change_password=True)
    client = Client()
    assert log_in(client, "admin", PASSWORD).status_code == 302
    for path in ("/", "/settings/", "/settings/keys/", "/settings/tokens/", "/users/", f"/users/{ann.pk}/",
                 "/audit/", "/accounts/2fa/", "/jobs/recent/"):
        response = client.get(path)
        assert response.status_code == 302, path
        assert response["Location"] == f"{CHANGE}?first=1", path
    # Nor can it act on anything meanwhile.
    response = client.post(f"/users/{ann.pk}/delete/")
    assert response.status_code == 302 and response["Location"].startswith(CHANGE)
    assert User.objects.filter(pk=ann.pk).exists()

    response = client.get(f"{CHANGE}?first=1")
    assert response.status_code == 200
    assert "You logged in with a one-time password. Choose your own password to continue." in page_text(response)

    response = client.post(f"{CHANGE}?first=1", {"oldpassword": PASSWORD, "password1": NEW_PASSWORD,
                                                 "password2": NEW_PASSWORD}, follow=True)
    assert response.redirect_chain[-1][0] == "/"
    assert "Hello," in page_text(response) and "You are a lab manager" in page_text(response)
    boss.refresh_from_db()
    assert not boss.must_change_password and boss.check_password(NEW_PASSWORD)
    assert client.get("/users/").status_code == 200
    assert "one-time password" not in page_text(client.get(CHANGE))


def test_one_time_password_user_may_log_out(ann):
    ann.must_change_password = True
    ann.save()
    client = Client()
    log_in(client, "ann", ANN_PASSWORD)
    response = client.post("/accounts/logout/")
    assert response.status_code == 302 and response["Location"] == LOGIN
    assert client.get("/").status_code == 302
    assert client.get("/")["Location"].startswith(LOGIN)
