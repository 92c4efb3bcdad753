"""Account management as a lab manager sees it in the browser (Django test client).

Creating an experimenter sends an invitation e-mail through the Celery task
`manager.accounts.tasks.send_invitation`. No worker runs here: the task is enqueued on
commit, so the on-commit callbacks are captured and run with Celery in eager mode (the
task runs in this process), or the task is applied directly.
"""

import html
import re
import socket
from urllib.parse import urlparse

import pytest
from django.contrib.sessions.models import Session
from django.core import mail
from django.test import Client

from manager.accounts import services
from manager.accounts.models import User
from manager.accounts.tasks import send_invitation
from manager.celery import app as celery_app
from manager.jobs.models import Job
from tests.conftest import ANN_PASSWORD, make_persona

pytestmark = pytest.mark.django_db

PASSWORD = "Quiet-harbour-71"  # chosen on an invitation page (Django's validators take it); olga's and cleo's
LINK = re.compile(r"https?://[^\s/]+(/accounts/welcome/([^/\s]+)/([^/\s]+)/)")


def page_text(response) -> str:
    """What a person reads on the page: tags stripped, entities decoded, spaces folded."""
    body = response.content.decode()
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", body, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


@pytest.fixture
def eager_celery():
    """Tasks sent with apply_async run at once, in this process (no broker, no worker)."""
    old = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    try:
        yield
    finally:
        celery_app.conf.task_always_eager = old


@pytest.fixture
def boss(db):
    """boss as the invitation e-mail and the list of accounts name him."""
    return make_persona("boss", name="Bea Boss")


@pytest.fixture
def manager(boss):
    client = Client()
    client.force_login(boss)
    return client


def make_user(username, email=None, name="", password=PASSWORD, **extra):
    return User.objects.create_user(username, email or f"{username}@lab.test", password, name=name, **extra)


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_account(manager, django_capture_on_commit_callbacks, **fields):
    data = {"name": "Ann Arbor", "username": "ann", "email": "ann@uni.test", **fields}
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = manager.post("/users/new/", data, follow=True)
    return response, callbacks


# --- creating an account and the invitation -----------------------------------------


def test_new_account_page_has_the_fields(manager):
    response = manager.get("/users/new/")
    assert response.status_code == 200
    text = page_text(response)
    for label in ("Full name", "Username", "E-mail", "Lab manager (superuser)", "Create account"):
        assert label in text


def test_invitation_e_mail_link_sets_a_password_once(manager, boss, eager_celery, django_capture_on_commit_callbacks):
    response, callbacks = create_account(manager, django_capture_on_commit_callbacks)

    ann = User.objects.get(username="ann")
    assert ann.name == "Ann Arbor" and ann.email == "ann@uni.test"
    assert not ann.is_superuser and ann.is_active and not ann.has_usable_password()
    assert response.redirect_chain[-1][0] == f"/users/{ann.pk}/"
    text = page_text(response)
    assert "Account ann created. An invitation e-mail to ann@uni.test is on its way" in text
    assert "invited" in text
    assert len(callbacks) == 1  # the task is enqueued only after the account is committed

    # The job ran (eagerly) and says so.
    job = Job.objects.get(kind="accounts.invite")
    assert job.user == boss and job.label == "Invitation to ann"
    assert job.status == Job.Status.SUCCEEDED
    assert job.message == "Invitation e-mail sent to ann <ann@uni.test>"
    assert job.started_at and job.finished_at
    assert "Invitation e-mail sent to ann" in page_text(manager.get("/jobs/recent/"))

    # The e-mail.
    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert message.to == ["ann@uni.test"]
    assert message.subject == "[oTree Lab] Your account on the oTree Lab Manager"
    assert "Your username: ann" in message.body
    assert "Hello Ann Arbor" in message.body
    assert "Bea Boss created an account for you" in message.body
    match = LINK.search(message.body)
    assert match, message.body
    link = match.group(1)
    assert str(ann.pk) not in job.message  # the link's secret is not in the job either
    assert match.group(3) not in job.message

    # Ann follows the link (she is not logged in).
    ann_client = Client()
    response = ann_client.get(link, follow=True)
    assert response.status_code == 200
    text = page_text(response)
    assert "Welcome, Ann Arbor!" in text and "Choose a password for your account ann" in text
    form_url = response.redirect_chain[-1][0]
    assert "set-password" in form_url and match.group(3) not in form_url  # token moved to the session

    # Too weak a password is refused with the reason.
    response = ann_client.post(form_url, {"new_password1": "ann", "new_password2": "ann"})
    assert response.status_code == 200
    assert "This password is too short" in page_text(response)
    ann.refresh_from_db()
    assert not ann.has_usable_password()

    response = ann_client.post(form_url, {"new_password1": PASSWORD, "new_password2": PASSWORD}, follow=True)
    assert response.redirect_chain[-1][0] == "/accounts/login/"
    assert "Your password is set, Ann Arbor. Log in with the username ann." in page_text(response)
    ann.refresh_from_db()
    assert ann.check_password(PASSWORD)

    # She logs in with it.
    response = ann_client.post("/accounts/login/", {"login": "ann", "password": PASSWORD}, follow=True)
    assert response.redirect_chain[-1][0] == "/"
    assert "Hello, Ann" in page_text(response)

    # The link works only once, for anyone.
    for client in (Client(), ann_client):
        response = client.get(link, follow=True)
        assert "This link no longer works" in page_text(response)
        assert "Set my password" not in page_text(response)


def test_invitation_task_applied_directly(boss, django_capture_on_commit_callbacks):
    """The task itself, without the web layer: a job id and a user id in, an e-mail out."""
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        ann = services.create_user(boss, username="ann", email="ann@uni.test", name="Ann")
    assert len(callbacks) == 1 and mail.outbox == []
    job = Job.objects.get(kind="accounts.invite")
    assert job.status == Job.Status.QUEUED

    send_invitation.apply(args=[str(job.id), ann.pk])

    job.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED
    assert job.message == "Invitation e-mail sent to ann <ann@uni.test>"
    assert [m.to for m in mail.outbox] == [["ann@uni.test"]]
    assert LINK.search(mail.outbox[0].body)


def test_invitation_for_a_deactivated_account_fails_the_job(boss, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        ann = services.create_user(boss, username="ann", email="ann@uni.test")
    job = Job.objects.get(kind="accounts.invite")
    User.objects.filter(pk=ann.pk).update(is_active=False)

    send_invitation.apply(args=[str(job.id), ann.pk])

    job.refresh_from_db()
    assert job.status == Job.Status.FAILED
    assert job.message == "Invitation to ann: the account no longer exists or is deactivated"
    assert mail.outbox == []


def test_failing_smtp_fails_the_job_with_a_clear_message(manager, settings, eager_celery,
                                                          django_capture_on_commit_callbacks):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = free_port()  # nothing listens there
    settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
    settings.EMAIL_TIMEOUT = 5

    response, _ = create_account(manager, django_capture_on_commit_callbacks)

    ann = User.objects.get(username="ann")  # the account exists; only the e-mail failed
    assert response.status_code == 200
    job = Job.objects.get(kind="accounts.invite")
    assert job.status == Job.Status.FAILED
    assert job.message.startswith("Invitation to ann: could not send the e-mail to ann@uni.test (")
    assert "refused" in job.message.lower()
    recent = page_text(manager.get("/jobs/recent/"))
    assert "failed" in recent and "could not send the e-mail to ann@uni.test" in recent

    # Once the mail server works again, the lab manager resends the invitation.
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    with django_capture_on_commit_callbacks(execute=True):
        response = manager.post(f"/users/{ann.pk}/invite/", follow=True)
    assert "A new invitation e-mail to ann is on its way." in page_text(response)
    assert Job.objects.filter(kind="accounts.invite", status=Job.Status.SUCCEEDED).count() == 1
    assert [m.to for m in mail.outbox] == [["ann@uni.test"]]


def test_create_a_lab_manager(manager, eager_celery, django_capture_on_commit_callbacks):
    create_account(manager, django_capture_on_commit_callbacks, username="carl", email="carl@uni.test",
                   is_superuser="on")
    carl = User.objects.get(username="carl")
    assert carl.is_superuser and carl.is_staff


def test_a_resent_invitation_invalidates_nothing_but_works_once(manager, boss, eager_celery,
                                                                 django_capture_on_commit_callbacks):
    """Two invitations: the first link used sets the password; then both are dead."""
    create_account(manager, django_capture_on_commit_callbacks)
    ann = User.objects.get(username="ann")
    with django_capture_on_commit_callbacks(execute=True):
        manager.post(f"/users/{ann.pk}/invite/")
    links = [LINK.search(m.body).group(1) for m in mail.outbox]
    assert len(links) == 2
    client = Client()
    response = client.get(links[1], follow=True)
    client.post(response.redirect_chain[-1][0], {"new_password1": PASSWORD, "new_password2": PASSWORD})
    ann.refresh_from_db()
    assert ann.check_password(PASSWORD)
    for link in links:
        assert "This link no longer works" in page_text(Client().get(link, follow=True))


# --- bad input: a clear message, nothing saved ---------------------------------------


BAD_NEW_ACCOUNTS = [
    ({"username": "Ann"}, "The username 'Ann' is already taken."),
    ({"username": "ANN", "email": "other@uni.test"}, "The username 'ANN' is already taken."),
    ({"username": "newbie", "email": "ANN@Lab.Test"}, "The e-mail address ANN@Lab.Test already belongs to another account."),
    ({"username": "newbie", "email": "not-an-address"}, "'not-an-address' is not a valid e-mail address."),
    ({"username": "newbie", "email": "a@b@c.test"}, "'a@b@c.test' is not a valid e-mail address."),
    # The page says what the API says (the service's words, manager.texts):
    ({"username": "newbie", "name": "x" * 151}, "At most 150 characters (this one has 151)."),
    ({"username": "newbie", "name": "Ann\x00"}, "The name contains a NUL character."),
    ({"username": "new bie"}, "Use only letters, digits and @ . + - _ (no spaces)."),
    ({"username": ""}, "This field is required."),
    ({"username": "newbie", "email": ""}, "This field is required."),
]


@pytest.mark.parametrize("fields, message", BAD_NEW_ACCOUNTS, ids=[m for _, m in BAD_NEW_ACCOUNTS])
def test_bad_new_account_is_refused_with_a_message(manager, ann, fields, message, django_capture_on_commit_callbacks):
    before = set(User.objects.values_list("pk", flat=True))
    data = {"name": "New Person", "username": "newbie", "email": "newbie@uni.test", **fields}
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = manager.post("/users/new/", data)
    assert response.status_code == 200  # the form again, not a redirect
    text = page_text(response)
    assert message in text
    assert "New account" in text
    assert set(User.objects.values_list("pk", flat=True)) == before
    assert not Job.objects.exists() and callbacks == [] and mail.outbox == []
    # What was typed is kept in the form.
    assert response.context["form"]["username"].value() == data["username"]


def test_several_problems_are_all_shown(manager, ann):
    response = manager.post("/users/new/", {"name": "", "username": "Ann", "email": "ann@LAB.test"})
    text = page_text(response)
    assert "The username 'Ann' is already taken." in text
    assert "The e-mail address ann@LAB.test already belongs to another account." in text
    assert User.objects.count() == 2


# --- listing and searching -----------------------------------------------------------


def test_list_and_search(manager, boss):
    make_persona("ann", email="ann@uni.test", name="Ann Arbor")
    make_persona("bob", email="bob@econ.test", name="Robert Brown")
    make_user("cleo", "cleo@uni.test", name="Cleo Chu", is_active=False)

    text = page_text(manager.get("/users/"))
    for expected in ("Ann Arbor", "Robert Brown", "Cleo Chu", "Bea Boss", "deactivated", "lab manager"):
        assert expected in text

    def listed(query):
        response = manager.get("/users/", query)
        assert response.status_code == 200
        return {u.username for u in response.context["page"]}

    assert listed({"q": "arbor"}) == {"ann"}  # name
    assert listed({"q": "BOB"}) == {"bob"}  # username, any case
    assert listed({"q": "econ.test"}) == {"bob"}  # e-mail
    assert listed({"q": "uni.test"}) == {"ann", "cleo"}
    assert listed({"show": "managers"}) == {"boss"}
    assert listed({"show": "inactive"}) == {"cleo"}
    response = manager.get("/users/", {"q": "nobody-like-this"})
    assert "No accounts match." in page_text(response)


# --- editing -------------------------------------------------------------------------


def test_edit_name_email_and_username(manager):
    ann = make_persona("ann", email="ann@uni.test", name="Ann")
    response = manager.post(f"/users/{ann.pk}/", {"name": "Ann Arbor-Smith", "username": "asmith",
                                                  "email": "asmith@uni.test"}, follow=True)
    assert response.redirect_chain[-1][0] == f"/users/{ann.pk}/"
    assert "Account asmith saved." in page_text(response)
    ann.refresh_from_db()
    assert (ann.name, ann.username, ann.email) == ("Ann Arbor-Smith", "asmith", "asmith@uni.test")
    # She logs in with her new username and her old password.
    assert Client().login(username="asmith", password=ANN_PASSWORD)


def test_changing_only_the_case_of_ones_own_username_is_allowed(manager):
    ann = make_persona("ann", email="ann@uni.test")
    manager.post(f"/users/{ann.pk}/", {"name": "", "username": "Ann", "email": "ANN@uni.test"})
    ann.refresh_from_db()
    assert (ann.username, ann.email) == ("Ann", "ANN@uni.test")


@pytest.mark.parametrize("fields, message", [
    ({"username": "BOB"}, "The username 'BOB' is already taken."),
    ({"email": "Bob@Uni.Test"}, "The e-mail address Bob@Uni.Test already belongs to another account."),
    ({"email": "nope"}, "'nope' is not a valid e-mail address."),
    ({"name": "y" * 151}, "At most 150 characters (this one has 151)."),
    ({"username": "ann b"}, "Use only letters, digits and @ . + - _ (no spaces)."),
])
def test_bad_edit_is_refused_and_nothing_is_saved(manager, fields, message):
    ann = make_persona("ann", email="ann@uni.test", name="Ann")
    make_persona("bob", email="bob@uni.test")
    # A valid name change travels with the bad field: it must not be saved either.
    data = {"name": "Changed Name", "username": "ann", "email": "ann@uni.test", **fields}
    response = manager.post(f"/users/{ann.pk}/", data)
    assert response.status_code == 200
    text = page_text(response)
    assert message in text and "saved" not in text
    ann.refresh_from_db()
    assert (ann.name, ann.username, ann.email) == ("Ann", "ann", "ann@uni.test")


# --- roles ---------------------------------------------------------------------------


def test_promote_and_demote(manager, ann):
    ann_client = logged_in(ann)
    assert ann_client.get("/users/").status_code == 403

    response = manager.post(f"/users/{ann.pk}/promote/", follow=True)
    assert "ann is now a lab manager." in page_text(response)
    ann.refresh_from_db()
    assert ann.is_superuser and ann.is_staff
    assert ann_client.get("/users/").status_code == 200

    response = manager.post(f"/users/{ann.pk}/demote/", follow=True)
    assert "ann is now an experimenter." in page_text(response)
    ann.refresh_from_db()
    assert not ann.is_superuser and not ann.is_staff
    assert ann_client.get("/users/").status_code == 403


def test_a_lab_manager_cannot_demote_or_deactivate_themselves(manager, boss):
    response = manager.post(f"/users/{boss.pk}/demote/", follow=True)
    assert "You cannot remove your own lab-manager rights; ask another lab manager." in page_text(response)
    response = manager.post(f"/users/{boss.pk}/deactivate/", follow=True)
    assert "You cannot deactivate your own account." in page_text(response)
    boss.refresh_from_db()
    assert boss.is_superuser and boss.is_active
    assert manager.get("/users/").status_code == 200  # still logged in, still a lab manager


def test_another_lab_manager_may_demote_one(manager, boss):
    other = make_user("olga", is_superuser=True, is_staff=True)
    response = logged_in(other).post(f"/users/{boss.pk}/demote/", follow=True)
    assert "boss is now an experimenter." in page_text(response)
    boss.refresh_from_db()
    assert not boss.is_superuser
    assert manager.get("/users/").status_code == 403


def test_the_last_active_lab_manager_is_protected(boss):
    """Through the web a lab manager always acts on someone else and so is never the last
    one; the rule also holds for callers without an account (scripts, the system)."""
    other = make_user("olga", is_superuser=True, is_staff=True, is_active=False)  # inactive: does not count
    for call in (lambda: services.set_superuser(None, boss, False),
                 lambda: services.set_active(None, boss, False),
                 lambda: services.delete_user(None, boss)):
        with pytest.raises(services.NotAllowed, match="boss is the last active lab manager"):
            call()
    boss.refresh_from_db()
    assert boss.is_superuser and boss.is_active
    # With a second active lab manager the same calls are allowed.
    services.set_active(None, other, True)
    services.set_superuser(None, boss, False)
    boss.refresh_from_db()
    assert not boss.is_superuser


# --- deactivation and deletion -------------------------------------------------------


def test_deactivate_logs_out_everywhere_and_blocks_login_until_reactivated(manager, ann):
    laptop, phone = Client(), Client()
    for c in (laptop, phone):
        assert c.post("/accounts/login/", {"login": "ann", "password": ANN_PASSWORD}).status_code == 302
        assert c.get("/").status_code == 200
    assert Session.objects.count() == 3  # boss + two of ann's

    response = manager.post(f"/users/{ann.pk}/deactivate/", follow=True)
    text = page_text(response)
    assert "ann is deactivated and logged out." in text and "deactivated" in text
    ann.refresh_from_db()
    assert not ann.is_active
    assert Session.objects.count() == 1  # only the lab manager's
    for c in (laptop, phone):
        response = c.get("/")
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")

    # Logging in with the right password does not get her in.
    fresh = Client()
    response = fresh.post("/accounts/login/", {"login": "ann", "password": ANN_PASSWORD}, follow=True)
    assert "This account is inactive" in page_text(response)
    assert fresh.get("/").status_code == 302

    # Reactivated: she can log in again, but the old sessions stay ended.
    response = manager.post(f"/users/{ann.pk}/activate/", follow=True)
    assert "ann is active again." in page_text(response)
    assert laptop.get("/").status_code == 302
    assert fresh.post("/accounts/login/", {"login": "ann", "password": ANN_PASSWORD}).status_code == 302
    assert fresh.get("/").status_code == 200


def test_delete_an_account(manager, ann):
    ann_client = logged_in(ann)
    response = manager.get(f"/users/{ann.pk}/delete/")
    assert response.status_code == 200
    text = page_text(response)
    assert "Delete the account ann?" in text and "cannot be undone" in text
    assert User.objects.filter(pk=ann.pk).exists()  # the confirmation page deletes nothing

    response = manager.post(f"/users/{ann.pk}/delete/", follow=True)
    assert response.redirect_chain[-1][0] == "/users/"
    assert "Account ann deleted." in page_text(response)
    assert not User.objects.filter(pk=ann.pk).exists()
    assert ann_client.get("/").status_code == 302
    assert manager.get(f"/users/{ann.pk}/").status_code == 404
    assert not Client().login(username="ann", password=ANN_PASSWORD)


def test_deleting_oneself_is_refused_with_a_message(manager, boss):
    make_user("olga", is_superuser=True, is_staff=True)  # not even when another manager exists
    response = manager.post(f"/users/{boss.pk}/delete/", follow=True)
    assert response.redirect_chain[-1][0] == f"/users/{boss.pk}/"
    assert "You cannot delete your own account; ask another lab manager." in page_text(response)
    assert User.objects.filter(pk=boss.pk).exists()
    assert manager.get("/").status_code == 200


def test_a_lab_manager_deletes_another_lab_manager(boss):
    olga = make_user("olga", is_superuser=True, is_staff=True)
    olga_client = logged_in(olga)
    response = logged_in(boss).post(f"/users/{olga.pk}/delete/", follow=True)
    assert "Account olga deleted." in page_text(response)
    assert olga_client.get("/users/").status_code == 302  # her session ended with her account
    # boss is now the last active lab manager: nobody may delete, demote or deactivate him.
    with pytest.raises(services.NotAllowed, match="last active lab manager"):
        services.delete_user(None, boss)


def test_unknown_action_is_404_and_get_changes_nothing(manager, ann):
    assert manager.post(f"/users/{ann.pk}/explode/").status_code == 404
    response = manager.get(f"/users/{ann.pk}/promote/")
    assert response.status_code == 302 and response["Location"] == f"/users/{ann.pk}/"
    ann.refresh_from_db()
    assert not ann.is_superuser


def test_invitation_link_in_mail_uses_the_public_url(manager, settings, eager_celery, django_capture_on_commit_callbacks):
    settings.LAB_PUBLIC_URL = "https://lab.example.org"
    create_account(manager, django_capture_on_commit_callbacks)
    match = LINK.search(mail.outbox[0].body)
    assert urlparse(match.group(0)).netloc == "lab.example.org"


def test_invitation_link_of_a_deactivated_account_no_longer_works(manager, eager_celery,
                                                                  django_capture_on_commit_callbacks):
    create_account(manager, django_capture_on_commit_callbacks)
    ann = User.objects.get(username="ann")
    link = LINK.search(mail.outbox[0].body).group(1)
    manager.post(f"/users/{ann.pk}/deactivate/")

    client = Client()
    response = client.get(link, follow=True)
    assert "This link no longer works" in page_text(response)
    # Not even by posting to the form address directly.
    uid = LINK.search(mail.outbox[0].body).group(2)
    client.post(f"/accounts/welcome/{uid}/set-password/", {"new_password1": PASSWORD, "new_password2": PASSWORD})
    ann.refresh_from_db()
    assert not ann.has_usable_password()


# --- the login rate limit behind a proxy (LAB_BEHIND_PROXY, LAB_PROXY_HOPS) ---------------

PROXY = "10.9.8.7"  # the TLS proxy in front: every request arrives from its address
TOO_MANY = "Too many failed login attempts. Try again later."


def failed_login(username: str, xff: str | None, remote: str = PROXY) -> str:
    """One wrong password from a fresh browser; the page's text."""
    headers = {"HTTP_X_FORWARDED_FOR": xff} if xff is not None else {}
    response = Client(REMOTE_ADDR=remote).post(
        "/accounts/login/", {"login": username, "password": "wrong-password-1"}, **headers)
    assert response.status_code == 200
    return page_text(response)


def exhaust_ip_limit(xff: str | None, remote: str = PROXY) -> None:
    """The per-address limit of LAB_LOGIN_RATE_LIMIT (10 a minute), each try under
    another username so the per-account limit (5) is not what stops them."""
    for n in range(10):
        assert TOO_MANY not in failed_login(f"nobody{n}", xff, remote)
    assert TOO_MANY in failed_login("nobody-else", xff, remote)


def test_behind_a_proxy_the_rate_limit_counts_the_real_client(settings, ann):
    settings.ALLAUTH_TRUSTED_PROXY_COUNT = 1  # LAB_BEHIND_PROXY=1 (LAB_PROXY_HOPS [1])
    exhaust_ip_limit("198.51.100.7")
    # Another client behind the same proxy may still log in...
    assert Client(REMOTE_ADDR=PROXY).post("/accounts/login/", {"login": "ann", "password": ANN_PASSWORD},
                                          HTTP_X_FORWARDED_FOR="198.51.100.8").status_code == 302
    # ...while the blocked client cannot get fresh tries by putting other addresses in front
    # of the one the proxy appended.
    assert TOO_MANY in failed_login("someone", "203.0.113.9, 198.51.100.7")


def test_two_proxy_hops_take_the_address_the_outer_proxy_appended(settings):
    settings.ALLAUTH_TRUSTED_PROXY_COUNT = 2  # LAB_PROXY_HOPS=2: e.g. a CDN, then the lab's proxy
    exhaust_ip_limit("forged, 198.51.100.7, 10.0.0.2")
    assert TOO_MANY in failed_login("someone", "other-forgery, 198.51.100.7, 10.0.0.2")
    assert TOO_MANY not in failed_login("someone", "198.51.100.7, 198.51.100.8, 10.0.0.2")


def test_a_request_that_skipped_the_outer_proxy_is_counted_not_refused(settings):
    settings.ALLAUTH_TRUSTED_PROXY_COUNT = 2  # LAB_PROXY_HOPS=2, but this one reached the inner proxy directly
    # One entry only: the address the inner proxy saw. The login page answers (no 500)
    # and the limit counts that address.
    exhaust_ip_limit("198.51.100.9")
    assert TOO_MANY not in failed_login("someone", "198.51.100.10")


def test_without_lab_behind_proxy_the_forwarded_header_is_ignored(settings):
    assert settings.ALLAUTH_TRUSTED_PROXY_COUNT == 0  # the default: LAB_BEHIND_PROXY unset
    # An attacker's made-up X-Forwarded-For gives no fresh tries: the limit is per REMOTE_ADDR.
    for n in range(10):
        assert TOO_MANY not in failed_login(f"nobody{n}", f"192.0.2.{n}")
    assert TOO_MANY in failed_login("nobody-else", "192.0.2.200")
    assert TOO_MANY in failed_login("nobody-else", None)
    assert TOO_MANY not in failed_login("nobody-else", None, remote="10.9.8.6")  # another address
