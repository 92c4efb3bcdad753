"""The persona harness: every URL pattern of the project, walked as each fixed persona.

Personas: a lab manager (`boss`), experimenter A (`ann`), experimenter B (`bob`) and an
anonymous visitor. Each route below names the URL to open (built from the fixed world)
and the status each persona must get. `test_every_url_pattern_is_covered` fails when a
new URL pattern appears without an entry here, so every later view is covered too.

Web pages: anonymous visitors are sent to the login page (302 to /accounts/login/).
JSON API (`api:` names): personas authenticate with their bearer token; anonymous
callers get 401.
"""

from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from django.test import Client
from django.urls import URLResolver, get_resolver

from bots.models import BotExperiment, BotRun, Provider
from instances.models import Backup, Release
from manager.accounts import services
from manager.accounts.models import SSHKey, User
from tests.conftest import make_live_release

PERSONAS = ("anon", "boss", "ann", "bob")
LOGIN = "/accounts/login/"


def new_public_key(comment="test") -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{raw} {comment}"


@dataclass
class World:
    boss: User
    ann: User
    bob: User
    tokens: dict = field(default_factory=dict)
    ann_key: SSHKey = None
    bob_key: SSHKey = None
    ann_token_id: int = 0
    instance: object = None  # ann's instance
    backup: object = None
    provider: object = None


@pytest.fixture
def world(boss, ann, bob, instance):
    w = World(boss=boss, ann=ann, bob=bob)
    for user in (boss, ann, bob):
        token, raw = services.create_token(user, name="harness")
        w.tokens[user.username] = raw
        if user is ann:
            w.ann_token_id = token.pk
    w.ann_key = services.add_ssh_key(ann, title="ann laptop", key=new_public_key("ann"))
    w.bob_key = services.add_ssh_key(bob, title="bob laptop", key=new_public_key("bob"))
    w.instance = instance
    Release.objects.create(instance=w.instance, number=1, commit="a" * 40, status="failed", log="build log")
    make_live_release(w.instance)  # #2: session config guess, room lab (seat01, seat02)
    # bot runs: a lab-configured provider and a finished run on ann's instance
    w.provider = Provider.objects.create(name="Local", base_url="http://127.0.0.1:9/v1", api_key="sk-harness",
                                         offered_models=[{"name": "tiny", "input_per_million": 1}])
    BotRun.objects.create(instance=w.instance, number=1, session_config="guess", num_participants=3, num_bots=3,
                          model="random", status="finished", session_code="abcd1234")
    BotExperiment.objects.get_or_create(instance=w.instance, number=1,
                                        defaults={"design": EXPERIMENT_DESIGN, "status": "finished"})
    w.backup = Backup.objects.create(instance=w.instance, instance_name="ann-study", kind="before_reset",
                                     status="done", filename="ann-study-harness.dump", size=5,
                                     data_filename="ann-study-harness-data.zip", data_size=22)
    w.backup.path.write_bytes(b"PGDMP")
    w.backup.data_path.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip
    return w


def client_for(world: World, persona: str, api: bool) -> Client:
    client = Client()
    if persona == "anon":
        return client
    if api:
        return Client(HTTP_AUTHORIZATION=f"Bearer {world.tokens[persona]}")
    client.force_login(getattr(world, persona))
    return client


# a bot experiment's design (random policy: nothing to pay, no provider needed)
EXPERIMENT_DESIGN = {"title": "", "session_config": "guess", "num_participants": 3, "num_bots": 2,
                     "models": [{"provider": "", "model": "random"}], "temperatures": [1.0],
                     "instructions": [{"name": "default", "text": ""}], "memory": ["summary"], "repetitions": 1,
                     "rate_limit": 60, "concurrency": 10, "time_limit_minutes": 60, "max_parallel": 1,
                     "budget_usd": None, "run_budget_usd": None, "use_cache": False}


@dataclass
class Route:
    name: str  # URL pattern name (namespaced for the API)
    url: object  # str, or function World -> str
    expect: dict  # persona -> status
    method: str = "get"
    data: object = None  # body for POST/PATCH (a function World -> dict, or a dict)

    def build(self, world):
        return self.url(world) if callable(self.url) else self.url


def all_ok(anon=302):
    return {"anon": anon, "boss": 200, "ann": 200, "bob": 200}


MANAGERS_ONLY = {"anon": 302, "boss": 200, "ann": 403, "bob": 403}
OWNER_VIEW = {"anon": 302, "boss": 200, "ann": 200, "bob": 404}
API_OWNER = {"anon": 401, "boss": 200, "ann": 200, "bob": 404}
API_ANY = {"anon": 401, "boss": 200, "ann": 200, "bob": 200}
API_MANAGERS = {"anon": 401, "boss": 200, "ann": 403, "bob": 403}
# A redirect for everyone: logged-in users leave the login/sign-up pages for the dashboard.
ENTRANCE = {"anon": 200, "boss": 302, "ann": 302, "bob": 302}

ROUTES = [
    Route("dashboard", "/", all_ok()),
    Route("healthz", "/healthz/", all_ok(200)),
    # LAB_TLS=internal only (tests/instances/test_tls.py: public there); 404 with LAB_TLS=off, as here
    Route("tls_ca", "/tls/", {"anon": 404, "boss": 404, "ann": 404, "bob": 404}),
    Route("tls_root_crt", "/tls/root.crt", {"anon": 404, "boss": 404, "ann": 404, "bob": 404}),
    Route("recent_jobs", "/jobs/recent/", all_ok()),
    # invitation links: an unknown or used token shows "this link no longer works" to anyone
    Route("invitation_accept", "/accounts/welcome/MQ/set-password/", all_ok(200)),
    # allauth
    Route("account_login", LOGIN, ENTRANCE),
    Route("account_logout", "/accounts/logout/", {"anon": 302, "boss": 200, "ann": 200, "bob": 200}),
    Route("account_inactive", "/accounts/inactive/", all_ok(200)),
    Route("account_signup", "/accounts/signup/", ENTRANCE),  # anon: the "no public sign-up" page
    Route("account_reauthenticate", "/accounts/reauthenticate/", all_ok()),
    Route("account_email_redirect", "/accounts/email/", {"anon": 302, "boss": 302, "ann": 302, "bob": 302}),
    Route("account_email", "/accounts/email/", {"anon": 302, "boss": 302, "ann": 302, "bob": 302}),
    Route("account_email_verification_sent", "/accounts/confirm-email/", all_ok(200)),
    Route("account_confirm_email", "/accounts/confirm-email/nonsense/", all_ok(200)),
    Route("account_change_password", "/accounts/password/change/", all_ok()),
    Route("account_set_password", "/accounts/password/set/", {"anon": 302, "boss": 302, "ann": 302, "bob": 302}),
    Route("account_reset_password", "/accounts/password/reset/", all_ok(200)),
    Route("account_reset_password_done", "/accounts/password/reset/done/", all_ok(200)),
    Route("account_reset_password_from_key", "/accounts/password/reset/key/1-nonsense/", all_ok(200)),
    Route("account_reset_password_from_key_done", "/accounts/password/reset/key/done/", all_ok(200)),
    Route("account_confirm_login_code", "/accounts/login/code/confirm/", {"anon": 302, "boss": 302, "ann": 302, "bob": 302}),
    Route("mfa_index", "/accounts/2fa/", all_ok()),
    Route("mfa_authenticate", "/accounts/2fa/authenticate/", {"anon": 302, "boss": 302, "ann": 302, "bob": 302}),
    Route("mfa_reauthenticate", "/accounts/2fa/reauthenticate/", {"anon": 302, "boss": 302, "ann": 302, "bob": 302}),
    # TOTP activation asks for the password again first (reauthentication): a redirect.
    Route("mfa_activate_totp", "/accounts/2fa/totp/activate/", {"anon": 302, "boss": 302, "ann": 302, "bob": 302}),
    Route("mfa_deactivate_totp", "/accounts/2fa/totp/deactivate/", {"anon": 302, "boss": 404, "ann": 404, "bob": 404}),
    Route("mfa_view_recovery_codes", "/accounts/2fa/recovery-codes/", {"anon": 302, "boss": 404, "ann": 404, "bob": 404}),
    Route("mfa_generate_recovery_codes", "/accounts/2fa/recovery-codes/generate/", {"anon": 302, "boss": 302, "ann": 302, "bob": 302}),
    Route("mfa_download_recovery_codes", "/accounts/2fa/recovery-codes/download/", {"anon": 302, "boss": 404, "ann": 404, "bob": 404}),
    # own settings
    Route("profile", "/settings/", all_ok()),
    Route("ssh_keys", "/settings/keys/", all_ok()),
    Route("tokens", "/settings/tokens/", all_ok()),
    # deleting ann's key: only ann; everyone else gets 404 and the key stays
    Route("ssh_key_delete", lambda w: f"/settings/keys/{w.ann_key.pk}/delete/",
          {"anon": 302, "boss": 404, "ann": 302, "bob": 404}, method="post"),
    Route("token_revoke", lambda w: f"/settings/tokens/{w.ann_token_id}/revoke/",
          {"anon": 302, "boss": 404, "ann": 302, "bob": 404}, method="post"),
    # lab managers only
    Route("user_list", "/users/", MANAGERS_ONLY),
    Route("user_create", "/users/new/", MANAGERS_ONLY),
    Route("user_detail", lambda w: f"/users/{w.ann.pk}/", MANAGERS_ONLY),
    Route("user_action", lambda w: f"/users/{w.ann.pk}/delete/", MANAGERS_ONLY),  # the confirmation page
    Route("audit_log", "/audit/", MANAGERS_ONLY),
    # instances: ann's instance is visible to ann and lab managers; to bob it does not exist (404)
    Route("instance_create", "/instances/new/", MANAGERS_ONLY),
    # every user: the schedules and backups of the instances they may see (lab managers: all)
    Route("backup_list", "/backups/", all_ok()),
    Route("backup_download_any", lambda w: f"/backups/{w.backup.pk}/download/", MANAGERS_ONLY),
    Route("instance_detail", "/instances/ann-study/", OWNER_VIEW),
    Route("instance_logs", "/instances/ann-study/logs/", OWNER_VIEW),
    Route("release_detail", "/instances/ann-study/releases/1/", OWNER_VIEW),
    # rolling back to a release that never went live is refused with a message (redirect)
    Route("release_rollback", "/instances/ann-study/releases/1/rollback/",
          {"anon": 302, "boss": 302, "ann": 302, "bob": 404}, method="post"),
    # switching now to a release that is not ready to switch is refused with a message (redirect)
    Route("release_switch", "/instances/ann-study/releases/1/switch/",
          {"anon": 302, "boss": 302, "ann": 302, "bob": 404}, method="post"),
    Route("backup_download", lambda w: f"/instances/ann-study/backups/{w.backup.pk}/download/", OWNER_VIEW),
    Route("backup_data_download", lambda w: f"/instances/ann-study/backups/{w.backup.pk}/data.zip", OWNER_VIEW),
    Route("backup_data_download_any", lambda w: f"/backups/{w.backup.pk}/data.zip", MANAGERS_ONLY),
    # Download data: ann-study's app does not run here, so the owner and lab managers are sent back to
    # the instance page with the reason (tests/instances/test_data_export.py downloads from a real app)
    Route("instance_data", "/instances/ann-study/data.zip", {"anon": 302, "boss": 302, "ann": 302, "bob": 404}),
    # restoring a backup: the confirmation page, then the job (owner, lab managers); bob sees neither
    Route("instance_backup_restore", lambda w: f"/instances/ann-study/backups/{w.backup.pk}/restore/", OWNER_VIEW),
    Route("instance_backup_restore", lambda w: f"/instances/ann-study/backups/{w.backup.pk}/restore/",
          {"anon": 302, "boss": 302, "ann": 302, "bob": 404}, method="post"),
    # an upload without a file: the page again with the form's error
    Route("instance_backup_upload", "/instances/ann-study/backups/upload/",
          {"anon": 302, "boss": 422, "ann": 422, "bob": 404}, method="post"),
    # the Backups page's restore (into an instance, or a new one) and upload: lab managers
    Route("backup_restore_any", lambda w: f"/backups/{w.backup.pk}/restore/", MANAGERS_ONLY),
    Route("backup_restore_any", lambda w: f"/backups/{w.backup.pk}/restore/",
          {"anon": 302, "boss": 302, "ann": 403, "bob": 403}, method="post",
          data=lambda w: {"target": "new", "name": "ann-copy", "owner": w.ann.pk}),
    Route("backup_upload_any", "/backups/upload/", {"anon": 302, "boss": 422, "ann": 403, "bob": 403},
          method="post", data={"instance": "ann-study"}),
    Route("instance_action", "/instances/ann-study/reset-database/", OWNER_VIEW),  # the confirmation page
    Route("instance_action", "/instances/ann-study/delete/", {"anon": 302, "boss": 200, "ann": 403, "bob": 404}),
    Route("instance_settings", "/instances/ann-study/settings/", {"anon": 302, "boss": 302, "ann": 302, "bob": 404},
          method="post", data={"auth_level": "DEMO", "env": "COLOR=blue"}),
    Route("instance_admin_password", "/instances/ann-study/admin-password/", OWNER_VIEW, method="post",
          data={"password": ""}),
    Route("instance_reveal_password", "/instances/ann-study/admin-password/reveal/", OWNER_VIEW, method="post"),
    Route("instance_limits", "/instances/ann-study/limits/", {"anon": 302, "boss": 302, "ann": 403, "bob": 403},
          method="post", data={"memory_mb": 256, "cpus": "0.5"}),
    # the backup schedule of an instance: lab managers (nothing restarts)
    Route("instance_backup_schedule", "/instances/ann-study/backup-schedule/",
          {"anon": 302, "boss": 302, "ann": 403, "bob": 403}, method="post",
          data={"backup_interval_minutes": "60", "backup_keep_daily": "", "backup_keep_weekly": "2"}),
    # when the instance sleeps: lab managers (nothing restarts)
    Route("instance_sleep", "/instances/ann-study/sleep/", {"anon": 302, "boss": 302, "ann": 403, "bob": 403},
          method="post", data={"sleep_after_minutes": "0"}),
    # Wake now (owner, lab managers): ann-study is not asleep, so each is told so (redirect)
    Route("instance_action", "/instances/ann-study/wake/", {"anon": 302, "boss": 302, "ann": 302, "bob": 404},
          method="post"),
    Route("instance_transfer", "/instances/ann-study/transfer/", {"anon": 302, "boss": 302, "ann": 403, "bob": 403},
          method="post", data=lambda w: {"owner": w.bob.pk}),
    # moving an instance to another swarm node: lab managers; ann-study runs on docker (or
    # process), so the lab manager's move is refused on the form (422) and nothing moves
    Route("instance_move", "/instances/ann-study/move/", {"anon": 302, "boss": 422, "ann": 403, "bob": 403},
          method="post", data={"node": "no-such-node"}),
    # draining / activating a swarm node: lab managers; a node that does not exist is 404
    Route("node_drain", "/nodes/no-such-node/drain/", {"anon": 302, "boss": 404, "ann": 403, "bob": 403},
          method="post"),
    Route("node_activate", "/nodes/no-such-node/activate/", {"anon": 302, "boss": 404, "ann": 403, "bob": 403},
          method="post"),
    # lobby: kiosk pages are public (lab computers have no login); "I am ready" goes to the oTree room
    Route("lobby_index", "/lobby/ann-study/", all_ok(200)),
    Route("lobby_room", "/lobby/ann-study/lab/", all_ok(200)),
    Route("lobby_seat", "/lobby/ann-study/lab/seat01/", all_ok(200)),
    Route("lobby_seat", "/lobby/ann-study/lab/seat02/", {p: 302 for p in PERSONAS}, method="post"),
    # the board: owner and lab managers
    Route("lobby_board_room", "/instances/ann-study/lobby/rooms/lab/", OWNER_VIEW),
    Route("lobby_gate", "/instances/ann-study/lobby/rooms/lab/gate/", {"anon": 302, "boss": 302, "ann": 302, "bob": 404},
          method="post", data={"gate": "hold"}),
    Route("lobby_reset", "/instances/ann-study/lobby/rooms/lab/reset/",
          {"anon": 302, "boss": 302, "ann": 302, "bob": 404}, method="post"),
    Route("lobby_welcome", "/instances/ann-study/lobby/welcome/", {"anon": 302, "boss": 302, "ann": 302, "bob": 404},
          method="post", data={"welcome_text": "Welcome to the lab"}),
    Route("lobby_launchers", "/instances/ann-study/lobby/launchers.zip", OWNER_VIEW),
    # fill a room's empty seats with bots: the form, and its POST (no ready participant: 422 with the reason)
    Route("lobby_bots", "/instances/ann-study/lobby/rooms/lab/bots/", OWNER_VIEW),
    Route("lobby_bots", "/instances/ann-study/lobby/rooms/lab/bots/", {"anon": 302, "boss": 422, "ann": 422, "bob": 404},
          method="post", data={"session_config": "guess", "num_participants": 2, "model": "random",
                               "temperature": 1, "memory": "summary", "time_limit_minutes": 5}),
    # bot runs: the instance's owner and lab managers; model providers: lab managers
    Route("bot_runs", "/instances/ann-study/bot-runs/", OWNER_VIEW),
    Route("bot_runs", "/instances/ann-study/bot-runs/", {"anon": 302, "boss": 422, "ann": 422, "bob": 404},
          method="post", data={"session_config": "nope"}),  # the form again, with the errors
    Route("bot_run", "/instances/ann-study/bot-runs/1/", OWNER_VIEW),
    Route("bot_run_stop", "/instances/ann-study/bot-runs/1/stop/", {"anon": 302, "boss": 302, "ann": 302, "bob": 404},
          method="post"),
    Route("bot_run_download", "/instances/ann-study/bot-runs/1/responses.csv", OWNER_VIEW),
    Route("bot_run_download", "/instances/ann-study/bot-runs/1/summary.json", OWNER_VIEW),
    # results (ann-study's app does not run here: the bot data with the note) and preflight
    Route("bot_run_results", "/instances/ann-study/bot-runs/1/results.csv", OWNER_VIEW),
    Route("bot_run_results", "/instances/ann-study/bot-runs/1/results.parquet", OWNER_VIEW),
    Route("bot_run_results", "/instances/ann-study/bot-runs/1/manifests.json", OWNER_VIEW),
    Route("bot_run_results", "/instances/ann-study/bot-runs/1/results.zip", OWNER_VIEW),
    Route("bot_experiment_results", "/instances/ann-study/bot-runs/experiments/1/results.csv", OWNER_VIEW),
    Route("bot_experiment_results", "/instances/ann-study/bot-runs/experiments/1/results.zip", OWNER_VIEW),
    Route("bot_preflight", "/instances/ann-study/bot-runs/preflight/", {"anon": 302, "boss": 302, "ann": 302, "bob": 404},
          method="post", data={"session_config": "guess", "num_participants": 2}),
    Route("bot_run_download", "/instances/ann-study/bot-runs/1/manifest.json", OWNER_VIEW),
    Route("bot_run_rerun", "/instances/ann-study/bot-runs/1/rerun/", {"anon": 302, "boss": 302, "ann": 302, "bob": 404},
          method="post"),
    Route("bot_experiments", "/instances/ann-study/bot-runs/experiments/", OWNER_VIEW),
    Route("bot_experiments", "/instances/ann-study/bot-runs/experiments/",
          {"anon": 302, "boss": 422, "ann": 422, "bob": 404}, method="post",
          data={"session_config": "guess", "num_participants": 3, "num_bots": 2, "models": ["random"],
                "temperatures": "1, hot", "memory": ["summary"], "repetitions": 1, "max_parallel": 1,
                "rate_limit": 60, "concurrency": 10, "time_limit_minutes": 60}),  # the form again, with the errors
    Route("bot_experiment", "/instances/ann-study/bot-runs/experiments/1/", OWNER_VIEW),
    Route("bot_experiment_stop", "/instances/ann-study/bot-runs/experiments/1/stop/",
          {"anon": 302, "boss": 302, "ann": 302, "bob": 404}, method="post"),
    Route("bot_experiment_rerun", "/instances/ann-study/bot-runs/experiments/1/rerun/",
          {"anon": 302, "boss": 302, "ann": 302, "bob": 404}, method="post"),
    Route("bot_providers", "/bot-providers/", MANAGERS_ONLY),
    Route("bot_provider", lambda w: f"/bot-providers/{w.provider.pk}/", MANAGERS_ONLY),
    Route("bot_provider_delete", lambda w: f"/bot-providers/{w.provider.pk}/delete/",
          {"anon": 302, "boss": 302, "ann": 403, "bob": 403}, method="post"),
    Route("git_http", "/git/ann-study.git/info/refs?service=git-upload-pack", {p: 401 for p in PERSONAS}),  # git: token (Basic auth) only, never a session
    # JSON API
    Route("api:openapi-json", "/api/v1/openapi.json", {"anon": 200, "boss": 200, "ann": 200, "bob": 200}),
    Route("api:openapi-view", "/api/v1/docs", {"anon": 200, "boss": 200, "ann": 200, "bob": 200}),
    Route("api:api-root", "/api/v1/", {"anon": 200, "boss": 200, "ann": 200, "bob": 200}),  # index of links
    Route("api/v1/^(?P<path>.*)$", "/api/v1/no-such-thing", {"anon": 404, "boss": 404, "ann": 404, "bob": 404}),
    Route("api:list_users", "/api/v1/users", API_MANAGERS),
    Route("api:create_user", "/api/v1/users", {"anon": 401, "boss": 201, "ann": 403, "bob": 403}, method="post",
          data={"username": "newbie", "email": "newbie@lab.test", "name": "New Bie", "is_superuser": False}),
    Route("api:get_user", lambda w: f"/api/v1/users/{w.ann.username}", API_MANAGERS),
    Route("api:update_user", lambda w: f"/api/v1/users/{w.ann.username}", {"anon": 401, "boss": 200, "ann": 403,
                                                                           "bob": 403},
          method="patch", data={"bot_monthly_budget_usd": 5}),
    Route("api:get_me", "/api/v1/me", API_ANY),
    Route("api:list_my_ssh_keys", "/api/v1/me/ssh-keys", API_ANY),
    Route("api:add_my_ssh_key", "/api/v1/me/ssh-keys", {"anon": 401, "boss": 201, "ann": 201, "bob": 201},
          method="post", data=lambda w: {"title": "new", "key": new_public_key()}),
    Route("api:list_instances", "/api/v1/instances", API_ANY),
    Route("api:create_instance", "/api/v1/instances", {"anon": 401, "boss": 201, "ann": 403, "bob": 403},
          method="post", data={"name": "new-one", "owner": "bob"}),
    Route("api:get_instance", "/api/v1/instances/ann-study", API_OWNER),
    Route("api:update_instance", "/api/v1/instances/ann-study", API_OWNER, method="patch",
          data={"auth_level": "DEMO"}),
    Route("api:restart_instance", "/api/v1/instances/ann-study/restart", {**API_OWNER, "boss": 202, "ann": 202},
          method="post"),
    Route("api:reset_database", "/api/v1/instances/ann-study/reset-database", {**API_OWNER, "boss": 202, "ann": 202},
          method="post"),
    Route("api:admin_password", "/api/v1/instances/ann-study/admin-password", API_OWNER, method="post",
          data={}),
    # ann-study is no swarm instance: the lab manager's move is 409; its owner may not (403)
    Route("api:move_instance", "/api/v1/instances/ann-study/move", {"anon": 401, "boss": 409, "ann": 403, "bob": 404},
          method="post", data={"node": "no-such-node"}),
    Route("api:list_nodes", "/api/v1/nodes", API_MANAGERS),
    Route("api:drain_node", "/api/v1/nodes/no-such-node/drain", {"anon": 401, "boss": 404, "ann": 403, "bob": 403},
          method="post"),
    Route("api:activate_node", "/api/v1/nodes/no-such-node/activate",
          {"anon": 401, "boss": 404, "ann": 403, "bob": 403}, method="post"),
    Route("api:list_releases", "/api/v1/instances/ann-study/releases", API_OWNER),
    Route("api:get_release", "/api/v1/instances/ann-study/releases/1", API_OWNER),
    Route("api:list_backups", "/api/v1/instances/ann-study/backups", API_OWNER),
    # the oTree sessions (ann-study's app does not run here: the stored read, marked stale)
    Route("api:list_sessions", "/api/v1/instances/ann-study/sessions", API_OWNER),
    # release #1 failed: it is not ready to switch (409)
    Route("api:switch_release", "/api/v1/instances/ann-study/releases/1/switch",
          {"anon": 401, "boss": 409, "ann": 409, "bob": 404}, method="post"),
    Route("api:backup_data", lambda w: f"/api/v1/instances/ann-study/backups/{w.backup.pk}/data.zip", API_OWNER),
    # the app does not run here: 409 with the reason (a real download: tests/instances/test_data_export.py)
    Route("api:instance_data", "/api/v1/instances/ann-study/data.zip", {**API_OWNER, "boss": 409, "ann": 409}),
    Route("api:restore_backup", "/api/v1/instances/ann-study/restore", {**API_OWNER, "boss": 202, "ann": 202},
          method="post", data=lambda w: {"backup": w.backup.pk}),
    # no file: 422 (tests/instances/test_restore.py uploads real ones)
    Route("api:upload_backup", "/api/v1/instances/ann-study/backups", {"anon": 401, "boss": 422, "ann": 422, "bob": 404},
          method="post"),
    Route("api:list_bot_runs", "/api/v1/instances/ann-study/bot-runs", API_OWNER),
    Route("api:start_bot_run", "/api/v1/instances/ann-study/bot-runs", {**API_OWNER, "boss": 201, "ann": 201},
          method="post", data={"session_config": "guess", "num_participants": 3, "num_bots": 2, "model": "random"}),
    Route("api:get_bot_run", "/api/v1/instances/ann-study/bot-runs/1", API_OWNER),
    Route("api:stop_bot_run", "/api/v1/instances/ann-study/bot-runs/1/stop", {**API_OWNER, "boss": 202, "ann": 202},
          method="post"),
    Route("api:bot_run_responses", "/api/v1/instances/ann-study/bot-runs/1/responses.csv", API_OWNER),
    Route("api:bot_run_conversations", "/api/v1/instances/ann-study/bot-runs/1/conversations.json", API_OWNER),
    Route("api:bot_run_summary", "/api/v1/instances/ann-study/bot-runs/1/summary.json", API_OWNER),
    Route("api:bot_run_manifest", "/api/v1/instances/ann-study/bot-runs/1/manifest.json", API_OWNER),
    Route("api:rerun_bot_run", "/api/v1/instances/ann-study/bot-runs/1/rerun", {**API_OWNER, "boss": 201, "ann": 201},
          method="post", data={"use_cache": True}),
    Route("api:list_bot_providers", "/api/v1/bot-providers", API_ANY),
    Route("api:bot_run_results_csv", "/api/v1/instances/ann-study/bot-runs/1/results.csv", API_OWNER),
    Route("api:bot_run_results_parquet", "/api/v1/instances/ann-study/bot-runs/1/results.parquet", API_OWNER),
    Route("api:bot_run_manifests", "/api/v1/instances/ann-study/bot-runs/1/manifests.json", API_OWNER),
    Route("api:bot_run_results_zip", "/api/v1/instances/ann-study/bot-runs/1/results.zip", API_OWNER),
    Route("api:bot_experiment_results_csv", "/api/v1/instances/ann-study/bot-experiments/1/results.csv", API_OWNER),
    Route("api:bot_experiment_results_parquet", "/api/v1/instances/ann-study/bot-experiments/1/results.parquet",
          API_OWNER),
    Route("api:bot_experiment_manifests", "/api/v1/instances/ann-study/bot-experiments/1/manifests.json", API_OWNER),
    Route("api:bot_experiment_results_zip", "/api/v1/instances/ann-study/bot-experiments/1/results.zip", API_OWNER),
    Route("api:start_bot_preflight", "/api/v1/instances/ann-study/bot-preflight", {**API_OWNER, "boss": 201, "ann": 201},
          method="post", data={"session_config": "guess", "num_participants": 2}),
    Route("api:list_bot_experiments", "/api/v1/instances/ann-study/bot-experiments", API_OWNER),
    Route("api:start_bot_experiment", "/api/v1/instances/ann-study/bot-experiments",
          {**API_OWNER, "boss": 201, "ann": 201}, method="post",
          data={"session_config": "guess", "num_participants": 3, "num_bots": 2, "models": [{"model": "random"}],
                "max_parallel": 1}),
    Route("api:get_bot_experiment", "/api/v1/instances/ann-study/bot-experiments/1", API_OWNER),
    Route("api:stop_bot_experiment", "/api/v1/instances/ann-study/bot-experiments/1/stop",
          {**API_OWNER, "boss": 202, "ann": 202}, method="post"),
    Route("api:rerun_bot_experiment", "/api/v1/instances/ann-study/bot-experiments/1/rerun",
          {**API_OWNER, "boss": 201, "ann": 201}, method="post"),
    Route("api:delete_instance", "/api/v1/instances/ann-study", {"anon": 401, "boss": 202, "ann": 403, "bob": 404},
          method="delete"),
    Route("api:delete_my_ssh_key", lambda w: f"/api/v1/me/ssh-keys/{w.ann_key.pk}",
          {"anon": 401, "boss": 404, "ann": 204, "bob": 404}, method="delete"),
]


def _walk(patterns, prefix="", namespace=None):
    for p in patterns:
        if isinstance(p, URLResolver):
            yield from _walk(p.url_patterns, prefix + str(p.pattern), p.namespace or namespace)
        else:
            name = p.name or ""
            yield prefix + str(p.pattern), f"{namespace}:{name}" if namespace else name


def test_every_url_pattern_is_covered():
    covered = {route.name for route in ROUTES}
    missing = sorted({name or pattern for pattern, name in _walk(get_resolver().url_patterns)} - covered)
    assert not missing, f"URL patterns without persona expectations (add them to ROUTES): {missing}"


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method}:{r.name}")
@pytest.mark.parametrize("persona", PERSONAS)
def test_route_as_persona(world, route, persona):
    api = route.name.startswith(("api:", "api/"))
    client = client_for(world, persona, api)
    url = route.build(world)
    kwargs = {}
    if route.data is not None:
        data = route.data(world) if callable(route.data) else route.data
        kwargs = {"data": data, "content_type": "application/json"} if api else {"data": data}
    response = getattr(client, route.method)(url, **kwargs)
    expected = route.expect[persona]
    assert response.status_code == expected, (
        f"{persona} {route.method.upper()} {url}: got {response.status_code}, expected {expected}"
    )
    if api and response.status_code >= 400:
        assert "detail" in response.json() and isinstance(response.json()["detail"], str)
    if not api and persona == "anon" and expected == 302 and route.name not in {
        "account_email", "account_email_redirect", "account_set_password", "account_logout",
        "lobby_seat",  # public: "I am ready" sends the kiosk to the oTree room
    }:
        assert response["Location"].startswith(LOGIN), response["Location"]


def test_refused_deletes_leave_the_object(world):
    """Other personas' attempts (404 above) must not have removed anything."""
    for persona in ("boss", "bob"):
        client_for(world, persona, api=False).post(f"/settings/keys/{world.ann_key.pk}/delete/")
        client_for(world, persona, api=True).delete(f"/api/v1/me/ssh-keys/{world.ann_key.pk}")
        client_for(world, persona, api=False).post(f"/settings/tokens/{world.ann_token_id}/revoke/")
    assert SSHKey.objects.filter(pk=world.ann_key.pk).exists()
    assert world.ann.access_tokens.filter(pk=world.ann_token_id).exists()


@pytest.mark.parametrize("action", ["promote", "demote", "deactivate", "activate", "invite", "delete"])
@pytest.mark.parametrize("persona", ["anon", "ann", "bob"])
def test_account_actions_refused_to_non_managers(world, persona, action):
    client = client_for(world, persona, api=False)
    target = world.bob if persona != "bob" else world.ann
    response = client.post(f"/users/{target.pk}/{action}/")
    assert response.status_code == (302 if persona == "anon" else 403)
    target.refresh_from_db()
    assert target.is_active and not target.is_superuser


def test_actions_need_csrf(world):
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.ann)
    response = client.post(f"/settings/keys/{world.ann_key.pk}/delete/")
    assert response.status_code == 403
    assert SSHKey.objects.filter(pk=world.ann_key.pk).exists()
