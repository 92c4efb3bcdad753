"""`manage.py backup_manager` / `restore_manager`: the manager's database and data dir, on
SQLite and on PostgreSQL (a throw-away cluster, tests/pg_helpers.py), back in another
manager after a restore — an account, an instance, a git repository's file, the secrets
key — as a lab manager rolling back an upgrade or moving to a new server would use them."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest

from tests import pg_helpers
from tests.conftest import need
from tests.labserver_helpers import BASE_DIR, child_env, free_port, migrate, new_data_dir, remove_data_dir

pytestmark = pytest.mark.slow

MAKE_STATE = """
import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); django.setup()
from django.conf import settings
from manager.accounts.models import User
from instances.models import Instance
ann = User.objects.create_user(username='ann', email='ann@lab.test', password='x' * 20, name='Ann A')
Instance.objects.create(name='story', owner=ann, public_port=18555)
repo = settings.DATA_DIR / 'git' / 'story.git'
repo.mkdir(parents=True)
(repo / 'description').write_text('the story repository\\n')
"""

READ_STATE = """
import django, json, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); django.setup()
from django.conf import settings
from manager.accounts.models import User
from instances.models import Instance
repo_file = settings.DATA_DIR / 'git' / 'story.git' / 'description'
print(json.dumps({
    'users': sorted(User.objects.values_list('username', flat=True)),
    'instances': [(i.name, i.owner.username, i.public_port) for i in Instance.objects.all()],
    'repo': repo_file.read_text() if repo_file.exists() else None,
    'key': (settings.DATA_DIR / 'secrets' / 'encryption.key').read_text(),
}))
"""


def manage(env, *args, stdin=None, check=True):
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=BASE_DIR, env=env, input=stdin,
                            capture_output=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr.decode()
    return result


def python(env, code):
    result = subprocess.run([sys.executable, "-c", code], cwd=BASE_DIR, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def two_managers(request):
    """Two managers' environments (data dir, database): the one backed up, the one restored into."""
    dirs = [new_data_dir(), new_data_dir()]
    cluster = None
    if request.param == "postgres":
        pg_bin = pg_helpers.find_pg_bin()
        need(pg_bin is not None, "PostgreSQL's server programs (initdb, postgres)")
        cluster = pg_helpers.Cluster(pg_bin)
        for name in ("one", "two"):
            cluster.create_database(name)
        envs = [child_env(d, free_port(), DATABASE_URL=cluster.url(name)) for d, name in zip(dirs, ("one", "two"))]
    else:
        envs = [child_env(d, free_port()) for d in dirs]
    def migrated(i):
        if cluster is None:
            migrate(dirs[i], int(envs[i]["LAB_PORT"]))  # a copy of this run's migrated SQLite database
        else:
            manage(envs[i], "migrate", "--noinput")

    try:
        yield dirs, envs, migrated
    finally:
        if cluster is not None:
            cluster.stop()
        for d in dirs:
            remove_data_dir(d)


@pytest.mark.parametrize("two_managers", ["sqlite", "postgres"], indirect=True)
def test_backup_and_restore_bring_back_database_and_data_dir(two_managers):
    (one_dir, two_dir), (one, two), migrated = two_managers
    migrated(0)
    python(one, MAKE_STATE)
    before = json.loads(python(one, READ_STATE))
    assert before["users"] == ["ann"] and before["repo"]

    # Written into the data dir it backs up: the archive never holds itself.
    out = one_dir / "lab-backup.tar.gz"
    done = manage(one, "backup_manager", str(out))
    assert str(out) in done.stdout.decode()
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and "data/git/story.git/description" in names
    assert "data/lab-backup.tar.gz" not in names and not any(n.endswith(".part") for n in names)
    assert not any(n.startswith("data/run/") or n.endswith(".sqlite3") and n.startswith("data/") for n in names)

    # Another manager, migrated but without accounts (a new server): restored without --force,
    # from stdin as out of a container.
    migrated(1)
    assert json.loads(python(two, READ_STATE))["users"] == []
    manage(two, "restore_manager", "-", stdin=out.read_bytes())
    after = json.loads(python(two, READ_STATE))
    assert after == before  # the account, the instance, the repository's file, the secrets key

    # Now it holds accounts: a second restore is refused without --force, and changes nothing.
    python(two, "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); "
                "django.setup(); from manager.accounts.models import User; "
                "User.objects.create_user(username='bob', email='bob@lab.test', password='y' * 20, name='Bob')")
    refused = manage(two, "restore_manager", str(out), check=False)
    assert refused.returncode == 1
    assert "not empty (2 accounts)" in refused.stderr.decode() and "--force" in refused.stderr.decode()
    assert json.loads(python(two, READ_STATE))["users"] == ["ann", "bob"]
    (two_dir / "git" / "newer.git").mkdir()  # made after the backup: a rollback takes it away
    manage(two, "restore_manager", "--force", str(out))
    assert json.loads(python(two, READ_STATE)) == before
    assert not (two_dir / "git" / "newer.git").exists()


def test_a_file_that_is_no_backup_is_refused(tmp_path):
    data_dir = new_data_dir()
    try:
        port = free_port()
        env = child_env(data_dir, port)
        migrate(data_dir, port)
        bogus = tmp_path / "bogus.tar.gz"
        bogus.write_bytes(b"not a tar file")
        refused = manage(env, "restore_manager", str(bogus), check=False)
        assert refused.returncode == 1 and "not a manager backup" in refused.stderr.decode()
        missing = manage(env, "backup_manager", str(tmp_path / "no" / "such" / "x.tar.gz"), check=False)
        assert missing.returncode == 1 and "does not exist" in missing.stderr.decode()
    finally:
        remove_data_dir(data_dir)
