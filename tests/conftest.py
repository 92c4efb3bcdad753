import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from django.conf import settings

from manager import datadir, embedded_redis


@pytest.fixture(scope="session", autouse=True)
def _flush_by_delete():
    """On PostgreSQL, a transactional test's database is emptied with DELETE, as on SQLite:
    Django's TRUNCATE of every table costs about 0.25 s per test there (10 ms with DELETE);
    its foreign keys are deferred, so the order of the DELETEs does not matter."""
    from django.db import connection
    from django.db.backends.postgresql.operations import DatabaseOperations

    if connection.vendor != "postgresql":
        yield
        return
    truncate = DatabaseOperations.sql_flush

    def sql_flush(self, style, tables, *, reset_sequences=False, allow_cascade=False):
        if reset_sequences or allow_cascade:
            return truncate(self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade)
        return [f"{style.SQL_KEYWORD('DELETE FROM')} {style.SQL_FIELD(self.quote_name(table))};" for table in tables]

    DatabaseOperations.sql_flush = sql_flush
    try:
        yield
    finally:
        DatabaseOperations.sql_flush = truncate


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """pytest-django's, and before it drops the test database on PostgreSQL, the sessions
    still open on it end: those of the threads that ran database_sync_to_async (kept for
    CONN_MAX_AGE) made the drop fail ("being accessed by other users")."""
    yield
    from django.db import connection

    if connection.vendor == "postgresql":
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                           " WHERE datname = current_database() AND pid <> pg_backend_pid()")


@pytest.fixture(scope="session", autouse=True)
def redis_server():
    """The real embedded Redis (broker, channel layer, cache) for the whole run."""
    sock = datadir.redis_socket_path()
    proc = embedded_redis.start(settings.DATA_DIR, sock, stdout=subprocess.DEVNULL)
    try:
        embedded_redis.wait_ready(sock, proc=proc)
        yield settings.REDIS_URL
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(settings.DATA_DIR, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _no_firewall_left():
    """The firewall chains this run applied (instances/netguard.py: every instance start
    and sweep applies them) go at its end, with those of the labservers it started; so do
    the Docker images of this run's manager (releases, cached dependencies), its swarm
    services, networks and volumes, and the swarm itself when this run made it."""
    yield
    from instances import netguard

    try:
        netguard.remove(settings.LAB_MANAGER_ID)
        netguard.remove_stale()  # managers whose data dir is gone (e.g. a test's labserver)
    except (netguard.NetguardError, OSError):
        pass  # no iptables or no root here: nothing was applied
    from tests import docker_helpers

    if docker_helpers.engine_ok():
        from tests import swarm_helpers

        if swarm_helpers.swarm_state().get("ControlAvailable"):
            swarm_helpers.purge(settings.LAB_MANAGER_ID)  # the swarm runtime's leftovers, its registry too
        swarm_helpers.leave_if_ours()  # the single-node swarm this run made for the swarm tests
        docker_helpers.remove_images(docker_helpers.api(), settings.LAB_MANAGER_ID)
        try:  # the run's wheel cache of uv builds (instances/runtime/uvcache.py)
            docker_helpers.api().remove_volume(f"otree-lab-{settings.LAB_MANAGER_ID}-uvcache", force=True)
        except Exception:  # noqa: BLE001 - none made, or in use by a build still going
            pass


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # PBKDF2's deliberate slowness is for attackers, not for the test suite.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


# --- the shared world: the personas every test meets ---------------------------------------
# boss is a lab manager; ann and bob are experimenters. A file whose pages show other
# details of a persona (a display name, an e-mail address) passes them to make_persona; one
# that needs another password or role makes its own user under another name.
BOSS_PASSWORD, ANN_PASSWORD, BOB_PASSWORD = "pw-boss-123456", "pw-ann-1234567", "pw-bob-1234567"
PERSONAS = {  # username: (e-mail, password, lab manager)
    "boss": ("boss@lab.test", BOSS_PASSWORD, True),
    "ann": ("ann@lab.test", ANN_PASSWORD, False),
    "bob": ("bob@lab.test", BOB_PASSWORD, False),
}


def make_persona(username: str, **details):
    """The persona `username` (boss, ann or bob), as the fixtures of those names make it:
    for set-ups that cannot take a fixture (module scope, a set-up that runs later, after
    a change of settings). `details` are other fields of the account that a file's pages
    show (name=, email=); the password is always the persona's."""
    from manager.accounts.models import User

    email, password, manager = PERSONAS[username]
    details.setdefault("email", email)
    return User.objects.create_user(username, password=password, is_superuser=manager, is_staff=manager, **details)


@pytest.fixture
def boss(db):
    return make_persona("boss")


@pytest.fixture
def ann(db):
    return make_persona("ann")


@pytest.fixture
def bob(db):
    return make_persona("bob")


# --- ann's instance and its live release ---------------------------------------------------
# What settings.py of the live release holds, as the deploy's introspection records it.
LIVE_SESSION_CONFIGS = [{"name": "guess", "display_name": "Guess", "num_demo_participants": 3}]
LIVE_ROOMS = [{"name": "lab", "display_name": "Lab", "participant_labels": ["seat01", "seat02"]}]


@pytest.fixture(scope="session")
def _new_instance_backend():
    """The backend this machine gives a new instance (LAB_RUNTIME=auto asks the Docker
    engine each time, a tenth of a second): asked once per run. None when there is none
    (creating an instance then fails or records none, as it would anyway)."""
    from instances.runtime import RuntimeError_, default_backend

    try:
        return default_backend()
    except RuntimeError_:
        return None


@pytest.fixture
def instance(boss, ann, settings, _new_instance_backend):
    """ann's instance ann-study, created by boss as the product creates one
    (instances.services.create_instance: a port, the backend, an audit entry and the create
    job). Nothing runs it: the job is enqueued only on commit, which a `db` test never
    reaches (a transactional test would send it to the broker). LAB_RUNTIME names the
    backend auto found, for the test, so the engine is not asked again."""
    from instances import services

    if _new_instance_backend:
        settings.LAB_RUNTIME = _new_instance_backend
    return services.create_instance(boss, name="ann-study", owner=ann)


def make_live_release(instance, commit: str = "b" * 40):
    """The next release of `instance`, live, as the product leaves one: a push by its owner
    (the fields releases.record_push writes), then what the deploy writes once the app
    answered (the session configs, rooms and language read from settings.py, status live)
    and the instance running. Nothing is built (no image) and nothing is started."""
    from django.db import transaction
    from django.utils import timezone

    from instances import state
    from instances.models import Instance, Release
    from instances.selectors import next_number

    now = timezone.now()
    with transaction.atomic():
        release = Release.objects.create(
            instance=instance, number=next_number(instance, Release), commit=commit, branch="main",
            author=f"{instance.owner.username} <{instance.owner.email}>", message="the study",
            pushed_by=instance.owner, status=Release.Status.LIVE, started_at=now, finished_at=now,
            session_configs=copy.deepcopy(LIVE_SESSION_CONFIGS), rooms=copy.deepcopy(LIVE_ROOMS),
            language_code="en")
    state.set_status(instance, Instance.Status.RUNNING, "", notify=False)  # (no page is open to tell)
    return release


@pytest.fixture
def live_release(instance):
    """Release #1 of `instance`, live (make_live_release)."""
    return make_live_release(instance)


@pytest.fixture(autouse=True)
def _clean_cache(redis_server):
    # Rate-limit counters and cached state must not leak between tests.
    from django.core.cache import cache

    cache.clear()
    yield


def need(tool_ok: bool, what: str):
    """Skip when a tool is missing on a developer machine; fail in CI, where .ci/run
    installs everything (a skipped test must never pass for a green run)."""
    if tool_ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but missing")
    pytest.skip(f"{what} not available")


CHROMIUM = Path(os.environ.get("LAB_TEST_CHROMIUM", "/usr/bin/chromium"))
