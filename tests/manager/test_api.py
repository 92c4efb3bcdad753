"""The JSON API (/api/v1/): every endpoint for every persona, errors, SSH keys, OpenAPI."""

import json
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from manager.accounts import services
from manager.accounts.models import AccessToken, SSHKey, User
from manager.audit.models import AuditEvent
from manager.jobs.models import Job
from tests.conftest import make_persona, need

pytestmark = pytest.mark.django_db

API = "/api/v1"


# --- personas -------------------------------------------------------------------------

def _user(username, **extra):
    user = User.objects.create(username=username, email=f"{username}@lab.example", name=username.title(), **extra)
    user.set_unusable_password()
    user.save()
    return user


def _token(user, name="test"):
    return services.create_token(user, name=name)[1]


@pytest.fixture
def boss(db):
    return make_persona("boss", email="boss@lab.example")  # as the list of accounts shows him


@pytest.fixture
def alice():
    return _user("alice")


@pytest.fixture
def personas(boss, alice, bob):
    """Authorization header values by persona name."""
    carol = _user("carol")
    carol_token = _token(carol)
    services.set_active(boss, carol, False)
    revoked_owner = _user("dave")
    revoked = _token(revoked_owner)
    services.revoke_token(revoked_owner, AccessToken.objects.get(user=revoked_owner))
    return {
        "superuser": f"Bearer {_token(boss)}",
        "alice": f"Bearer {_token(alice)}",
        "bob": f"Bearer {_token(bob)}",
        "anonymous": None,
        "bad token": "Bearer olm_not-a-real-token",
        "revoked token": f"Bearer {revoked}",
        "deactivated user": f"Bearer {carol_token}",
        "wrong scheme": "Basic Ym9zczpzZWNyZXQ=",
        "empty bearer": "Bearer ",
    }


class Caller:
    def __init__(self, client, authorization):
        self.client = client
        self.authorization = authorization

    def __call__(self, method, path, body=None, raw=None):
        headers = {"Authorization": self.authorization} if self.authorization else {}
        kwargs = {"headers": headers}
        if raw is not None:  # sent as is, with Content-Type: application/json
            kwargs.update(data=raw, content_type="application/json")
        elif body is not None:
            kwargs.update(data=json.dumps(body), content_type="application/json")
        return getattr(self.client, method.lower())(API + path, **kwargs)


@pytest.fixture
def call(client, personas):
    return lambda persona: Caller(client, personas[persona])


def detail(response) -> str:
    assert response["Content-Type"].startswith("application/json"), response.content[:200]
    body = response.json()
    assert set(body) == {"detail"}, body
    assert isinstance(body["detail"], str) and body["detail"], body
    return body["detail"]


# --- keys -----------------------------------------------------------------------------

def openssh(private_key, comment="") -> str:
    text = private_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return f"{text} {comment}".strip()


def ed25519_key(comment="me@laptop"):
    return openssh(ed25519.Ed25519PrivateKey.generate(), comment)


def ssh_keygen_fingerprint(public_key: str, tmp_path) -> str:
    path = tmp_path / "key.pub"
    path.write_text(public_key + "\n")
    out = subprocess.run(["ssh-keygen", "-lf", str(path)], capture_output=True, text=True, check=True).stdout
    return out.split()[1]  # "256 SHA256:… comment (ED25519)"


# --- authentication: every endpoint refuses every persona without a usable token -------

def _endpoints(alice_key_id=1):
    return [
        ("GET", "/users", None),
        ("POST", "/users", {"username": "newbie", "email": "newbie@lab.example"}),
        ("GET", "/users/alice", None),
        ("GET", "/me", None),
        ("GET", "/me/ssh-keys", None),
        ("POST", "/me/ssh-keys", {"title": "k", "key": "ssh-ed25519 AAAA"}),
        ("DELETE", f"/me/ssh-keys/{alice_key_id}", None),
    ]


UNAUTHENTICATED = ["anonymous", "bad token", "revoked token", "deactivated user", "wrong scheme", "empty bearer"]


@pytest.mark.parametrize("persona", UNAUTHENTICATED)
@pytest.mark.parametrize("method,path,body", _endpoints())
def test_every_endpoint_refuses_callers_without_a_usable_token(call, persona, method, path, body):
    count = User.objects.count()
    response = call(persona)(method, path, body)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    text = detail(response)
    if persona == "anonymous":
        assert "Authorization: Bearer" in text and "required" in text
        assert "error=" not in response["WWW-Authenticate"]
    elif persona in {"wrong scheme", "empty bearer"}:
        assert "Bearer" in text
        assert 'error="invalid_request"' in response["WWW-Authenticate"]
    else:
        assert "invalid" in text and "revoked" in text
        assert 'error="invalid_token"' in response["WWW-Authenticate"]
    assert User.objects.count() == count


def test_a_web_session_does_not_authenticate_the_api(client, boss):
    """Bearer only: a logged-in browser (and so a cross-site form) gets nowhere."""
    client.force_login(boss)
    assert client.get(f"{API}/users").status_code == 401
    response = client.post(f"{API}/users", {"username": "x", "email": "x@lab.example"}, content_type="application/json")
    assert response.status_code == 401
    assert not User.objects.filter(username="x").exists()


def test_token_last_used_at_is_recorded(client, alice):
    token_row, raw = services.create_token(alice, name="laptop")
    assert token_row.last_used_at is None
    response = client.get(f"{API}/me", headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 200
    token_row.refresh_from_db()
    assert token_row.last_used_at is not None


def test_scheme_is_case_insensitive_and_token_may_have_surrounding_spaces(client, alice):
    raw = _token(alice)
    response = client.get(f"{API}/me", headers={"Authorization": f"bearer   {raw}  "})
    assert response.status_code == 200
    assert response.json()["username"] == "alice"


def test_user_who_must_change_password_can_still_use_a_token(client, alice):
    alice.must_change_password = True
    alice.save()
    response = client.get(f"{API}/me", headers={"Authorization": f"Bearer {_token(alice)}"})
    assert response.status_code == 200


# --- /users ---------------------------------------------------------------------------

USER_FIELDS = {"id", "username", "email", "name", "is_superuser", "is_active", "date_joined", "last_login",
               "bot_monthly_budget_usd"}


@pytest.mark.parametrize("persona,status", [("superuser", 200), ("alice", 403), ("bob", 403)])
def test_list_users(call, persona, status):
    response = call(persona)("GET", "/users")
    assert response.status_code == status
    if status == 200:
        users = response.json()
        assert [u["username"] for u in users] == ["alice", "bob", "boss", "carol", "dave"]
        assert all(set(u) == USER_FIELDS for u in users)
        carol = next(u for u in users if u["username"] == "carol")
        assert carol["is_active"] is False
        boss = next(u for u in users if u["username"] == "boss")
        assert boss["is_superuser"] is True and boss["email"] == "boss@lab.example"
    else:
        assert detail(response) == "Only lab managers may list accounts."


@pytest.mark.parametrize("persona,status", [("superuser", 200), ("alice", 403), ("bob", 403)])
def test_get_user(call, persona, status):
    response = call(persona)("GET", "/users/ALICE")
    assert response.status_code == status
    if status == 200:
        assert response.json()["username"] == "alice"
        assert set(response.json()) == USER_FIELDS
    else:
        assert detail(response) == "Only lab managers may view accounts."


def test_get_unknown_user_is_404(call):
    response = call("superuser")("GET", "/users/nobody")
    assert response.status_code == 404
    assert "nobody" in detail(response)


def test_create_user(call, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = call("superuser")(
            "POST", "/users", {"username": "newbie", "email": "newbie@lab.example", "name": "New Bie"}
        )
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == USER_FIELDS
    assert body["username"] == "newbie" and body["name"] == "New Bie"
    assert body["is_superuser"] is False and body["is_active"] is True and body["last_login"] is None
    assert response["Location"] == "/api/v1/users/newbie"
    user = User.objects.get(username="newbie")
    assert user.pk == body["id"] and not user.has_usable_password()
    job = Job.objects.get(kind="accounts.invite")
    assert job.user.username == "boss" and "newbie" in job.label
    assert len(callbacks) == 1  # the invitation is enqueued once the transaction commits
    assert AuditEvent.objects.filter(action="user.create", actor__username="boss", target_id=str(user.pk)).exists()


def test_create_lab_manager(call):
    response = call("superuser")("POST", "/users", {"username": "boss2", "email": "b2@lab.example", "is_superuser": True})
    assert response.status_code == 201
    assert response.json()["is_superuser"] is True
    assert User.objects.get(username="boss2").is_superuser


@pytest.mark.parametrize("persona", ["alice", "bob"])
def test_experimenters_cannot_create_users(call, persona):
    response = call(persona)("POST", "/users", {"username": "sneaky", "email": "s@lab.example", "is_superuser": True})
    assert response.status_code == 403
    assert detail(response) == "Only lab managers may create accounts."
    assert not User.objects.filter(username="sneaky").exists()
    # refused before the body is even looked at
    assert call(persona)("POST", "/users", raw="{nonsense").status_code == 403


@pytest.mark.parametrize(
    "body,field",
    [
        ({"username": "ALICE", "email": "new@lab.example"}, "username"),
        ({"username": "newbie", "email": "Alice@Lab.Example"}, "email"),
    ],
)
def test_create_user_conflicts(call, body, field):
    count, jobs = User.objects.count(), Job.objects.count()
    response = call("superuser")("POST", "/users", body)
    assert response.status_code == 409
    assert detail(response).startswith(f"{field}: ")
    assert "already" in detail(response)
    assert (User.objects.count(), Job.objects.count()) == (count, jobs)


@pytest.mark.parametrize(
    "body,expected",
    [
        ({"username": "newbie", "email": "x"}, "email: 'x' is not a valid e-mail address."),
        ({"username": "new bie", "email": "n@lab.example"}, "username: Use only letters"),
        ({"username": "newbie", "email": "n@lab.example", "name": "x" * 151}, "name: "),
        ({"username": "u" * 151, "email": "n@lab.example"}, "username: "),
        ({"email": "n@lab.example"}, "username: this field is required."),
        ({"username": "newbie", "email": "n@lab.example", "is_admin": True}, "is_admin: unknown field."),
        ({"username": "newbie", "email": "n@lab.example", "is_superuser": "maybe"}, "is_superuser: "),
        ({"username": "", "email": ""}, "username: A username is required."),
        ([1, 2], "The request body must be a JSON object."),
    ],
)
def test_create_user_invalid_input(call, body, expected):
    count = User.objects.count()
    response = call("superuser")("POST", "/users", body)
    assert response.status_code == 422
    text = detail(response)
    assert text.startswith(expected) or expected in text, text
    assert "[" not in text and "{" not in text  # one readable string, never a dumped list
    assert User.objects.count() == count


def test_create_user_several_errors_in_one_string(call):
    response = call("superuser")("POST", "/users", {"username": "new bie", "email": "x"})
    text = detail(response)
    assert response.status_code == 422
    assert "username: " in text and "email: 'x' is not a valid e-mail address." in text


def test_overlong_name_names_the_field(call):
    response = call("superuser")("POST", "/users", {"username": "newbie", "email": "n@lab.example", "name": "x" * 151})
    assert response.status_code == 422
    text = detail(response)  # the service's message, as the web form shows it (no pydantic paraphrase)
    assert text.startswith("name: ") and "150" in text and "String should" not in text, text


@pytest.mark.parametrize("raw", ["{", "not json", '{"username": "a",}', "\xff"])
def test_malformed_json(call, raw):
    response = call("superuser")("POST", "/users", raw=raw)
    assert response.status_code == 400
    assert detail(response).startswith("The request body is not valid JSON")


def test_form_encoded_body_gets_a_hint(client, personas):
    response = client.post(f"{API}/users", {"username": "x"}, headers={"Authorization": personas["superuser"]})
    assert response.status_code == 400
    assert "Content-Type: application/json" in detail(response)


def test_unexpected_errors_are_json_500(call, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(services, "create_user", crash)
    response = call("superuser")("POST", "/users", {"username": "newbie", "email": "n@lab.example"})
    assert response.status_code == 500
    assert "server log" in detail(response) and "boom" not in detail(response)


def test_missing_body(call):
    response = call("superuser")("POST", "/users", raw="")
    assert response.status_code == 422
    assert detail(response) == "The request body is missing: send a JSON object."


def test_body_too_large(call, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = call("superuser")("POST", "/users", {"username": "newbie", "email": "n@lab.example", "name": "x" * 2000})
    assert response.status_code == 413
    assert "too large" in detail(response)


# --- /me ------------------------------------------------------------------------------

@pytest.mark.parametrize("persona,username", [("superuser", "boss"), ("alice", "alice"), ("bob", "bob")])
def test_me(call, persona, username):
    response = call(persona)("GET", "/me")
    assert response.status_code == 200
    assert response.json()["username"] == username
    assert set(response.json()) == USER_FIELDS


# --- /me/ssh-keys ---------------------------------------------------------------------

KEY_FIELDS = {"id", "title", "key_type", "bits", "fingerprint", "created_at", "last_used_at"}


@pytest.mark.parametrize(
    "make,key_type,bits",
    [
        (lambda: ed25519.Ed25519PrivateKey.generate(), "ssh-ed25519", 256),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ecdsa-sha2-nistp256", 256),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "ecdsa-sha2-nistp384", 384),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "ssh-rsa", 2048),
    ],
)
@pytest.mark.parametrize("persona", ["superuser", "alice"])
def test_add_ssh_key(call, tmp_path, persona, make, key_type, bits):
    need(shutil.which("ssh-keygen") is not None, "ssh-keygen")
    public = openssh(make(), "me@laptop")
    response = call(persona)("POST", "/me/ssh-keys", {"title": "Laptop", "key": public})
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == KEY_FIELDS
    assert (body["title"], body["key_type"], body["bits"]) == ("Laptop", key_type, bits)
    assert body["fingerprint"] == ssh_keygen_fingerprint(public, tmp_path)
    assert body["last_used_at"] is None
    key = SSHKey.objects.get(pk=body["id"])
    assert key.user.username == {"superuser": "boss", "alice": "alice"}[persona]


def test_ssh_key_title_defaults_to_comment(call):
    response = call("alice")("POST", "/me/ssh-keys", {"key": ed25519_key("alice@lab-pc")})
    assert response.status_code == 201
    assert response.json()["title"] == "alice@lab-pc"


def test_weak_rsa_key_is_refused_with_its_bits(call):
    weak = openssh(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    response = call("alice")("POST", "/me/ssh-keys", {"title": "old", "key": weak})
    assert response.status_code == 422
    text = detail(response)
    assert text.startswith("key: ") and "1024" in text and "2048" in text
    assert not SSHKey.objects.exists()


@pytest.mark.parametrize(
    "key,words",
    [
        ("garbage", "Not an SSH public key"),
        ("ssh-ed25519 !!!notbase64", "base64"),
        ("ssh-ed25519 AAAA", "does not match"),
        ("", "Paste a public key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----", "private key"),
    ],
)
def test_invalid_ssh_key(call, key, words):
    response = call("alice")("POST", "/me/ssh-keys", {"title": "x", "key": key})
    assert response.status_code == 422
    text = detail(response)
    assert text.startswith("key: ") and words in text, text
    assert not SSHKey.objects.exists()


def test_ssh_key_title_too_long(call):
    response = call("alice")("POST", "/me/ssh-keys", {"title": "t" * 101, "key": ed25519_key()})
    assert response.status_code == 422
    assert detail(response).startswith("title: ")


def test_duplicate_ssh_key(call):
    public = ed25519_key()
    assert call("alice")("POST", "/me/ssh-keys", {"title": "one", "key": public}).status_code == 201
    again = call("alice")("POST", "/me/ssh-keys", {"title": "two", "key": public})
    assert again.status_code == 409
    assert "already added" in detail(again)
    theirs = call("bob")("POST", "/me/ssh-keys", {"title": "mine", "key": public})
    assert theirs.status_code == 409
    assert "another account" in detail(theirs)
    assert SSHKey.objects.count() == 1


def test_list_ssh_keys_shows_only_own_keys(call, alice, bob):
    for persona, title in [("alice", "a1"), ("bob", "b1"), ("alice", "a2")]:
        assert call(persona)("POST", "/me/ssh-keys", {"title": title, "key": ed25519_key()}).status_code == 201
    alice_keys = call("alice")("GET", "/me/ssh-keys").json()
    assert [k["title"] for k in alice_keys] == ["a1", "a2"]
    assert all(set(k) == KEY_FIELDS for k in alice_keys)
    assert [k["title"] for k in call("bob")("GET", "/me/ssh-keys").json()] == ["b1"]
    assert call("superuser")("GET", "/me/ssh-keys").json() == []


def test_delete_own_ssh_key(call):
    key_id = call("alice")("POST", "/me/ssh-keys", {"title": "a", "key": ed25519_key()}).json()["id"]
    response = call("alice")("DELETE", f"/me/ssh-keys/{key_id}")
    assert response.status_code == 204
    assert response.content == b""
    assert not SSHKey.objects.filter(pk=key_id).exists()
    assert AuditEvent.objects.filter(action="sshkey.remove", actor__username="alice").exists()
    again = call("alice")("DELETE", f"/me/ssh-keys/{key_id}")
    assert again.status_code == 404


@pytest.mark.parametrize("persona", ["alice", "superuser"])
def test_cannot_delete_someone_elses_ssh_key(call, persona):
    key_id = call("bob")("POST", "/me/ssh-keys", {"title": "b", "key": ed25519_key()}).json()["id"]
    response = call(persona)("DELETE", f"/me/ssh-keys/{key_id}")
    assert response.status_code == 404
    assert detail(response) == f"You have no SSH key with id {key_id}."
    assert SSHKey.objects.filter(pk=key_id, user__username="bob").exists()


def test_delete_ssh_key_with_a_non_numeric_id(call):
    response = call("alice")("DELETE", "/me/ssh-keys/abc")
    assert response.status_code == 422
    assert detail(response).startswith("key_id: ")


# --- the rest of /api/v1/ -------------------------------------------------------------

def test_wrong_method_is_json_405(call):
    response = call("superuser")("PUT", "/users", {"username": "x"})
    assert response.status_code == 405
    assert "PUT" in detail(response)
    assert "GET" in response["Allow"] and "POST" in response["Allow"]


@pytest.mark.parametrize("path", ["/nothing-here", "/users/", "/me/ssh-keys/1/extra"])
@pytest.mark.parametrize("persona", ["superuser", "anonymous"])
def test_unknown_paths_are_json_404(call, path, persona):
    response = call(persona)("GET", path)
    assert response.status_code == 404
    assert "no API endpoint" in detail(response)


def test_index(client):
    response = client.get(f"{API}/")
    assert response.status_code == 200
    assert response.json()["openapi"] == "/api/v1/openapi.json"
    assert response.json()["docs"] == "/api/v1/docs"


def test_openapi_document(client):
    response = client.get(f"{API}/openapi.json")
    assert response.status_code == 200
    doc = json.loads(response.content)
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    assert {"/api/v1/users", "/api/v1/users/{username}", "/api/v1/me", "/api/v1/me/ssh-keys",
            "/api/v1/me/ssh-keys/{key_id}"} <= set(paths)
    assert set(paths["/api/v1/users"]) == {"get", "post"}
    assert set(paths["/api/v1/me/ssh-keys"]) == {"get", "post"}
    assert set(paths["/api/v1/me/ssh-keys/{key_id}"]) == {"delete"}
    scheme = doc["components"]["securitySchemes"]["BearerToken"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert operation["security"] == [{"BearerToken": []}], (path, method)
            assert operation["responses"]["401"]["content"]["application/json"]["schema"] == error_ref
    users = paths["/api/v1/users"]
    assert {"401", "403", "409", "422"} <= set(users["post"]["responses"])
    assert "201" in users["post"]["responses"]
    assert "403" in users["get"]["responses"]
    assert {"404"} <= set(paths["/api/v1/me/ssh-keys/{key_id}"]["delete"]["responses"])
    assert {"409", "422"} <= set(paths["/api/v1/me/ssh-keys"]["post"]["responses"])
    user_in = doc["components"]["schemas"]["UserIn"]
    assert set(user_in["required"]) == {"username", "email"}
    assert user_in["properties"]["name"]["maxLength"] == 150


def test_docs_use_bundled_static_files(client):
    response = client.get(f"{API}/docs")
    assert response.status_code == 200
    html = response.content.decode()
    assert "/static/ninja/swagger-ui-bundle.js" in html
    assert "cdn" not in html.lower() and "https://" not in html
    assert "/api/v1/openapi.json" in html
    asset = client.get("/static/ninja/swagger-ui-bundle.js")
    assert asset.status_code == 200
