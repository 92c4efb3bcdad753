"""Hostile texts and settings (issue 12): each is refused by the service with one specific
message, which the JSON API (422 "field: message") and the web form show alike; nothing is
stored, and the refusal comes before the database.

SQLite stores a NUL; PostgreSQL cannot (the suite runs on either, see LAB_TEST_DB). Every
test here runs with `postgres_text_rules`: a query whose parameters hold a NUL or a lone
surrogate fails as it does on PostgreSQL, so a check that came after a query would fail
these tests on SQLite too (as an error, not as the expected message)."""

import html
import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from django.core.exceptions import ValidationError
from django.db import connection
from django.test import Client

from bots.models import BotRun
from instances import releases, services, state
from instances.models import Instance, Release
from lobby import services as lobby
from manager import texts
from manager.accounts import services as accounts
from manager.accounts.models import AccessToken, SSHKey, User
from manager.jobs import services as jobs
from manager.jobs.models import Job

pytestmark = pytest.mark.django_db

NUL_TEXT = "ab\x00cd-efgh"
SURROGATE_TEXT = "ab\ud800cd-efgh"  # what a JSON "\ud800" escape becomes


def _unfit(value) -> bool:
    return isinstance(value, str) and texts.problem(value) is not None


def _params(params):
    if isinstance(params, dict):
        params = params.values()
    for value in params or ():
        if isinstance(value, (list, tuple, dict)):
            yield from _params(value)
        else:
            yield value


@pytest.fixture(autouse=True)
def postgres_text_rules():
    """Queries fail on a NUL or a lone surrogate in their text or parameters, as psycopg
    and PostgreSQL refuse them ("A string literal cannot contain NUL (0x00) characters.")."""
    seen = []

    def execute(run, sql, params, many, context):
        if _unfit(sql) or any(_unfit(value) for value in _params(params)):
            seen.append(sql)
            raise ValueError("A string literal cannot contain NUL (0x00) characters (as on PostgreSQL).")
        return run(sql, params, many, context)

    with connection.execute_wrapper(execute):
        yield seen
    assert seen == [], "a hostile text reached the database"


def page_text(response) -> str:
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", response.content.decode(), flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


@pytest.fixture
def lab():
    boss = User.objects.create_user("boss", "boss@lab.test", "pw-boss-123456", is_superuser=True, is_staff=True)
    ann = User.objects.create_user("ann", "ann@lab.test", "pw-ann-1234567", name="Ann A")
    instance = services.create_instance(boss, name="hostile", owner=ann)
    instance.refresh_from_db()
    return boss, ann, instance


def api_client(user) -> Client:
    _, raw = accounts.create_token(user, name="test", throttled=False)
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


def web_client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def stored(instance: Instance) -> tuple:
    instance.refresh_from_db()
    return (instance.config_vars, instance.admin_password, instance.memory_mb, instance.cpus, instance.generation)


# --- instance settings: API and form, the same message ---------------------------------------
# (field of the form, API body, form data, message). Lone surrogates reach the API only: a
# form's body is decoded with replacement characters.

ENV_CASES = [
    ("name with a line break", {"X\n": "1"}, None,
     "'X\\n' is not a valid variable name: it contains a line break (U+000A)"),
    ("two names that would collapse", {"X": "1", "X\n": "2"}, None, "'X\\n' is not a valid variable name"),
    ("name with a no-break space", {"X\u00a0": "1"}, "X\u00a0=1",
     "'X\\xa0' is not a valid variable name: it contains U+00A0 NO-BREAK SPACE"),
    ("name with a NUL", {"X\x00": "1"}, "X\x00=1", "'X\\x00' is not a valid variable name: it contains a NUL"),
    ("value with a NUL", {"S": NUL_TEXT}, f"S={NUL_TEXT}", "The value of S contains a NUL character."),
    ("value with a lone surrogate", {"S": "a\ud800b"}, None,
     "The value of S contains an invalid character (a lone surrogate, U+D800)."),
    ("LD_PRELOAD", {"LD_PRELOAD": "/tmp/x.so"}, "LD_PRELOAD=/tmp/x.so",
     "LD_PRELOAD changes how programs are loaded and cannot be set as a config var."),
    ("LD_LIBRARY_PATH", {"LD_LIBRARY_PATH": "/tmp"}, "LD_LIBRARY_PATH=/tmp",
     "LD_LIBRARY_PATH changes how programs are loaded and cannot be set as a config var."),
    ("ld_preload", {"ld_preload": "/tmp/x.so"}, "ld_preload=/tmp/x.so",
     "ld_preload changes how programs are loaded and cannot be set as a config var."),
    ("PYTHONHOME", {"PYTHONHOME": "/nowhere"}, "PYTHONHOME=/nowhere",
     "PYTHONHOME changes how Python starts and cannot be set as a config var."),
    ("PYTHONSTARTUP", {"PYTHONSTARTUP": "/tmp/x.py"}, "PYTHONSTARTUP=/tmp/x.py",
     "PYTHONSTARTUP changes how Python starts and cannot be set as a config var."),
    ("PYTHONWARNINGS", {"PYTHONWARNINGS": "error"}, "PYTHONWARNINGS=error",
     "PYTHONWARNINGS changes how Python starts and cannot be set as a config var."),
    ("GCONV_PATH", {"GCONV_PATH": "/tmp"}, "GCONV_PATH=/tmp",
     "GCONV_PATH makes the C library load other code and cannot be set as a config var."),
    ("GLIBC_TUNABLES", {"GLIBC_TUNABLES": "glibc.malloc.check=3"}, "GLIBC_TUNABLES=glibc.malloc.check=3",
     "GLIBC_TUNABLES changes how the C library and the program loader start"),
    ("TMPDIR", {"TMPDIR": "/tmp"}, "TMPDIR=/tmp", "TMPDIR is set by the manager"),
    ("too large together", {f"V{i}": "x" * 4000 for i in range(20)},
     "\n".join(f"V{i}={'x' * 4000}" for i in range(20)),
     "The config vars are too large together (80090 bytes as the app's environment, at most 65536)."),
]


@pytest.mark.parametrize("body, form, message", [c[1:] for c in ENV_CASES], ids=[c[0] for c in ENV_CASES])
def test_hostile_config_vars_are_refused_alike_by_the_api_and_the_form(lab, body, form, message):
    boss, ann, instance = lab
    services.update_settings(ann, instance, env={"KEEP": "me"})
    before = stored(instance)
    response = api_client(ann).patch("/api/v1/instances/hostile", {"env": body}, content_type="application/json")
    assert response.status_code == 422, response.content
    assert response.json()["detail"].startswith("env: ") and message in response.json()["detail"]
    if form is not None:
        page = web_client(ann).post("/instances/hostile/settings/", {"auth_level": "STUDY", "production": "on",
                                                                     "env": form})
        assert page.status_code == 422 and message in page_text(page)
    assert stored(instance) == before


def test_the_form_refuses_a_name_set_twice_instead_of_merging(lab):
    boss, ann, instance = lab
    page = web_client(ann).post("/instances/hostile/settings/", {"auth_level": "STUDY", "env": "X=1\nX=2"})
    assert page.status_code == 422 and "Line 2 sets X again (line 1 set it already)." in page_text(page)
    assert stored(instance)[0] == {}


@pytest.mark.parametrize("name", ["X ", " X", "X\t"])
def test_a_name_with_blanks_around_it_is_refused_alike_by_the_api_and_the_form(lab, name):
    """The form took `X =1` as X (it trimmed names) while the API refused "X ": now both refuse
    it, with the same sentence (names are taken exactly as given)."""
    boss, ann, instance = lab
    message = services.config_name_refusal(name)
    assert message.startswith(f"{name!r} is not a valid variable name: it contains ")
    response = api_client(ann).patch("/api/v1/instances/hostile", {"env": {name: "1"}},
                                     content_type="application/json")
    assert response.status_code == 422 and response.json()["detail"] == f"env: {message}"
    page = web_client(ann).post("/instances/hostile/settings/", {"auth_level": "STUDY", "env": f"{name}=1"})
    assert page.status_code == 422 and message in page_text(page)
    assert stored(instance)[0] == {}
    # Blanks around the value are layout on the page (a line `X= 1` sets X to "1").
    assert web_client(ann).post("/instances/hostile/settings/", {"auth_level": "STUDY", "env": "X= 1 "}).status_code \
        == 302
    assert stored(instance)[0] == {"X": "1"}


def test_names_are_stored_exactly_as_given_and_allowed_ones_pass(lab):
    boss, ann, instance = lab
    allowed = {"x": "1", "X": "2", "MALLOC_ARENA_MAX": "2", "LANG": "C.UTF-8", "S": "multi\nline ✓"}
    response = api_client(ann).patch("/api/v1/instances/hostile", {"env": allowed}, content_type="application/json")
    assert response.status_code == 200 and response.json()["env"] == allowed
    assert stored(instance)[0] == allowed


PASSWORD_CASES = [
    ("NUL", "abcdefgh\x00ij", "The oTree admin password contains a NUL character."),
    ("line break", "abcdefgh\nij", "The oTree admin password contains a line break (U+000A), which is not allowed"),
    ("escape", "abcdefgh\x1b[2J", "The oTree admin password contains a control character (U+001B)"),
    ("too short", "short", "The oTree admin password must have 8 to 128 characters (this one has 5)."),
]


@pytest.mark.parametrize("password, message", [c[1:] for c in PASSWORD_CASES], ids=[c[0] for c in PASSWORD_CASES])
def test_hostile_admin_passwords_are_refused_alike(lab, password, message):
    boss, ann, instance = lab
    before = stored(instance)
    response = api_client(ann).post("/api/v1/instances/hostile/admin-password", {"password": password},
                                    content_type="application/json")
    assert response.status_code == 422, response.content
    assert response.json()["detail"].startswith(f"password: {message}")
    page = web_client(ann).post("/instances/hostile/admin-password/", {"password": password})
    assert page.status_code == 422 and message in page_text(page)
    assert stored(instance) == before


def test_a_surrogate_in_the_admin_password_is_refused(lab):
    boss, ann, instance = lab
    response = api_client(ann).post("/api/v1/instances/hostile/admin-password", {"password": SURROGATE_TEXT},
                                    content_type="application/json")
    assert response.status_code == 422
    assert "contains an invalid character (a lone surrogate, U+D800)" in response.json()["detail"]


def test_the_form_keeps_the_admin_password_as_typed(lab):
    boss, ann, instance = lab
    web_client(ann).post("/instances/hostile/admin-password/", {"password": "  spaced pw  "})
    assert stored(instance)[1] == "  spaced pw  "  # what the API would store too


LIMIT_CASES = [
    ("cpus below the range before rounding", {"cpus": 0.099}, {"memory_mb": "512", "cpus": "0.099"},
     "CPUs must be between 0.1 and 16 (this is 0.099)."),
    ("cpus with three decimals", {"cpus": 1.005}, {"memory_mb": "512", "cpus": "1.005"},
     "CPUs take at most two decimals, e.g. 0.25 (this is 1.005); nothing is rounded."),
    ("cpus above", {"cpus": 16.01}, {"memory_mb": "512", "cpus": "16.01"}, "CPUs must be between 0.1 and 16"),
    ("memory below", {"memory_mb": 64}, {"memory_mb": "64", "cpus": "1"}, "Memory must be between 128 and 16384 MiB."),
]


@pytest.mark.parametrize("body, form, message", [c[1:] for c in LIMIT_CASES], ids=[c[0] for c in LIMIT_CASES])
def test_limits_are_checked_as_given_alike(lab, body, form, message):
    boss, ann, instance = lab
    before = stored(instance)
    response = api_client(boss).patch("/api/v1/instances/hostile", body, content_type="application/json")
    assert response.status_code == 422 and message in response.json()["detail"], response.content
    page = web_client(boss).post("/instances/hostile/limits/", form)
    assert page.status_code == 422 and message in page_text(page)
    assert stored(instance) == before


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "Infinity", "NaN", "-inf", True, [], "two"])
def test_cpus_that_are_no_finite_number_are_refused_by_the_service(lab, value):
    boss, ann, instance = lab
    with pytest.raises(ValidationError) as exc:
        services.update_settings(boss, instance, cpus=value)
    assert exc.value.message_dict["cpus"][0].startswith("CPUs must be a")


@pytest.mark.parametrize("value", [True, False, 512.0, "512"])
def test_memory_is_a_whole_number_and_a_bool_is_none(lab, value):
    boss, ann, instance = lab
    with pytest.raises(ValidationError) as exc:
        services.update_settings(boss, instance, memory_mb=value)
    assert exc.value.message_dict == {"memory_mb": ["Memory must be a whole number of MiB."]}
    assert stored(instance)[2] == 512


def test_limits_in_range_are_stored(lab):
    boss, ann, instance = lab
    services.update_settings(boss, instance, memory_mb=1024, cpus=0.1)
    memory_mb, cpus = stored(instance)[2:4]
    assert (memory_mb, str(cpus)) == (1024, "0.10")


# --- accounts, SSH keys, tokens, bot runs, the lobby ---------------------------------------------

def _public_key(comment="me@laptop") -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + \
        f" {comment}"


ACCOUNT_CASES = [
    ("name NUL", {"name": "Ann\x00"}, "name: The name contains a NUL character."),
    ("username NUL", {"username": "newbie\x00"}, "username: The username contains a NUL character."),
    ("email NUL", {"email": "new\x00@lab.test"}, "email: The e-mail address contains a NUL character."),
    ("name with a line break", {"name": "Ann\nB"}, "name: The name contains a line break (U+000A)"),
]


@pytest.mark.parametrize("fields, message", [c[1:] for c in ACCOUNT_CASES], ids=[c[0] for c in ACCOUNT_CASES])
def test_hostile_account_fields_are_refused_alike(lab, fields, message):
    boss, ann, instance = lab
    data = {"username": "newbie", "email": "newbie@lab.test", "name": "New", **fields}
    response = api_client(boss).post("/api/v1/users", data, content_type="application/json")
    assert response.status_code == 422 and message in response.json()["detail"], response.content
    page = web_client(boss).post("/users/new/", data)
    field, text = message.split(": ", 1)
    assert text in page_text(page)
    assert not User.objects.filter(username__startswith="newbie").exists()


def test_surrogates_in_account_fields_are_refused(lab):
    boss, ann, instance = lab
    response = api_client(boss).post("/api/v1/users", {"username": "newbie", "email": "newbie@lab.test",
                                                       "name": "A\udfffB"}, content_type="application/json")
    assert response.status_code == 422
    assert response.json()["detail"] == "name: The name contains an invalid character (a lone surrogate, U+DFFF)."


@pytest.mark.parametrize("title, key_comment, message", [
    ("work\x00laptop", "me@laptop", "title: The title contains a NUL character."),
    ("", "me\x1b[2Jlaptop", "title: The title (the key's comment) contains a control character (U+001B), which is "
     "not allowed here."),
    ("work\ud800", "me@laptop", "title: The title contains an invalid character (a lone surrogate, U+D800)."),
])
def test_hostile_ssh_key_titles_are_refused(lab, title, key_comment, message):
    boss, ann, instance = lab
    key = _public_key(key_comment)
    response = api_client(ann).post("/api/v1/me/ssh-keys", {"title": title, "key": key},
                                    content_type="application/json")
    assert response.status_code == 422 and response.json()["detail"] == message, response.content
    if "\ud800" not in title:
        page = web_client(ann).post("/settings/keys/", {"title": title, "key": key})
        assert message.split(": ", 1)[1] in page_text(page)
    assert not SSHKey.objects.exists()


def test_a_nul_in_the_key_itself_is_refused(lab):
    boss, ann, instance = lab
    response = api_client(ann).post("/api/v1/me/ssh-keys", {"title": "", "key": _public_key() + "\x00"},
                                    content_type="application/json")
    assert response.status_code == 422 and response.json()["detail"] == "key: The key contains a NUL character."


def test_hostile_token_names_are_refused(lab):
    boss, ann, instance = lab
    with pytest.raises(ValidationError) as exc:
        accounts.create_token(ann, name="a\ud800", throttled=False)
    assert exc.value.message_dict == {"name": ["The name contains an invalid character (a lone surrogate, U+D800)."]}
    page = web_client(ann).post("/settings/tokens/", {"name": "laptop\x00"})
    assert "The name contains a NUL character." in page_text(page)
    assert not AccessToken.objects.filter(user=ann).exists()


@pytest.fixture
def live(lab):
    boss, ann, instance = lab
    Release.objects.create(instance=instance, number=1, commit="0" * 40, status="live",
                           session_configs=[{"name": "hello", "display_name": "Hello", "num_demo_participants": 2}])
    return lab


@pytest.mark.parametrize("fields, message", [
    ({"instructions": "Be kind\x00"}, "instructions: The instruction text contains a NUL character."),
    ({"instructions": "x" * 4001}, "instructions: The instruction text is too long (4001 characters, at most 4000)."),
    ({"session_config": "hello\x00"}, "session_config: The session config contains a NUL character."),
    ({"model": "gpt\x00", "provider": "acme"}, "model: The model contains a NUL character."),
    ({"model": "gpt", "provider": "acme\x00"}, "provider: The provider contains a NUL character."),
])
def test_hostile_bot_run_fields_are_refused_before_the_database(live, fields, message):
    boss, ann, instance = live
    data = {"session_config": "hello", "num_participants": 2, "num_bots": 2, "model": "random", **fields}
    response = api_client(ann).post("/api/v1/instances/hostile/bot-runs", data, content_type="application/json")
    assert response.status_code == 422 and response.json()["detail"] == message, response.content
    if set(fields) == {"instructions"}:  # the form offers the other fields as choices
        page = web_client(ann).post("/instances/hostile/bot-runs/", {**data, "temperature": "1", "memory": "summary",
                                                                     "rate_limit": "60", "concurrency": "10",
                                                                     "time_limit_minutes": "60"})
        assert page.status_code == 422 and message.split(": ", 1)[1] in page_text(page)
    assert not BotRun.objects.exists()


def test_hostile_welcome_text_is_refused(lab):
    boss, ann, instance = lab
    with pytest.raises(ValidationError) as exc:
        lobby.set_welcome_text(ann, instance, "Welcome\x00")
    assert exc.value.message_dict == {"welcome_text": ["The welcome text contains a NUL character."]}


def test_paths_with_a_nul_are_not_found_without_a_query(lab):
    boss, ann, instance = lab
    api = api_client(boss)
    for path in ("/api/v1/instances/host%00ile", "/api/v1/instances/host%00ile/releases", "/api/v1/users/ann%00",
                 "/lobby/hostile%00/"):
        response = api.get(path)
        assert response.status_code == 404, (path, response.status_code)


# --- what programs print: stored, with a mark where a NUL was ----------------------------------

@jobs.job_task("tests.texts.quotes_a_program")
def quotes_a_program(job):
    raise jobs.JobFailed("pip said: no such\x00package")


def test_a_programs_output_with_a_nul_is_stored_with_a_mark_in_its_place(lab):
    """What pip, a setup.py or the app print is the experimenter's to choose, a NUL too: the
    build log, a failed deploy's reason, the instance's status reason and a job's message
    quoting it are stored with U+FFFD in its place (on PostgreSQL the write failed, and the
    deploy or status change with it)."""
    boss, ann, instance = lab
    release = Release.objects.create(instance=instance, number=1, commit="a" * 40)
    out = releases.LogWriter(release.pk)
    out("Collecting evil\x00pkg\n")
    out.flush()
    release.refresh_from_db()
    assert release.log == "Collecting evil\ufffdpkg\n"
    releases._fail(release, "the app exited: boom\x00", out)
    assert release.status == Release.Status.FAILED and release.status_reason == "the app exited: boom\ufffd"
    assert release.log.endswith("\nDeploy failed: the app exited: boom\ufffd\n")
    state.set_status(instance, Instance.Status.FAILED, "the app exited: \x00\x00", notify=False)
    assert instance.status_reason == "the app exited: \ufffd\ufffd"
    job = jobs.start(quotes_a_program, user=ann, kind="tests.texts", label="Deploy", args=[])
    quotes_a_program.apply(args=[str(job.id)])
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED and job.message == "Deploy: pip said: no such\ufffdpackage"
    assert texts.storable("a\x00b\ufffd") == "a\ufffdb\ufffd" and texts.storable("plain") == "plain"


def test_check_text_messages():
    assert texts.problem("fine ✓\nline") is None
    assert texts.problem("a\x00") == "contains a NUL character"
    assert texts.problem("\udc80") == "contains an invalid character (a lone surrogate, U+DC80)"
    assert texts.problem("tab\there", single_line=True).startswith("contains a control character (U+0009)")
    assert texts.problem("x" * 11, max_length=10) == "is too long (11 characters, at most 10)"
    with pytest.raises(ValidationError) as exc:
        texts.check_text(5, field="f", label="The thing")
    assert exc.value.message_dict == {"f": ["The thing must be text."]}


def test_the_stand_in_refuses_what_postgresql_refuses(postgres_text_rules):
    """The fixture itself: a query with a NUL fails (so the tests above prove the order)."""
    with pytest.raises(ValueError, match="NUL"):
        User.objects.filter(name="a\x00b").exists()
    with pytest.raises(ValueError):
        User.objects.filter(name="a\ud800b").exists()
    postgres_text_rules.clear()
