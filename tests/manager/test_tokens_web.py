"""Personal access tokens on Settings → Access tokens, as their owner sees them."""

import hashlib
import html
import re

import pytest
from django.test import Client
from django.utils import timezone

from manager.accounts import services
from manager.accounts.models import AccessToken
from manager.audit.models import AuditEvent

pytestmark = pytest.mark.django_db

URL = "/settings/tokens/"


def page_text(response) -> str:
    body = response.content.decode()
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", body, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def tokens_table(response) -> list[list[str]]:
    """The rows of the tokens table, as lists of cell texts."""
    body = response.content.decode()
    table = re.search(r'<table[^>]*id="tokens".*?</table>', body, flags=re.S)
    if table is None:
        return []
    rows = re.findall(r"<tr>(.*?)</tr>", table.group(0).split("<tbody>")[1], flags=re.S)
    return [[" ".join(html.unescape(re.sub(r"<[^>]+>", " ", cell)).split())
             for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)] for row in rows]


@pytest.fixture
def ann_client(ann):
    client = Client()
    client.force_login(ann)
    return client


def create(client, name="laptop git push"):
    response = client.post(URL, {"name": name})
    # Post/redirect/get: reloading the page that shows the token cannot create another one.
    assert response.status_code == 302 and response["Location"] == URL
    response = client.get(URL)
    assert response.status_code == 200
    match = re.search(r'id="new-token-value" readonly value="([^"]+)"', response.content.decode())
    assert match, page_text(response)
    return response, html.unescape(match.group(1))


def api_me(raw):
    return Client().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {raw}")


def test_token_is_shown_once_and_only_its_hash_is_stored(ann, ann_client):
    response = ann_client.get(URL)
    assert "Copy your new token now" not in page_text(response)

    response, raw = create(ann_client)
    text = page_text(response)
    assert "Copy your new token now: it is shown only this once." in text
    assert raw.startswith("olm_") and len(raw) > 40

    # Never again: not on reload, not on any other page of ann's.
    for path in (URL, "/", "/settings/", "/settings/keys/"):
        assert raw not in ann_client.get(path).content.decode(), path
    # The list shows the name and a short prefix only.
    rows = tokens_table(ann_client.get(URL))
    assert len(rows) == 1
    name, shown, _created, last_used, _ = rows[0]
    assert name == "laptop git push"
    assert shown == raw[:10] + "…"
    assert last_used == "never"

    # The database keeps only the hash.
    token = AccessToken.objects.get(user=ann)
    assert token.token_hash == hashlib.sha256(raw.encode()).hexdigest()
    row = AccessToken.objects.filter(pk=token.pk).values().get()
    assert not any(raw in str(value) for value in row.values())
    assert not any(raw[10:20] in str(value) for value in row.values())  # not even a middle part
    # Nor does the audit log.
    for event in AuditEvent.objects.all():
        assert raw not in f"{event.summary} {event.data} {event.target_repr}"


def test_last_used_is_never_then_a_time(ann, ann_client):
    _, raw = create(ann_client)
    assert tokens_table(ann_client.get(URL))[0][3] == "never"

    before = timezone.now().replace(microsecond=0)
    response = api_me(raw)
    assert response.status_code == 200 and response.json()["username"] == "ann"

    token = AccessToken.objects.get(user=ann)
    assert token.last_used_at is not None and token.last_used_at >= before
    last_used = tokens_table(ann_client.get(URL))[0][3]
    assert last_used == timezone.localtime(token.last_used_at).strftime("%Y-%m-%d %H:%M")


def test_revoked_token_no_longer_works(ann, ann_client):
    _, keep = create(ann_client, "script")
    _, raw = create(ann_client, "old laptop")
    assert api_me(raw).status_code == 200
    token = AccessToken.objects.get(user=ann, name="old laptop")

    response = ann_client.post(f"/settings/tokens/{token.pk}/revoke/", follow=True)
    assert response.redirect_chain == [(URL, 302)]
    assert "Token “old laptop” revoked: it no longer works." in page_text(response)
    assert [row[0] for row in tokens_table(response)] == ["script"]

    response = api_me(raw)
    assert response.status_code == 401
    assert "invalid or has been revoked" in response.json()["detail"]
    assert api_me(keep).status_code == 200  # the other token is untouched
    assert ann_client.get(f"/settings/tokens/{token.pk}/revoke/").status_code == 405
    assert ann_client.post(f"/settings/tokens/{token.pk}/revoke/").status_code == 404  # already gone


def test_several_tokens_are_listed_newest_first_and_raw_values_differ(ann_client):
    raws = [create(ann_client, name)[1] for name in ("first", "second", "third")]
    assert len(set(raws)) == 3
    assert [row[0] for row in tokens_table(ann_client.get(URL))] == ["third", "second", "first"]


def test_only_own_tokens_are_listed(ann, ann_client, bob):
    services.create_token(bob, name="bob's secret script")
    create(ann_client, "mine")
    text = page_text(ann_client.get(URL))
    assert "mine" in text and "bob's secret script" not in text


@pytest.mark.parametrize("name, message", [
    ("", "This field is required."),
    ("   ", "This field is required."),
    ("n" * 101, "At most 100 characters (this one has 101)."),
    ("laptop\x00", "The name contains a NUL character."),
])
def test_bad_token_name(ann_client, name, message):
    response = ann_client.post(URL, {"name": name})
    assert response.status_code == 200
    text = page_text(response)
    assert message in text and "Copy your new token now" not in text
    assert not AccessToken.objects.exists()


def test_token_of_a_deactivated_account_stops_working(ann, ann_client, boss):
    _, raw = create(ann_client)
    services.set_active(boss, ann, False)
    assert api_me(raw).status_code == 401
    services.set_active(boss, ann, True)
    assert api_me(raw).status_code == 200


def test_lab_manager_sees_that_a_token_exists_but_not_its_value(ann, ann_client, boss):
    _, raw = create(ann_client, "analysis script")
    manager = Client()
    manager.force_login(boss)
    response = manager.get(f"/users/{ann.pk}/")
    text = page_text(response)
    assert "Access tokens (1)" in text and "analysis script" in text and raw[:10] in text
    assert raw not in response.content.decode()
