"""The audit log (/audit/): who did what to which object, when — as a lab manager reads it."""

import html
import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from django.core import mail
from django.test import Client

from manager.accounts.models import AccessToken, SSHKey, User
from manager.accounts.tasks import send_invitation
from manager.audit.models import AuditEvent
from manager.audit.services import record
from manager.jobs.models import Job
from tests.conftest import BOSS_PASSWORD

pytestmark = pytest.mark.django_db

# What ann chooses on the invitation's page (Django's validators refuse one like her
# persona's password, too like her username).
CHOSEN_PASSWORD = "Brisk-lantern-58"


def page_text(response) -> str:
    body = response.content.decode()
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", body, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def audit_rows(response) -> list[dict]:
    """The audit table as the page shows it: one dict per row, keyed by column title."""
    body = response.content.decode()
    table = re.search(r'<table[^>]*id="audit".*?</table>', body, flags=re.S).group(0)
    heads = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<th>(.*?)</th>", table)]
    rows = []
    for row in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1], flags=re.S):
        cells = [" ".join(html.unescape(re.sub(r"<[^>]+>", " ", c)).split())
                 for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
        if len(cells) == len(heads):
            rows.append(dict(zip(heads, cells)))
    return rows


def new_public_key(comment) -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " " + comment


@pytest.fixture
def story(boss, django_capture_on_commit_callbacks):
    """A morning in the lab, all through the web pages. Returns the secrets that were
    typed or shown, to check none of them reached the log."""
    manager = Client()
    assert manager.post("/accounts/login/", {"login": "boss", "password": BOSS_PASSWORD}).status_code == 302

    with django_capture_on_commit_callbacks(execute=False):
        manager.post("/users/new/", {"name": "Ann Arbor", "username": "ann", "email": "ann@uni.test"})
    ann = User.objects.get(username="ann")
    job = Job.objects.get(kind="accounts.invite")
    send_invitation.apply(args=[str(job.id), ann.pk])
    link = re.search(r"https?://[^\s/]+(/accounts/welcome/\S+/)", mail.outbox[0].body).group(1)
    ann_client = Client()
    form_url = ann_client.get(link, follow=True).redirect_chain[-1][0]
    ann_client.post(form_url, {"new_password1": CHOSEN_PASSWORD, "new_password2": CHOSEN_PASSWORD})
    assert ann_client.post("/accounts/login/", {"login": "ann", "password": CHOSEN_PASSWORD}).status_code == 302

    manager.post(f"/users/{ann.pk}/promote/")
    manager.post(f"/users/{ann.pk}/demote/")

    ann_client.post("/settings/keys/", {"title": "ann laptop", "key": new_public_key("ann@laptop")})
    ann_client.post("/settings/keys/", {"title": "old desktop", "key": new_public_key("ann@desktop")})
    old = SSHKey.objects.get(title="old desktop")
    ann_client.post(f"/settings/keys/{old.pk}/delete/")

    response = ann_client.post("/settings/tokens/", {"name": "analysis script"}, follow=True)
    raw_token = html.unescape(re.search(r'id="new-token-value" readonly value="([^"]+)"',
                                        response.content.decode()).group(1))
    ann_client.post("/settings/tokens/", {"name": "throwaway"})
    throwaway = AccessToken.objects.get(name="throwaway")
    ann_client.post(f"/settings/tokens/{throwaway.pk}/revoke/")
    assert Client().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {raw_token}").status_code == 200

    Client().post("/accounts/login/", {"login": "ann", "password": "typo-Brisk-lantern"})

    manager.post(f"/users/{ann.pk}/delete/")
    assert not User.objects.filter(username="ann").exists()
    return {"manager": manager, "ann_pk": ann.pk, "secrets": [CHOSEN_PASSWORD, BOSS_PASSWORD, raw_token,
                                                              "typo-Brisk-lantern", link.split("/")[-2]]}


def test_the_log_lists_who_did_what_to_which_object(story):
    manager = story["manager"]
    response = manager.get("/audit/")
    assert response.status_code == 200
    rows = audit_rows(response)
    seen = [(r["Who"], r["Action"], r["Object"]) for r in rows]

    expected = [
        ("boss", "auth.login", "user: boss"),
        ("boss", "user.create", "user: ann"),
        ("ann", "auth.password_set", "user: ann"),
        ("ann", "auth.login", "user: ann"),
        ("boss", "user.promote", "user: ann"),
        ("boss", "user.demote", "user: ann"),
        ("ann", "sshkey.add", "sshkey: ann laptop"),
        ("ann", "sshkey.add", "sshkey: old desktop"),
        ("ann", "sshkey.remove", "sshkey: old desktop"),
        ("ann", "token.create", "accesstoken: analysis script"),
        ("ann", "token.create", "accesstoken: throwaway"),
        ("ann", "token.revoke", "accesstoken: throwaway"),
        ("system", "auth.login_failed", ""),
        ("boss", "user.delete", "user: ann"),
    ]
    for who, action, obj in expected:
        assert any(s[0] == who and s[1] == action and s[2].startswith(obj) for s in seen), (who, action, obj, seen)
    # Newest first: the deletion is on top, boss's login at the bottom.
    assert seen[0][:2] == ("boss", "user.delete")
    assert seen[-1][:2] == ("boss", "auth.login")
    # What and when, and from where.
    delete = rows[0]
    assert delete["What"] == "deleted account ann"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", delete["When"])
    assert delete["From"] == "127.0.0.1"
    create = next(r for r in rows if r["Action"] == "user.create")
    assert create["What"] == "created experimenter account ann"


def test_the_log_outlives_the_actors_account(story):
    events = AuditEvent.objects.filter(actor_name="ann")
    assert events.count() >= 7
    assert all(e.actor_id is None for e in events)  # the account is gone, the name stays
    rows = audit_rows(story["manager"].get("/audit/", {"user": "ann"}))
    assert {r["Action"] for r in rows if r["Who"] == "ann"} >= {
        "sshkey.add", "sshkey.remove", "token.create", "token.revoke", "auth.login"}


def test_filters(story):
    manager = story["manager"]

    def actions(**query):
        response = manager.get("/audit/", query)
        assert response.status_code == 200
        return [(r["Who"], r["Action"]) for r in audit_rows(response)]

    # By user: what they did, and what was done to their account.
    by_ann = actions(user="ANN")
    assert ("ann", "sshkey.add") in by_ann and ("boss", "user.promote") in by_ann
    assert ("boss", "user.delete") in by_ann
    assert ("boss", "auth.login") not in by_ann
    by_boss = actions(user="boss")
    assert all(who == "boss" or action.startswith("auth.") for who, action in by_boss)
    assert ("ann", "sshkey.add") not in by_boss

    # By action prefix.
    assert {a for _, a in actions(action="sshkey")} == {"sshkey.add", "sshkey.remove"}
    assert {a for _, a in actions(action="token")} == {"token.create", "token.revoke"}
    assert {a for _, a in actions(action="user.")} == {"user.create", "user.promote", "user.demote", "user.delete"}
    response = manager.get("/audit/")
    options = re.findall(r'<option value="([^"]*)"', response.content.decode())
    assert {"auth", "sshkey", "token", "user"} <= set(options)

    # Free-text search over the summary and the object.
    assert set(actions(q="throwaway")) == {("ann", "token.create"), ("ann", "token.revoke")}
    assert actions(q="old desktop") == [("ann", "sshkey.remove"), ("ann", "sshkey.add")]

    # Combined, and nothing found.
    assert actions(user="ann", action="token", q="analysis") == [("ann", "token.create")]
    response = manager.get("/audit/", {"q": "no such thing anywhere"})
    assert audit_rows(response) == [] and "No events match." in page_text(response)
    # The filter form keeps what was typed.
    response = manager.get("/audit/", {"user": "ann", "q": "laptop", "action": "sshkey"})
    body = response.content.decode()
    assert 'name="user" value="ann"' in body and 'value="laptop"' in body
    assert '<option value="sshkey" selected>' in body


def test_no_secret_reaches_the_log(story):
    secrets = story["secrets"]
    assert all(len(s) >= 10 for s in secrets)
    for event in AuditEvent.objects.all():
        stored = f"{event.summary} {event.data} {event.target_repr} {event.action}"
        for secret in secrets:
            assert secret not in stored, (event.action, secret)
    page = story["manager"].get("/audit/").content.decode()
    for secret in secrets:
        assert secret not in page


def test_experimenters_cannot_read_the_log(boss, ann):
    client = Client()
    client.force_login(ann)
    response = client.get("/audit/")
    assert response.status_code == 403
    assert "Only lab managers may open this page." in page_text(response)


def test_long_logs_are_paged(boss):
    for n in range(130):
        record(boss, "test.event", boss, f"event number {n}")
    client = Client()
    client.force_login(boss)
    first = client.get("/audit/", {"action": "test."})
    assert len(audit_rows(first)) == 100
    assert "Page 1 of 2" in page_text(first)
    assert audit_rows(first)[0]["What"] == "event number 129"
    # The "Older" link keeps the filter.
    older = re.search(r'href="([^"]+)">Older<', first.content.decode()).group(1)
    second = client.get("/audit/" + html.unescape(older))
    assert len(audit_rows(second)) == 30
    assert {r["Action"] for r in audit_rows(second)} == {"test.event"}
    assert audit_rows(second)[-1]["What"] == "event number 0"


def test_user_detail_shows_recent_activity(boss, ann):
    record(boss, "user.promote", ann, "promoted ann")
    record(ann, "sshkey.add", None, "added SSH key 'x'")
    client = Client()
    client.force_login(boss)
    text = page_text(client.get(f"/users/{ann.pk}/"))
    assert "boss: promoted ann" in text and "ann: added SSH key 'x'" in text


# --- from where: the client's address, also behind a proxy ------------------------------

def _from_of_last(reader, action):
    """The "From" column of the newest row of `action`, as the log page shows it."""
    row = next(r for r in audit_rows(reader.get("/audit/", {"action": action})) if r["Action"] == action)
    return row["From"]


@pytest.fixture
def reader(boss):
    client = Client()  # logged in before the events under test: its own login is older
    client.force_login(boss)
    return client


def _as_seen_through_a_proxy(boss):
    """A failed and a successful login and an account created, each arriving from the
    proxy's address (10.9.8.7) with X-Forwarded-For naming where they came from."""
    Client(REMOTE_ADDR="10.9.8.7").post("/accounts/login/", {"login": "boss", "password": "typo-Quiet"},
                                        HTTP_X_FORWARDED_FOR="203.0.113.5, 198.51.100.7")
    client = Client(REMOTE_ADDR="10.9.8.7")
    client.post("/accounts/login/", {"login": "boss", "password": BOSS_PASSWORD},
                HTTP_X_FORWARDED_FOR="198.51.100.8")
    client.post("/users/new/", {"name": "Carl", "username": "carl", "email": "carl@uni.test"},
                HTTP_X_FORWARDED_FOR="198.51.100.8")


def test_behind_a_proxy_the_log_shows_the_real_client(boss, reader, settings, django_capture_on_commit_callbacks):
    settings.ALLAUTH_TRUSTED_PROXY_COUNT = 1  # LAB_BEHIND_PROXY=1
    with django_capture_on_commit_callbacks(execute=False):
        _as_seen_through_a_proxy(boss)
    # The address the proxy appended; what the client wrote before it is not believed.
    assert _from_of_last(reader, "auth.login_failed") == "198.51.100.7"
    assert _from_of_last(reader, "auth.login") == "198.51.100.8"
    assert _from_of_last(reader, "user.create") == "198.51.100.8"


def test_without_lab_behind_proxy_the_log_shows_the_connecting_address(boss, reader, settings,
                                                                       django_capture_on_commit_callbacks):
    assert settings.ALLAUTH_TRUSTED_PROXY_COUNT == 0
    with django_capture_on_commit_callbacks(execute=False):
        _as_seen_through_a_proxy(boss)
    for action in ("auth.login_failed", "auth.login", "user.create"):
        assert _from_of_last(reader, action) == "10.9.8.7"
