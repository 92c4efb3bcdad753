"""Issue 11's acceptance test: a hostile experimenter's oTree project (tests/hostile) pushed
to real instances on every runtime — Docker, the process runtime as root, and Swarm — beside a
neighbour instance with data in its database. Its build (setup.py of a requirement), its
settings reader and its app each try every escape; every attempt must fail, the controls
must succeed (proof that the probes work), and the neighbour and the manager keep working
with nothing lost.

Per runtime, one story (builds are slow; ~1.5 min each):
1. two instances: the victim (PostgreSQL) and the attacker (memory 512 MiB, 0.5 CPU; on the
   process runtime an SQLite instance, for the link attack on backups);
2. the attacker's project is deployed through the real pipeline (record_push → deploy);
   the targets (the victim's files, sockets, containers and processes, the manager's
   secrets, database, sockets, a listener of the host on 0.0.0.0 tried on every host
   address, one on 127.0.0.1, 169.254.169.254, an outside host) are in the project and in
   the sdist its requirements fetch from that outside host;
3. its app plants a .pth into its environment; the victim deploys with the SAME
   requirements (a shared environment, where the runtime shares one): neither that .pth
   nor the build's daemon may run anything in the victim;
4. the victim gets data; the attacker probes again with everything now known, forks 2000
   processes and spins busy loops while the victim must keep answering, allocates past its
   memory limit;
5. its SQLite file becomes a link to the manager's database (on PostgreSQL: the file of
   its users table), then "Back up now": the backup must not be the manager's database;
6. it rewrites the process runtime's files about it (instance.json says root, state.json
   points its log at the manager's key and its pids at the victim's, spec.json, links where
   root writes temporary files) and the manager does what reads them: shows its logs and
   page (no secret), restarts it (the victim lives), deploys it again (the settings reader
   and the app not as root);
7. nothing of the attacker's ran in the victim (markers, calls home);
8. traps for root (links to the victim's folder and the manager's secrets, a hard link to
   the key, the database link again), then the delete: the victim survives with its data
   and its user, the final backup is not the manager's database;
9. the manager's secrets (content, owner, mode, links), users and Redis are unchanged,
   nothing was written through a planted link, a manager page loads;
10. no listener of the host or the metadata address saw a connection; the controls
   reached what they must.
The process runtime and Swarm run with LAB_EGRESS=deny (the app must not reach the outside
host; its build must), Docker with LAB_EGRESS=open (the app must reach it).

Every escape that worked is collected and reported together (stage, probe, target,
detail), so one run shows everything that is still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import pwd
import shutil
import stat
import subprocess
import threading
import types
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
from django.conf import settings as django_settings

from instances import proxy, reconciler, releases
from instances.backups import backup_dir
from instances.git import hookservice
from instances.git.repos import git_root, hook_socket_path, repo_path
from instances.models import Backup, Instance, Release
from manager import datadir
from manager.accounts.models import User
from tests import backends, db_helpers, file_helpers, hostile, otree_projects
from tests.conftest import need
from tests.netns_helpers import host_addresses, host_listener, netns_available, outside_host
from tests.waits import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

VICTIM, ATTACKER = "hv-victim", "hv-attacker"
ATTACKER_MEMORY_MB = 512
EGRESS = {"docker": "open", "process": "deny", "swarm": "deny"}  # both modes exercised (swarm: through docker_gwbridge)
OUTSIDE_ADDRESS = f"198.51.100.{10 + os.getpid() % 200}"  # TEST-NET-2; per run (parallel runs)
METADATA_ADDRESS = "169.254.169.254"


# --- the test hosts and the manager's own services ----------------------------------------------

@pytest.fixture(scope="module")
def hosts():
    """The outside host (serves the sdist), the metadata address, a service of the host on
    0.0.0.0 and one on 127.0.0.1 (the manager's web and SSH ports stand for it)."""
    need(netns_available(), "root with iproute2 (ip netns) for the test hosts")
    with outside_host(OUTSIDE_ADDRESS) as outside, outside_host(METADATA_ADDRESS) as metadata, \
            host_listener("0.0.0.0") as everywhere, host_listener("127.0.0.1") as loopback:
        yield types.SimpleNamespace(outside=outside, metadata=metadata, everywhere=everywhere, loopback=loopback)


@pytest.fixture(scope="module")
def manager_sockets():
    """The manager's git-hook socket (the real hook service) and Caddy's admin socket (the
    real Caddy), so the probes aim at the real things."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box = {}

    def serve():
        asyncio.set_event_loop(loop)
        box["server"] = loop.run_until_complete(hookservice.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10), "the git hook service did not start"
    caddy = None
    if proxy.caddy_binary():
        caddy = proxy.launch_caddy(sync_on_start=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        proxy.wait_until_up(caddy)
    try:
        yield {"hooks": hook_socket_path(), "caddy": proxy.admin_socket() if caddy else None}
    finally:
        if caddy is not None:
            caddy.kill()
            caddy.wait(timeout=10)
        loop.call_soon_threadsafe(box["server"].close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@pytest.fixture(params=backends.BACKENDS)
def runtime(request, settings):
    backends.require(request.param)
    settings.LAB_RUNTIME = request.param
    settings.LAB_EGRESS = EGRESS[request.param]
    rt = backends.make(request.param)
    yield rt
    for name in (ATTACKER, VICTIM):
        with contextlib.suppress(Exception):
            rt.remove(name)
    if rt.name in ("docker", "swarm"):
        for image in rt.api.images(filters={"label": [f"org.otree-lab.manager={rt.manager_id}"]}):
            with contextlib.suppress(Exception):
                rt.api.remove_image(image["Id"], force=True)


@pytest.fixture
def run():
    """A token of this test's attack: in the sdist's URL, in markers and calls home."""
    token = uuid.uuid4().hex[:10]
    yield token
    for marker in glob.glob(f"/tmp/hostile-*{token}*"):
        with contextlib.suppress(OSError):
            os.unlink(marker)


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    """Jobs are run here, in order, by the test (as the worker would)."""
    from manager.jobs import services as jobs

    monkeypatch.setattr(jobs, "start", lambda task, **kwargs: types.SimpleNamespace(pk=None, id=None))


# --- the pipeline ---------------------------------------------------------------------------

def new_instance(owner, name, tmp_path, **fields) -> tuple[Instance, otree_projects.Checkout]:
    instance = Instance.objects.create(name=name, owner=owner, public_port=None,
                                       runtime=django_settings.LAB_RUNTIME, **fields)
    shutil.rmtree(repo_path(name), ignore_errors=True)
    bare = otree_projects.init_bare(repo_path(name))
    reconciler.reconcile(instance.pk)
    instance.refresh_from_db()
    assert instance.status == "ready_for_code", instance.status_reason
    return instance, otree_projects.Checkout(tmp_path / f"{name}-work", bare)


def deploy(instance, checkout, files, message, user) -> Release:
    commit = checkout.push(files, message)
    release = releases.record_push(instance, commit=commit, branch="main", pushed_by=user)
    releases.deploy(release.pk)
    release.refresh_from_db()
    return release


def app_url(runtime, name) -> str:
    url = runtime.state(name).app_url
    assert url, f"{name} has no app URL"
    return url


def answers(runtime, name) -> bool:
    """The instance's oTree answers (any status below 500)."""
    try:
        return requests.get(app_url(runtime, name) + "/", timeout=15, allow_redirects=False).status_code < 500
    except (requests.RequestException, AssertionError):
        return False


hostile_mark = "@@HOSTILE@@"


def hostile_call(runtime, path, targets=None, timeout=180) -> list[dict]:
    url = app_url(runtime, ATTACKER) + path
    if targets is None:
        resp = requests.get(url, timeout=timeout)
    else:
        resp = requests.post(url, data=json.dumps(targets), timeout=timeout)
    if resp.status_code != 200:
        log = [line for line in runtime.logs(ATTACKER, "app", tail=400).splitlines() if hostile_mark not in line]
        raise AssertionError(f"{path}: {resp.status_code} {resp.text[-3000:]}\n" + "\n".join(log[-60:]))
    return resp.json()["findings"]


def while_answering(runtime, fn, what: str) -> tuple[object, list[bool]]:
    """Run `fn` (an attack) while the victim is asked every half second whether it answers."""
    answered = []

    def attack_over(future) -> bool:
        if future.done():
            return True
        answered.append(answers(runtime, VICTIM))
        return False

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fn)
        wait_until(lambda: attack_over(future), 300, 0.5, f"the end of {what}")
        result = future.result()
    answered.append(answers(runtime, VICTIM))
    assert all(answered), f"the victim stopped answering during {what}: {answered}"
    return result, answered


# --- what the attacker knows -----------------------------------------------------------------

def victim_tree(runtime, limit: int = 90) -> tuple[list[str], list[str]]:
    """(paths, sockets) in the victim's folder (process runtime), PostgreSQL's internals left out."""
    if runtime.name != "process":
        return [], []
    root = runtime.dir(VICTIM)
    paths, sockets = [str(root)], []
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        dirs[:] = [] if depth >= 3 else sorted(d for d in dirs if not d.startswith(("pg_", "base", "global")))
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue
            if stat.S_ISSOCK(mode):
                sockets.append(path)
            elif len(paths) < limit:
                paths.append(path)
    return paths, sockets


def victim_sql(runtime, victim: Instance, statement: str) -> tuple[int, str]:
    """SQL in the victim's own database, as its app's user: (0, output) or (1, the error)."""
    if runtime.name in ("docker", "swarm"):
        return backends.sql(runtime, VICTIM, statement)
    import psycopg

    sockets = [path for path in victim_tree(runtime)[1] if ".s.PGSQL" in path]
    if not sockets:
        return 1, "the victim's PostgreSQL socket is gone"
    try:
        with psycopg.connect(host=os.path.dirname(sockets[0]), user=victim.db_user, password=victim.db_password,
                             dbname=victim.db_name, autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(statement)
            rows = cur.fetchall() if cur.description else []
        return 0, "\n".join("|".join(str(v) for v in row) for row in rows)
    except psycopg.Error as exc:
        return 1, str(exc)


def processes_of(folder: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if folder in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def targets(runtime, victim: Instance, attacker: Instance, hosts, sockets: dict, run: str, *,
            victim_live: bool) -> dict:
    """Everything the attacker aims at (see the module's text); each with what is expected."""
    data = Path(django_settings.DATA_DIR)
    key_file = Path(datadir.data_dir()) / "secrets" / "encryption.key"
    from django.db import connection

    manager_db = db_helpers.database_path()  # what it runs on now: SQLite's file or PostgreSQL's folder
    files = []

    def add(path, read="blocked", write="blocked", what=""):
        if os.path.lexists(path):
            files.append({"path": str(path), "read": read, "write": write, "what": what})

    for path, what in ((key_file, "the manager's encryption key"),
                       (data / "secrets" / "django_secret_key", "the manager's Django secret"),
                       (manager_db, "the manager's database"), (data / "manager.sqlite3", "the manager's database"),
                       (data, "the manager's data dir"), (data / "secrets", "the manager's secrets"),
                       (backup_dir(), "the backups"), (git_root(), "the git repositories"),
                       (repo_path(VICTIM), "the victim's repository"),
                       (repo_path(VICTIM) / "config", "the victim's repository"),
                       (data / "run", "the manager's sockets"), (proxy.caddy_dir(), "Caddy's folder"),
                       (data / "logs", "the manager's logs"), (data / "instances", "every instance's folder")):
        add(path, what=what)
    if runtime.name == "process":
        add(runtime.venvs_root, read="info", what="the shared environments")
    paths, victim_sockets = victim_tree(runtime)
    for path in paths:
        add(path, what="the victim's files")
    own_metadata = []
    plant_links = []
    if runtime.name == "process":
        mine = runtime.dir(ATTACKER)
        for name in ("instance.json", "spec.json", "state.json", "supervisor.lock"):
            if (mine / name).exists():
                own_metadata.append(str(mine / name))
                add(mine / name, read="info", what=f"the manager's {name} of the attacker")
        for log in sorted((mine / "logs").glob("*")) if (mine / "logs").is_dir() else []:
            add(log, read="info", what="the attacker's logs (written by its supervisor)")
        add(mine / "logs", read="info", what="the attacker's log folder")
        add(mine, read="info", what="the attacker's folder of the manager's (metadata, logs)")
        # Where root writes temporary files (a link there would make root write the manager's secrets).
        for name in ("spec.tmp", "instance.json.tmp", "spec.json.tmp"):
            plant_links.append({"link": str(mine / name), "target": str(data / "secrets" / f"hostile-{run}-{name}"),
                                "what": f"a link where the manager writes {name}"})

    unix = [{"path": str(datadir.redis_socket_path()), "proto": "redis", "what": "the manager's Redis"},
            {"path": str(sockets["hooks"]), "proto": "json", "what": "the manager's git-hook socket"},
            {"path": "/var/run/docker.sock", "proto": "http", "http_path": "/version", "what": "the Docker socket"}]
    if sockets.get("caddy"):
        unix.append({"path": str(sockets["caddy"]), "proto": "http", "what": "Caddy's admin socket"})
    pg = []
    for path in victim_sockets:
        proto = "pg" if ".s.PGSQL" in path else "redis" if path.endswith(".sock") else "raw"
        unix.append({"path": path, "proto": proto, "user": victim.db_user, "dbname": victim.db_name,
                     "what": f"the victim's {'PostgreSQL' if proto == 'pg' else 'Redis'} socket"})
        if proto == "pg":
            pg.append({"host": os.path.dirname(path), "port": 5432, "user": victim.db_user,
                       "password": victim.db_password, "dbname": victim.db_name,
                       "what": "the victim's PostgreSQL with its password"})

    tcp = []
    for address in host_addresses():
        tcp.append({"host": address, "port": hosts.everywhere.port, "proto": "http",
                    "what": "a service of the host on 0.0.0.0"})
    tcp.append({"host": "127.0.0.1", "port": hosts.loopback.port, "proto": "http",
                "what": "a service of the host on 127.0.0.1 (as the manager's web and SSH ports)"})
    tcp.append({"host": METADATA_ADDRESS, "port": 80, "proto": "http", "http_path": f"/latest/meta-data/{run}",
                "what": "the metadata address"})
    db = connection.settings_dict
    if connection.vendor == "postgresql" and db["HOST"] in ("127.0.0.1", "localhost", "::1"):
        tcp.append({"host": db["HOST"], "port": int(db["PORT"]), "proto": "pg", "user": db["USER"],
                    "dbname": db["NAME"], "what": "the manager's PostgreSQL"})
    if runtime.name in ("docker", "swarm"):
        for component, port, proto in (("db", 5432, "pg"), ("redis", 6379, "redis"), ("app", 8000, "http")):
            try:
                info = runtime.api.inspect_container(backends.container_of(runtime, VICTIM, component))
            except Exception:  # noqa: BLE001 - no app before its first deploy
                continue
            for network in (info["NetworkSettings"].get("Networks") or {}).values():
                if network.get("IPAddress"):
                    tcp.append({"host": network["IPAddress"], "port": port, "proto": proto,
                                "user": victim.db_user, "dbname": victim.db_name,
                                "what": f"the victim's {component} container"})
                    if component == "db":
                        pg.append({"host": network["IPAddress"], "port": 5432, "user": victim.db_user,
                                   "password": victim.db_password, "dbname": victim.db_name,
                                   "what": "the victim's PostgreSQL with its password"})
    if victim_live:
        port = int(app_url(runtime, VICTIM).rsplit(":", 1)[1])
        tcp.append({"host": "127.0.0.1", "port": port, "proto": "http", "what": "the victim's app port"})

    forbidden_uids = [0]
    if runtime.name == "process":
        forbidden_uids += sorted({p.uids().real for p in processes_of(str(runtime.dir(VICTIM)))} - {0})
    return {
        "run": run,
        "files": files,
        "unix": unix,
        "tcp": tcp,
        "pg": pg,
        "outside": {"url": hosts.outside.url, "what": "an outside host",
                    "expect": {"build": "allowed", "settings": "info",
                               "app": "allowed" if EGRESS[runtime.name] == "open" else "blocked"}},
        "neighbour": {"match": str(runtime.dir(VICTIM)) if runtime.name == "process" else "postgres",
                      "dir": str(runtime.dir(VICTIM)) if runtime.name == "process" else ""},
        "manager": {"key_file": str(key_file), "db": str(db_helpers.users_file())},  # (its SQLite file's link)
        "own_metadata": own_metadata,
        "plant_links": plant_links,
        "own_files": ["settings.py"],
        "forbidden_uids": forbidden_uids,
        "forks": int(os.environ.get("HOSTILE_FORKS", 2000)),
        "allocate_mb": ATTACKER_MEMORY_MB * 2 + 256,
        # Docker: the environment is the container's own copy; the process runtime shares it.
        "pth_expect": "info" if runtime.name in ("docker", "swarm") else "blocked",
    }


# --- the manager's state ------------------------------------------------------------------------

def digest(path: Path) -> str:
    return file_helpers.sha256(path)  # (not read here: the manager's database is among them; tests/file_helpers.py)


def manager_snapshot() -> dict:
    data = Path(django_settings.DATA_DIR)
    def described(path: Path) -> str:
        info = path.lstat()
        return f"{digest(path)} uid={info.st_uid} gid={info.st_gid} mode={oct(info.st_mode)} links={info.st_nlink}"

    return {
        "secrets": {p.name: described(p) for p in sorted((data / "secrets").glob("*"))},
        "users": sorted(User.objects.values_list("username", "password", "is_superuser")),
        "instances": sorted(Instance.objects.values_list("name", "owner__username")),
    }


def manager_redis():
    import redis

    return redis.Redis(unix_socket_path=str(datadir.redis_socket_path()), socket_timeout=5)


# --- the story ---------------------------------------------------------------------------------

@dataclass
class Story:
    """One runtime's attack: who is who, what the attacker knows, what was found."""

    runtime: object
    hosts: types.SimpleNamespace
    sockets: dict
    run: str
    tmp_path: Path
    boss: User
    victim: Instance = None
    attacker: Instance = None
    victim_checkout: otree_projects.Checkout = None
    attacker_checkout: otree_projects.Checkout = None
    known: dict = field(default_factory=dict)  # the targets, as the attacker knows them now
    sdist_url: str = ""
    reader: dict = field(default_factory=dict)  # what the first settings reader reported
    findings: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    def call(self, path: str, *, send: bool = True) -> list[dict]:
        return hostile_call(self.runtime, path, self.known if send else None)

    def aim(self, *, victim_live: bool) -> None:
        self.known = targets(self.runtime, self.victim, self.attacker, self.hosts, self.sockets, self.run,
                             victim_live=victim_live)


def violations(findings: list[dict]) -> list[str]:
    return [f"[{f['stage']}] {f['probe']} {f['target']} ({f['what']}): reached={f['reached']} "
            f"expected {f['expect']} — {f['detail']}" for f in findings
            if (f["expect"] == "blocked" and f["reached"]) or (f["expect"] == "allowed" and not f["reached"])]


def manager_database_in(content: bytes, boss: User) -> bool:
    return b"accounts_user" in content or boss.password.encode() in content


def create_instances(story: Story, settings, owners) -> None:
    """The victim (PostgreSQL) and the attacker (SQLite on the process runtime)."""
    ann, mallory = owners
    story.victim, story.victim_checkout = new_instance(ann, VICTIM, story.tmp_path,
                                                       config_vars={"PROBE_ROLE": "victim"})
    if story.runtime.name == "process":
        settings.LAB_PG_BIN = "/nonexistent"  # recorded at creation: this instance keeps SQLite
    story.attacker, story.attacker_checkout = new_instance(
        mallory, ATTACKER, story.tmp_path, memory_mb=ATTACKER_MEMORY_MB, cpus=0.5,
        config_vars={"PROBE_ROLE": "attacker"})
    settings.LAB_PG_BIN = ""


def deploy_the_attack(story: Story) -> None:
    """Build, settings reader and app each attack; every stage must have run."""
    story.aim(victim_live=False)
    sdist_path = story.hosts.outside.files / story.run / hostile.SDIST_NAME
    sdist_path.parent.mkdir(parents=True)
    sdist_path.write_bytes(hostile.sdist(story.known))
    story.sdist_url = f"{story.hosts.outside.url}/{story.run}/{hostile.SDIST_NAME}"
    first = deploy(story.attacker, story.attacker_checkout, hostile.project(story.known, story.sdist_url),
                   "nothing to see here", story.attacker.owner)
    (story.tmp_path / "attacker-first.log").write_text(first.log)
    assert first.status == "live", (first.status_reason, first.log[-4000:])
    report = requests.get(app_url(story.runtime, ATTACKER) + "/hostile/report", timeout=30).json()
    story.findings += report["build"] + report["findings"]
    story.reader = hostile.settings_report(first.rooms)
    print(f"settings reader: {story.reader['summary']} / {story.reader['limits']}")
    assert any(f["stage"] == "build" and f["probe"] == "identity" for f in report["build"]), \
        f"setup.py did not run in the build: {report['build']}"
    assert story.reader["summary"].startswith("stage=settings"), \
        f"the settings reader did not run the probes: {first.rooms}"
    assert any(f["stage"] == "app" and f["probe"] == "identity" for f in report["findings"])
    story.problems += [f"[settings] {text}" for text in story.reader["violations"]]


def share_the_environment(story: Story) -> None:
    """A .pth from the running app; then the victim deploys with the same requirements
    (and gets data)."""
    story.findings += story.call("/hostile/run/pth")
    files = otree_projects.valid_project("v1")
    files["requirements.txt"] = hostile.requirements(story.sdist_url)
    shared = deploy(story.victim, story.victim_checkout, files, "the victim's study", story.victim.owner)
    assert shared.status == "live", (shared.status_reason, shared.log[-4000:])
    assert answers(story.runtime, VICTIM)
    code, out = victim_sql(story.runtime, story.victim,
                           "CREATE TABLE canary (v text); INSERT INTO canary VALUES ('precious')")
    assert code == 0, out


def attack_the_live_neighbour(story: Story) -> None:
    """Everything again, now that the victim runs; a fork bomb and busy loops while the
    victim must keep answering; memory past the limit."""
    story.aim(victim_live=True)
    story.findings += story.call("/hostile/run/all")
    bomb, _ = while_answering(story.runtime, lambda: story.call("/hostile/run/forkbomb?n=2000&hold=3"),
                              "a fork bomb next door")
    busy, _ = while_answering(story.runtime, lambda: story.call("/hostile/run/busy?seconds=6&procs=4"),
                              "busy loops next door")
    story.findings += bomb + busy + story.call("/hostile/run/memory")
    assert answers(story.runtime, VICTIM)


def back_up_a_link(story: Story) -> None:
    """Its SQLite file a link to the manager's database, then "Back up now": the backup
    (what the download hands out) must not be the manager's database."""
    story.findings += story.call("/hostile/run/dblink")
    try:
        backup = reconciler.backup_only(story.attacker.pk, story.boss)
        if manager_database_in((backup_dir() / backup.filename).read_bytes(), story.boss):
            story.problems.append(f"the attacker's backup {backup.filename} is the manager's database "
                                  "(users and password hashes)")
    except reconciler.ReconcileError as exc:
        print(f"backup of the attacker refused: {exc}")  # nothing handed out: fine
    story.call("/hostile/run/dblink?undo=1")  # (its app needs its own file to start again)


def rewrite_the_metadata(story: Story, client) -> None:
    """The runtime's files about the attacker rewritten; then what the manager does with
    them: its logs and page, a restart, a new deploy (settings reader and app not as root)."""
    story.findings += story.call("/hostile/run/metadata?keep=600")
    secret_key = Path(django_settings.DATA_DIR) / "secrets" / "django_secret_key"
    secrets_text = [Path(story.known["manager"]["key_file"]).read_text().strip()]
    secrets_text += [secret_key.read_text().strip()] if secret_key.exists() else []
    for component in ("app", "db", "redis"):
        with contextlib.suppress(Exception):
            if any(secret in story.runtime.logs(ATTACKER, component) for secret in secrets_text):
                story.problems.append(f"the attacker's {component} log shows the manager's secrets")
    client.force_login(story.boss)
    page = client.get(f"/instances/{ATTACKER}/").content.decode(errors="replace")
    if any(secret in page for secret in secrets_text):
        story.problems.append("the attacker's instance page shows the manager's secrets")
    try:
        reconciler.reconcile(story.attacker.pk, restart=True)
    except Exception as exc:  # noqa: BLE001 - its own instance may break; the victim must not
        print(f"restarting the attacker failed: {exc}")
    if not answers(story.runtime, VICTIM):
        story.problems.append("the victim stopped answering when the manager restarted the attacker")
    second = deploy(story.attacker, story.attacker_checkout, hostile.project(story.known, story.sdist_url, "v2"),
                    "again", story.attacker.owner)
    if second.status != "live":
        story.problems.append(f"the attacker's second deploy failed: {second.status_reason}")
        return
    reader = hostile.settings_report(second.rooms)
    story.problems += [f"[settings, 2nd deploy] {text}" for text in reader["violations"]]
    if "uid=0 " in reader["summary"]:
        story.problems.append(f"the settings reader ran as root after the metadata attack: {reader['summary']}")
    report = requests.get(app_url(story.runtime, ATTACKER) + "/hostile/report", timeout=30).json()
    story.findings += [f for f in report["findings"] if f["probe"] in ("identity", "root", "uid", "capabilities")]


def nothing_ran_in_the_victim(story: Story) -> None:
    """Neither the app's .pth nor the build's daemon ran anything in the victim."""
    runtime, run = story.runtime, story.run
    if runtime.name == "process":
        markers = glob.glob(f"/tmp/hostile-pth-{run}-*-victim-*")
        for folder, dirs, files in os.walk(runtime.dir(VICTIM)):  # its HOME, wherever the runtime keeps it
            if len(Path(folder).relative_to(runtime.dir(VICTIM)).parts) >= 3:
                dirs[:] = []
            markers += [os.path.join(folder, f) for f in files if f.startswith(f"hostile-pth-{run}-")]
    else:
        container = runtime.api.inspect_container(backends.container_of(runtime, VICTIM, "app"))["Id"]
        exec_id = runtime.api.exec_create(container, ["sh", "-c", "ls /tmp $HOME 2>/dev/null"])
        markers = [m for m in runtime.api.exec_start(exec_id).decode().split() if m.startswith(f"hostile-pth-{run}")]
    if markers:
        story.problems.append(f"the attacker's .pth ran in the victim: {markers}")
    hits = story.hosts.outside.hits()
    if [h for h in hits if h["path"].startswith(f"/daemon-survived/{run}")] or \
            os.path.exists(f"/tmp/hostile-daemon-{run}-survived"):
        story.problems.append("a daemon started by setup.py outlived the build (and could poison its environment)")
    calls = [h for h in hits if h["path"].startswith(f"/pth-ran/{run}/") and "victim" in h["path"]]
    if calls:
        story.problems.append(f"the attacker's .pth called home from the victim: {calls}")


def delete_the_attacker(story: Story) -> None:
    """Traps for root and its database linked to the manager's again; then the delete:
    the final backup hands nothing out and does not stop it; the victim survives with its
    data and its user."""
    runtime = story.runtime
    if answers(runtime, ATTACKER):
        story.call("/hostile/run/dblink")
        story.findings += story.call("/hostile/run/traps")
    victim_uids = ({p.uids().real for p in processes_of(str(runtime.dir(VICTIM)))} - {0}
                   if runtime.name == "process" else set())
    Instance.objects.filter(pk=story.attacker.pk).update(delete_requested=True)
    try:
        reconciler.reconcile(story.attacker.pk)
    except Exception as exc:  # noqa: BLE001 - reported with the rest
        story.problems.append(f"deleting the attacker failed: {exc}")
    for final in Backup.objects.filter(instance_name=ATTACKER, kind=Backup.Kind.FINAL, status=Backup.Status.DONE):
        path = backup_dir() / final.filename
        if path.exists() and manager_database_in(path.read_bytes(), story.boss):
            story.problems.append(f"the attacker's final backup {final.filename} is the manager's database")
    if not answers(runtime, VICTIM):
        story.problems.append("the victim stopped answering when the manager deleted the attacker")
    for uid in victim_uids:  # (the user named in the attacker's files is never removed)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            story.problems.append(f"deleting the attacker removed the victim's user (uid {uid})")
    code, out = victim_sql(runtime, story.victim, "SELECT v FROM canary")
    if (code, out) != (0, "precious"):
        story.problems.append(f"the victim's data changed: {code} {out}")
    code, out = victim_sql(runtime, story.victim, "SELECT to_regclass('hostile_was_here')")
    if code != 0 or out not in ("", "None"):
        story.problems.append(f"the attacker wrote into the victim's database: {out}")


def the_manager_is_intact(story: Story, before: dict, client) -> None:
    """Secrets (content, owner, mode, links), users and Redis unchanged; nothing written
    through a planted link; its pages load."""
    after = manager_snapshot()
    if after["secrets"] != before["secrets"] or after["users"] != before["users"]:
        story.problems.append(f"the manager's secrets or users changed: {before} -> {after}")
    planted = sorted(glob.glob(str(Path(django_settings.DATA_DIR) / "secrets" / f"hostile-{story.run}-*")))
    planted += glob.glob(f"/tmp/hostile-spec-ran-{story.run}")
    if planted:
        story.problems.append(f"root wrote through links the attacker planted: {planted}")
    redis = manager_redis()
    if redis.get(f"hostile-canary-{story.run}") != b"intact" or redis.get("hostile-was-here") is not None:
        story.problems.append("the manager's Redis was reached")
    assert client.get("/").status_code in (200, 302)
    assert client.get(f"/instances/{VICTIM}/").status_code == 200


def nothing_arrived(story: Story, already: tuple[int, int, int]) -> None:
    """No connection reached the host's services or the metadata address (whatever the
    probes said); the controls reached the outside host as LAB_EGRESS says."""
    hosts, run = story.hosts, story.run
    reached = hosts.everywhere.connections[already[0]:] + hosts.loopback.connections[already[1]:]
    if reached:
        story.problems.append(f"a service of the host was reached: {reached}")
    # (ours by the run in the path: the metadata address is the same for every test run on this machine)
    metadata = [h for h in hosts.metadata.hits()[already[2]:] if run in h["path"]]
    if metadata:
        story.problems.append(f"the metadata address was reached: {metadata}")
    controls = {h["path"].split("/")[2] for h in hosts.outside.hits()
                if h["path"].startswith("/control/") and h["path"].endswith(f"/{run}")}
    egress = EGRESS[story.runtime.name]
    if "build" not in controls:
        story.problems.append(f"control: the build did not reach the outside host ({controls})")
    if egress == "open" and "app" not in controls:
        story.problems.append("control: the app did not reach the outside host with LAB_EGRESS=open")
    if egress == "deny" and "app" in controls:
        story.problems.append("the app reached the outside host with LAB_EGRESS=deny")


def report(story: Story) -> None:
    (story.tmp_path / "findings.json").write_text(json.dumps(story.findings, indent=1))
    print(f"\n{story.runtime.name}: {len(story.findings)} findings ({story.tmp_path / 'findings.json'}), "
          f"settings reader: {story.reader.get('summary')} / {story.reader.get('limits')}")
    for item in story.findings:
        if item["probe"] in ("forks", "memory", "cpu", "identity"):
            print(f"  [{item['stage']}] {item['probe']}: {item['target']} {item['detail']}")


def test_a_hostile_project_reaches_nothing_but_its_own(runtime, hosts, manager_sockets, run, tmp_path, settings,
                                                      client, boss, ann):
    owners = (ann, User.objects.create_user("mallory", "mallory@lab.test", "pw-mallory-1234"))
    story = Story(runtime=runtime, hosts=hosts, sockets=manager_sockets, run=run, tmp_path=tmp_path, boss=boss)
    datadir.encryption_key()  # the manager's secrets exist, as in any running lab
    already = (len(hosts.everywhere.connections), len(hosts.loopback.connections), len(hosts.metadata.hits()))
    manager_redis().set(f"hostile-canary-{run}", "intact")
    manager_redis().delete("hostile-was-here")  # what a probe that reaches a Redis sets

    create_instances(story, settings, owners)
    before = manager_snapshot()
    deploy_the_attack(story)
    share_the_environment(story)
    attack_the_live_neighbour(story)
    back_up_a_link(story)
    rewrite_the_metadata(story, client)
    nothing_ran_in_the_victim(story)
    delete_the_attacker(story)
    the_manager_is_intact(story, before, client)
    nothing_arrived(story, already)

    report(story)
    assert {"build", "app"} <= {f["stage"] for f in story.findings}
    problems = violations(story.findings) + story.problems
    summary = "\n".join(f"  {line}" for line in problems)
    assert not problems, f"{len(problems)} escapes or failed controls on {runtime.name}:\n{summary}"
