"""The OpenAPI document tells the truth: schemathesis fuzzes the live document of a real
server (daphne serving manager.asgi over HTTP, on this test's database and Redis) as each
persona, and fails on any server error, schema mismatch, undocumented status, header or
content type, on schema-valid input refused or schema-invalid input accepted.

No Docker and no worker: the API only records rows and enqueues jobs (create, restart,
reset, delete, bot runs), and no worker takes them here; the queue is purged at the end.
The run is bounded (examples per operation, one worker) and deterministic (fixed seed,
deterministic generation): a failure reproduces with the same command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.conf import settings

from bots.models import BotRun, Provider
from instances.models import Instance, Release
from manager import texts
from manager.accounts.models import User
from manager.accounts.services import create_token
from manager.api.instances import CONFIG_NAME, NAME_PATTERN, REFUSED_CONFIG_NAMES
from manager.api.schemas import SINGLE_LINE, TEXT
from instances import services as instance_services
from tests.labserver_helpers import Daphne, free_port
from tests.db_helpers import database_url

MAX_EXAMPLES = 10
HOOKS = Path(__file__).with_name("api_schema_hooks.py")  # what the document says in words only
SEED = 20261202
SCHEMATHESIS_TIMEOUT = 600  # seconds: a bound, far above the run's usual length (see the README)

# Values the path parameters are drawn from most of the time (the rest are generated), so
# the fuzz reaches real instances, releases and bot runs instead of answering 404 only.
CONFIG = """\
[dictionaries.names]
values = ["study", "others-study", "nothing-here"]
[dictionaries.numbers]
values = [1, 2]
[dictionaries.owners]
values = ["alice", "bob"]
[dictionaries.models]
values = ["random", "fake-1"]
[dictionaries.configs]
values = ["survey"]
[dictionaries.providers]
values = ["Fake"]
[dictionaries.keys]
values = {keys}

[parameters]
"path.name" = { dictionary = "names", probability = 0.9 }
"path.number" = { dictionary = "numbers", probability = 0.8 }
"path.username" = { dictionary = "owners", probability = 0.5 }
"body.owner" = { dictionary = "owners", probability = 0.7 }
"body.model" = { dictionary = "models", probability = 0.8 }
"body.session_config" = { dictionary = "configs", probability = 0.8 }
"body.provider" = { dictionary = "providers", probability = 0.6 }
"body.key" = { dictionary = "keys", probability = 0.5 }

# Schema-valid input that stored data can still refuse (the descriptions say so): an owner
# that has no account; a session config the live release lacks, more bots than
# participants, a provider or model that is not configured; a key whose base64 does not
# decode to a key of its type; the config vars' total size; a new account's e-mail address
# that Django's stricter validator refuses; a swarm node that does not exist (or an
# instance that is not on the swarm) to move an instance to; an uploaded file that is not a
# backup of the instance's database; a backup whose kind, status or file does not fit; a
# bot experiment's design with a factor listed twice or more than 500 runs (or, run again,
# a design the live release or the providers no longer allow).
[[operations]]
include-operation-id = ["create_instance", "start_bot_run", "add_my_ssh_key", "move_instance", "upload_backup",
                        "restore_backup", "start_bot_preflight", "start_bot_experiment", "rerun_bot_experiment"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]
"""

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def manager_env(port: int) -> dict[str, str]:
    """The environment of a daphne on this test's database, data dir and Redis."""
    env = dict(os.environ)
    env.update(LAB_DATA_DIR=str(settings.DATA_DIR), DATABASE_URL=database_url(),
               LAB_HOST="127.0.0.1", LAB_PORT=str(port), PYTHONUNBUFFERED="1",
               DJANGO_SETTINGS_MODULE="manager.settings")
    for key in ("LAB_PUBLIC_HOST", "LAB_PUBLIC_URL", "REDIS_URL"):
        env.pop(key, None)
    return env


@pytest.fixture
def lab(transactional_db, tmp_path):
    """Two experimenters with an instance each (alice's has a live release and a bot run),
    a lab manager, a model provider; a token per persona; daphne serving it all."""
    boss = User.objects.create_user("boss", "boss@lab.test", "pw-boss-123456", is_superuser=True, is_staff=True)
    alice = User.objects.create_user("alice", "alice@lab.test", "pw-alice-123456")
    bob = User.objects.create_user("bob", "bob@lab.test", "pw-bob-1234567")
    study = Instance.objects.create(name="study", owner=alice, public_port=18700)
    Instance.objects.create(name="others-study", owner=bob, public_port=18701)
    Release.objects.create(instance=study, number=1, commit="c" * 40, status=Release.Status.LIVE, session_configs=[
        {"name": "survey", "display_name": "Survey", "num_demo_participants": 2}])
    Provider.objects.create(name="Fake", base_url="http://127.0.0.1:9/v1", api_key="sk-not-used",
                            offered_models=[{"name": "fake-1", "input_per_million": 1, "output_per_million": 2}])
    BotRun.objects.create(instance=study, number=1, session_config="survey", num_participants=2, num_bots=1,
                          model="random", status=BotRun.Status.FINISHED)
    tokens = {user.username: create_token(user, name="fuzz", throttled=False)[1] for user in (boss, alice)}
    port = free_port()
    manager = Daphne(port, manager_env(port), tmp_path / "daphne.log")
    try:
        yield {"url": manager.url, "tokens": tokens, "manager": manager, "tmp": tmp_path}
    finally:
        manager.stop()
        from manager.celery import app

        app.control.purge()  # the jobs the fuzz enqueued: no worker takes them here


def fuzz(lab, authorization: str | None, name: str, *, examples: int = MAX_EXAMPLES,
         phases: str = "coverage,fuzzing") -> tuple[subprocess.CompletedProcess, list[dict]]:
    """One schemathesis run against the live document; (its result, the HAR entries)."""
    tmp: Path = lab["tmp"]
    keys = [ssh_public_key(f"{name}-{i}") for i in range(5)]  # new ones: each can be added once
    (tmp / "schemathesis.toml").write_text(CONFIG.replace("{keys}", json.dumps(keys)))
    har = tmp / f"{name}.har"
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(tmp / "schemathesis.toml"), "--no-color",
        "run", f"{lab['url']}/api/v1/openapi.json",
        "--checks", "all", "--max-examples", str(examples), "--seed", str(SEED), "--generation-deterministic",
        "--workers", "1", "--phases", phases,
        "--request-timeout", "30", "--report", "har", "--report-har-path", str(har),
    ]
    if authorization:
        command += ["--header", f"Authorization: {authorization}"]
    env = dict(os.environ, SCHEMATHESIS_HOOKS=str(HOOKS), NO_COLOR="1", COLUMNS="160")
    result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True,
                            timeout=SCHEMATHESIS_TIMEOUT)
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    return result, entries


def ssh_public_key(comment: str) -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return f"{key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()} {comment}"


def _report(result: subprocess.CompletedProcess, lab) -> str:
    server = lab["manager"].output()
    return f"{result.stdout[-20000:]}\n{result.stderr[-5000:]}\n--- daphne ---\n{server[-5000:]}"


def statuses(entries: list[dict]) -> Counter:
    return Counter(entry["response"]["status"] for entry in entries)


# (persona, phases, examples per operation): the lab manager, who may call everything, gets
# the coverage phase (every documented boundary, enum value and pattern, and methods no
# operation has) and the fuzzing phase; the experimenter too, with fewer fuzzed examples;
# anonymous callers only a few, which must all be 401.
RUNS = [("boss", "coverage,fuzzing", MAX_EXAMPLES), ("alice", "coverage,fuzzing", 5), ("anonymous", "fuzzing", 2)]


@pytest.fixture
def nodes_kept():
    """The lab manager's fuzz may drain (pause) a real swarm node of this machine: it lists
    the nodes and takes their ids (`POST /api/v1/nodes/{id}/drain` is documented for it). Each
    node's availability is put back afterwards, so later tests find the node as it was."""
    from instances.runtime.swarm import SwarmRuntime

    runtime = SwarmRuntime()
    before = {n["id"]: n["availability"] for n in runtime.nodes()} if runtime.available() else {}
    yield
    for node in (runtime.nodes() if before else []):
        if node["id"] in before and node["availability"] != before[node["id"]]:
            print(f"node {node['hostname']}: {node['availability']} again {before[node['id']]}")
            runtime.set_node_availability(node["id"], before[node["id"]])


def test_schemathesis_as_each_persona(lab, nodes_kept):
    """One server for all three runs (they share its data: the experimenter's run meets
    what the lab manager's run created and changed)."""
    for persona, phases, examples in RUNS:
        started = time.monotonic()
        token = lab["tokens"].get(persona)
        result, entries = fuzz(lab, f"Bearer {token}" if token else None, persona, examples=examples, phases=phases)
        took = time.monotonic() - started
        seen = statuses(entries)
        print(f"{persona}: {len(entries)} requests in {took:.0f} s, statuses {dict(sorted(seen.items()))}")
        assert result.returncode == 0, f"as {persona}:\n{_report(result, lab)}"
        assert not any(status >= 500 for status in seen), (persona, seen)
        if persona == "anonymous":
            documented = [e for e in entries if e["response"]["status"] != 405]  # methods no operation has
            assert documented and {e["response"]["status"] for e in documented} == {401}, seen
            continue
        assert len(entries) > 26 * 5, (persona, seen)  # every operation, more than a few times
        # The persona stayed signed in throughout (the 401s are schemathesis' own calls without
        # the token): nothing the fuzz did revoked its token or deactivated its account.
        assert seen[401] < 0.1 * len(entries), (persona, seen)
        assert seen[200] and seen[201] and seen[202] and seen[404] and seen[422], (persona, seen)  # real work
        request = urllib.request.Request(f"{lab['url']}/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["username"] == persona


# --- the document's patterns say what the services check -------------------------------------

def _characters():
    """Every code point but the surrogates (which no UTF-8 text holds)."""
    return (chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)


def test_text_patterns_match_the_services_text_check():
    any_text, single_line = re.compile(TEXT), re.compile(SINGLE_LINE)
    for char in _characters():
        value = f"a{char}b"
        assert bool(any_text.fullmatch(value)) == (texts.problem(value) is None), repr(char)
        assert bool(single_line.fullmatch(value)) == (texts.problem(value, single_line=True) is None), repr(char)


@pytest.mark.parametrize("name", ["ab", "a1", "public-goods-2", "a" * 40, "x-y-z", "a-", "-a", "1a", "a--b", "A-b",
                                  "a", "a" * 41, "ab_c", "ab c", "été"])
def test_name_pattern_matches_the_service(name):
    by_service = bool(instance_services.NAME_RE.match(name)) and "--" not in name and (
        instance_services.NAME_LENGTH[0] <= len(name) <= instance_services.NAME_LENGTH[1])
    low, high = instance_services.NAME_LENGTH
    by_document = bool(re.fullmatch(NAME_PATTERN, name)) and low <= len(name) <= high
    assert by_document == by_service


@pytest.mark.parametrize("key,refused", [("SECRET", False), ("_x1", False), ("mallOC_ARENA_MAX", False),
                                         ("LD_PRELOAD", True), ("ld_preload", True), ("PYTHONHOME", True),
                                         ("pythonstartup", True), ("OTREE_ADMIN_PASSWORD", True), ("Path", True),
                                         ("PATHS", False), ("GCONV_PATH", True), ("X\n", True), ("1X", True),
                                         ("X" * 64, False), ("X" * 65, True), ("A-B", True), ("", True)])
def test_config_name_rules_match_the_service(key, refused):
    by_document = not re.fullmatch(CONFIG_NAME, key) or bool(re.search(REFUSED_CONFIG_NAMES, key))
    assert by_document == refused == (instance_services.config_name_refusal(key) is not None)


# --- strict input: nothing is coerced ------------------------------------------------------------

@pytest.fixture
def patch_study(client):
    boss = User.objects.create_user("boss", "boss@lab.test", "pw-boss-123456", is_superuser=True, is_staff=True)
    alice = User.objects.create_user("alice", "alice@lab.test", "pw-alice-123456")
    Instance.objects.create(name="study", owner=alice, public_port=18700)
    token = create_token(boss, name="t", throttled=False)[1]

    def patch(body: dict):
        return client.patch("/api/v1/instances/study", json.dumps(body), content_type="application/json",
                            headers={"Authorization": f"Bearer {token}"})

    return patch


@pytest.mark.django_db
@pytest.mark.parametrize("body,field", [
    ({"production": 0}, "production"), ({"production": "yes"}, "production"), ({"production": "true"}, "production"),
    ({"memory_mb": "512"}, "memory_mb"), ({"memory_mb": True}, "memory_mb"), ({"memory_mb": 512.5}, "memory_mb"),
    ({"cpus": "1"}, "cpus"), ({"cpus": True}, "cpus"), ({"auth_level": 1}, "auth_level"), ({"env": {"A": 1}}, "env.A"),
])
def test_input_types_are_not_coerced(patch_study, body, field):
    generation = Instance.objects.get(name="study").generation
    response = patch_study(body)
    assert response.status_code == 422, response.content
    assert response.json()["detail"].startswith(f"{field}: "), response.json()
    assert Instance.objects.get(name="study").generation == generation  # nothing changed


@pytest.mark.django_db
@pytest.mark.parametrize("body,stored", [({"cpus": 1}, ("cpus", 1)), ({"cpus": 0.25}, ("cpus", 0.25)),
                                         ({"memory_mb": 512.0}, ("memory_mb", 512)), ({"production": False},
                                                                                      ("production", False))])
def test_json_numbers_are_numbers(patch_study, body, stored):
    response = patch_study(body)
    assert response.status_code == 200, response.content
    field, value = stored
    assert float(getattr(Instance.objects.get(name="study"), field)) == value
    shown = response.json()["otree"]["production"] if field == "production" else response.json()[field]
    assert shown == value


# --- the document refuses what the server refuses ----------------------------------------------

def _validator(component: str):
    import jsonschema_rs

    from manager.api.api import api

    schema = api.get_openapi_schema()["components"]["schemas"][component]
    return jsonschema_rs.validator_for(schema, validate_formats=True)


RUN = {"session_config": "survey", "num_participants": 2, "num_bots": 1}
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBm6V6HmrXk1H7+gZ5d5xH1cXZ0b8pKq1xR5nQ2YfS0q me@laptop"


@pytest.mark.parametrize("component,body,valid", [
    ("BotRunIn", {**RUN, "model": "random"}, True),
    ("BotRunIn", {**RUN, "model": "fake-1"}, False),  # provider required unless the model is random
    ("BotRunIn", {**RUN, "model": "fake-1", "provider": None}, False),
    ("BotRunIn", {**RUN, "model": "fake-1", "provider": "Fake"}, True),
    ("BotRunIn", {**RUN, "model": "random", "num_participants": 501}, False),
    ("BotRunIn", {**RUN, "model": "random", "temperature": 2.5}, False),
    ("BotRunIn", {**RUN, "model": "random", "memory": "all"}, False),
    ("BotRunIn", {**RUN, "model": "random", "instructions": "a\x00b"}, False),
    ("BotRunIn", {**RUN, "model": "random", "instructions": "line one\nline two"}, True),
    ("BotRunIn", {**RUN, "model": "random\n"}, False),
    ("InstancePatch", {"cpus": 0.25}, True), ("InstancePatch", {"cpus": 1}, True),
    ("InstancePatch", {"cpus": 0.099}, False), ("InstancePatch", {"cpus": 0.29}, True),
    ("InstancePatch", {"cpus": 16.5}, False), ("InstancePatch", {"cpus": "1"}, False),
    ("InstancePatch", {"memory_mb": 127}, False), ("InstancePatch", {"memory_mb": "512"}, False),
    ("InstancePatch", {"memory_mb": 512}, True), ("InstancePatch", {"production": 0}, False),
    ("InstancePatch", {"auth_level": "STUDY"}, True), ("InstancePatch", {"auth_level": "study"}, False),
    ("InstancePatch", {"env": {"MALLOC_ARENA_MAX": "2", "SECRET": "é\nü"}}, True),
    ("InstancePatch", {"env": {"LD_PRELOAD": "x"}}, False), ("InstancePatch", {"env": {"ld_audit": "x"}}, False),
    ("InstancePatch", {"env": {"PYTHONSTARTUP": "x"}}, False), ("InstancePatch", {"env": {"X\n": "x"}}, False),
    ("InstancePatch", {"env": {"SECRET": "a\x00b"}}, False), ("InstancePatch", {"env": {"S": "x" * 4097}}, False),
    ("InstancePatch", {"env": {f"K{i}": "" for i in range(101)}}, False),
    ("InstanceIn", {"name": "ab", "owner": "bob"}, True), ("InstanceIn", {"name": "admin", "owner": "bob"}, False),
    ("InstanceIn", {"name": "a--b", "owner": "bob"}, False), ("InstanceIn", {"name": "Ab", "owner": "bob"}, False),
    ("InstanceIn", {"name": "a" * 41, "owner": "bob"}, False),
    ("PasswordIn", {}, True), ("PasswordIn", {"password": ""}, True), ("PasswordIn", {"password": None}, True),
    ("PasswordIn", {"password": "short"}, False), ("PasswordIn", {"password": "long enough"}, True),
    ("PasswordIn", {"password": "new\nline!"}, False), ("PasswordIn", {"password": "x" * 129}, False),
    ("UserIn", {"username": "new.bie", "email": "n@lab.example"}, True),
    ("UserIn", {"username": "new bie", "email": "n@lab.example"}, False),
    ("UserIn", {"username": "newbie", "email": "x"}, False),
    ("UserIn", {"username": "newbie", "email": "n@lab.example", "is_superuser": "yes"}, False),
    ("SSHKeyIn", {"key": KEY}, True), ("SSHKeyIn", {"key": "ssh-dss AAAAB3NzaC1kc3MAAACBAP"}, False),
    ("SSHKeyIn", {"key": KEY, "title": "tab\there"}, False),
])
def test_document_states_the_rules(component, body, valid):
    assert _validator(component).is_valid(body) == valid


@pytest.mark.django_db
@pytest.mark.parametrize("body", [{"cpus": 0.099}, {"memory_mb": 127}, {"auth_level": "study"},
                                  {"env": {"LD_PRELOAD": "x"}}, {"env": {"X\n": "x"}}, {"env": {"S": "a\x00b"}}])
def test_what_the_document_refuses_the_server_refuses(patch_study, body):
    assert not _validator("InstancePatch").is_valid(body)
    assert patch_study(body).status_code == 422


def _keys(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _keys(value)
    elif isinstance(node, list):
        for value in node:
            yield from _keys(value)


@pytest.mark.django_db
def test_cpus_decimals_are_said_in_words_and_checked_by_the_server(patch_study, client):
    """`multipleOf: 0.01` broke validators that divide in floating point (0.29 / 0.01 is
    28.999…, so 0.29 was "invalid" in JS and Python validators). The document now says the
    rule in words; the server checks it, with the same sentence for the API and the page."""
    from manager.api.api import api

    document = api.get_openapi_schema()
    assert "multipleOf" not in set(_keys(document))
    cpus = document["components"]["schemas"]["InstancePatch"]["properties"]["cpus"]
    assert "at most two decimals" in cpus["description"] and (cpus["minimum"], cpus["maximum"]) == (0.1, 16.0)
    assert 0.29 / 0.01 != 29  # (what such a validator computes)
    for value in (0.29, 0.1, 15.99, 3):
        assert _validator("InstancePatch").is_valid({"cpus": value})
        response = patch_study({"cpus": value})
        assert response.status_code == 200 and response.json()["cpus"] == value, response.content
    refused = patch_study({"cpus": 0.295})
    sentence = "CPUs take at most two decimals, e.g. 0.25 (this is 0.295); nothing is rounded."
    assert refused.status_code == 422 and refused.json()["detail"] == f"cpus: {sentence}"
    client.force_login(User.objects.get(username="boss"))
    page = client.post("/instances/study/limits/", {"memory_mb": "512", "cpus": "0.295"})
    assert page.status_code == 422 and sentence in page.content.decode()
    assert str(Instance.objects.get(name="study").cpus) == "3.00"  # the last accepted value, nothing rounded in


def test_every_operation_with_a_body_documents_413():
    """The web server answers a body over its cap (and Django one over 2.5 MB) with the API's
    JSON 413 (tests/manager/test_http_edges.py): every operation that takes a body says so."""
    from manager.api.api import api

    with_body = [(path, method, operation) for path, methods in api.get_openapi_schema()["paths"].items()
                 for method, operation in methods.items() if "requestBody" in operation]
    assert len(with_body) >= 6
    for path, method, operation in with_body:
        answer = operation["responses"].get("413")
        assert answer and answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, \
            (method, path)


@pytest.mark.django_db
@pytest.mark.parametrize("body, key", [
    ('{"production": true, "production": false}', '"production"'),
    ('{"env": {"X": "1"}, "env": {"Y": "2"}}', '"env"'),
    ('{"env": {"COLOR": "blue", "COLOR": "red"}}', '"COLOR"'),
    ('{"env": {"\\u00e9": "1", "é": "2"}}', '"é"'),  # the same key, spelled two ways
])
def test_a_key_given_twice_is_refused_naming_it(patch_study, client, body, key):
    """json.loads keeps the last of two equal keys: a body could say one thing to a reader (or
    a proxy, a log) and another to the server. Refused, naming the key; nothing changes."""
    before = Instance.objects.get(name="study")
    token = create_token(User.objects.get(username="boss"), name="dup", throttled=False)[1]
    response = client.generic("PATCH", "/api/v1/instances/study", body, content_type="application/json",
                              headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 422, response.content
    assert response.json() == {"detail": f"The request body gives the key {key} twice in one object; send each key "
                                         "once."}
    after = Instance.objects.get(name="study")
    assert (after.generation, after.config_vars, after.production) == (before.generation, before.config_vars,
                                                                        before.production)
    created = client.post("/api/v1/instances", '{"name": "one", "owner": "alice", "name": "two"}',
                          content_type="application/json", headers={"Authorization": f"Bearer {token}"})
    assert created.status_code == 422 and '"name"' in created.json()["detail"]
    assert not Instance.objects.filter(name__in=["one", "two"]).exists()
