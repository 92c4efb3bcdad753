"""What only the process runtime has: its supervisor (restarts, survives the manager,
re-adopted, takes its processes with it), SQLite when PostgreSQL's programs are missing,
per-instance users, limits, removal without leftovers — and tenant isolation as a hostile
experimenter would try it, with real processes of the tenant's user (runuser): the files
the manager reads are out of its reach, links it plants in its own tree make the manager
touch nothing outside, an environment cannot be changed after its build (by the running
app or by a daemon a setup.py left), a fork bomb and a busy loop are capped, instances of
the previous version are migrated with their data, and without root nothing unisolated is
created. (Everything the two backends share is tested on both in test_reconciler.py and
test_releases.py.)"""

from __future__ import annotations

import io
import json
import os
import pwd
import signal
import socket
import sqlite3
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from instances import build, otree_project
from instances.runtime.base import AppSpec, Health, InstanceSpec, RuntimeError_
from instances.runtime.process import PIDS, ProcessRuntime, process_refusal
from instances.runtime.procsup import proc_start_ticks
from instances.runtime.tenantfs import processes_of
from tests import backends, db_helpers, file_helpers, otree_projects
from tests.conftest import need
from tests.docker_helpers import http_get
from tests.waits import wait_until

pytestmark = pytest.mark.slow


def manager_id() -> str:
    """This test run's own (another run on the same host has other users and cgroups)."""
    from django.conf import settings

    return "tp" + settings.LAB_MANAGER_ID[:8]


@pytest.fixture
def rt(settings, tmp_path):
    backends.require("process")
    runtime = ProcessRuntime(manager_id=manager_id())
    yield runtime
    for name in runtime.owned_instances():
        runtime.remove(name)


def spec(name, app=None, **kw) -> InstanceSpec:
    return InstanceSpec(name=name, db_name="otree", db_user="otree", db_password="pw-" + name * 2, memory_mb=kw.pop(
        "memory_mb", 384), cpus=kw.pop("cpus", 1), app=app, **kw)


def http_app(runtime, name) -> AppSpec:
    app = backends.fake_app(runtime, name)
    return AppSpec(image=app["image"], command=app["command"], port=app["port"], release_id="t")


def script_app(runtime, name, code: str) -> AppSpec:
    """An app that runs `code` (python -c) in the fake release; sys.argv[1] is its port."""
    app = backends.fake_app(runtime, name)
    return AppSpec(image=app["image"], command=["python", "-c", code, "8000"], port=8000, release_id="s")


def alive(pid) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def started(runtime, name, app=True, **kw):
    runtime.ensure(spec(name, **kw))  # the folder first: the fake app's release lives in it
    state = runtime.ensure(spec(name, app=http_app(runtime, name) if app else None, **kw))
    if app:
        wait_until(lambda: http_get(state.app_url + "/", timeout=2)[0] == 200, 30, message="the app answers")
    return state


def as_tenant(runtime, name, *argv, **kw) -> subprocess.CompletedProcess:
    """A program run by the instance's own user, as its code would run it."""
    return subprocess.run(["runuser", "-u", runtime.user_name(name), "--", *argv], capture_output=True, timeout=60,
                          **kw)


def digest(path: Path) -> str:
    return file_helpers.sha256(path)  # (not read here: see tests/file_helpers.py)


def need_users(runtime):
    need(runtime.own_users and os.geteuid() == 0, "root (per-instance users)")


# --- the supervisor ----------------------------------------------------------------------------------

def test_a_process_that_dies_is_restarted_by_the_supervisor(rt):
    state = started(rt, "p-restart")
    old = rt._state("p-restart")["processes"]["app"]["pid"]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: (rt._state("p-restart")["processes"]["app"].get("pid") not in (None, old)
                        and http_get(state.app_url + "/", timeout=2)[0] == 200), 30,
               message="a new app process answers")
    after = rt.state("p-restart")
    assert after.app.health == Health.RUNNING and "restarted 1x" in after.app.detail
    assert after.app_url == state.app_url  # the same port: the proxy's route still fits
    assert backends.stray_processes(rt, "p-restart") == []


def test_the_supervisor_outlives_the_manager_and_is_re_adopted(rt):
    """A new manager (a new runtime object, e.g. after a restart) finds the running
    supervisor by its lock: no second supervisor, no second set of processes."""
    started(rt, "p-adopt")
    before = sorted(rt.processes("p-adopt"))
    again = ProcessRuntime(manager_id=manager_id())
    for _ in range(3):
        again.ensure(spec("p-adopt", app=http_app(again, "p-adopt")))
    assert sorted(again.processes("p-adopt")) == before
    supervisors = [p for p in psutil.process_iter(["cmdline"]) if "procsup.py" in " ".join(p.info["cmdline"] or [])
                   and str(rt.dir("p-adopt")) in " ".join(p.info["cmdline"] or [])]
    assert len(supervisors) == 1
    assert backends.stray_processes(rt, "p-adopt") == []


def test_a_killed_supervisor_takes_its_processes_along_and_ensure_brings_all_back(rt):
    state = started(rt, "p-sup")
    info = rt._state("p-sup")
    pids = [info["supervisor"]] + [p["pid"] for p in info["processes"].values()]
    children = [c.pid for c in psutil.Process(info["supervisor"]).children(recursive=True)]
    os.kill(info["supervisor"], signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid in pids + children), 30, message="every process of the instance ends")
    assert rt.state("p-sup").app.health != Health.RUNNING
    restored = rt.ensure(spec("p-sup", app=http_app(rt, "p-sup")))
    assert restored.services_ready and restored.app_url == state.app_url
    wait_until(lambda: http_get(restored.app_url + "/", timeout=2)[0] == 200, 30, message="the app answers again")
    assert backends.stray_processes(rt, "p-sup") == []


# --- users and files --------------------------------------------------------------------------------

@pytest.mark.django_db
def test_memory_is_capped_and_each_instance_has_its_own_user(rt):
    started(rt, "p-iso-a")
    started(rt, "p-iso-b", app=False)
    app_pid = rt._state("p-iso-a")["processes"]["app"]["pid"]
    limits = Path(f"/proc/{app_pid}/limits").read_text()
    cap = [line for line in limits.splitlines() if line.startswith("Max address space")][0].split()
    assert int(cap[3]) == 384 * 2**20  # the instance's memory limit, in bytes
    need_users(rt)
    user_a = rt.user_name("p-iso-a")
    entry = pwd.getpwnam(user_a)
    low, high = rt.app_uids
    assert low <= entry.pw_uid <= high and rt.manager_id in user_a  # from the range, named per manager
    assert entry.pw_gecos == f"oTree Lab {rt.manager_id} instance p-iso-a"
    assert psutil.Process(app_pid).username() == user_a
    tenant_a, tenant_b = rt.tenant_dir("p-iso-a"), rt.tenant_dir("p-iso-b")
    assert os.stat(tenant_a).st_uid == entry.pw_uid and os.stat(tenant_a).st_mode & 0o777 == 0o700
    assert os.stat(tenant_a).st_uid != os.stat(tenant_b).st_uid
    # A's code cannot read B's files, the manager's secrets or database, or change an environment.
    venv = rt.venvs_root / "testhttp"
    (rt.data_root / "logs").mkdir(exist_ok=True)  # (whatever the manager keeps there)
    rt._prepare_root()
    for target in (rt.dir("p-iso-b") / "instance.json", tenant_b / "data", rt.data_root / "secrets" / "encryption.key",
                   rt.data_root / "secrets", db_helpers.database_path(), rt.data_root / "logs"):
        assert target.exists(), target
        denied = as_tenant(rt, "p-iso-a", "cat" if target.is_file() else "ls", str(target))
        assert denied.returncode != 0, target
    write = as_tenant(rt, "p-iso-a", "touch", str(venv / "bin" / "evil"))
    assert write.returncode != 0 and not (venv / "bin" / "evil").exists()


def test_the_tenant_cannot_touch_what_the_manager_reads_or_its_supervisor(rt):
    """Metadata, specs, state, logs, the supervisor's lock and the release tree belong to
    the manager: the tenant's own processes fail to change any of it and cannot signal
    the supervisor; identity and log paths never come from what these files say."""
    started(rt, "p-meta")
    need_users(rt)
    root = rt.dir("p-meta")
    release = root / "releases" / "r1"
    app_log = root / "logs" / rt._state("p-meta")["processes"]["app"]["log"]
    targets = [root / "instance.json", root / "spec.json", root / "state.json", root / "supervisor.lock", app_log,
               release / ".lab-venv"]
    before = {path: digest(path) for path in targets if path.name != "state.json"}
    for path in targets:
        assert as_tenant(rt, "p-meta", "sh", "-c", f'echo "{{}}" > "{path}"').returncode != 0, path
        assert as_tenant(rt, "p-meta", "rm", "-f", str(path)).returncode != 0 or path.exists(), path
    for folder in (root, root / "logs", release, root / "releases"):
        planted = folder / "planted"
        assert as_tenant(rt, "p-meta", "touch", str(planted)).returncode != 0 and not planted.exists(), folder
        assert as_tenant(rt, "p-meta", "ln", "-s", "/", str(folder / "spec.tmp")).returncode != 0, folder
    assert {path: digest(path) for path in before} == before
    supervisor = rt._state("p-meta")["supervisor"]
    assert as_tenant(rt, "p-meta", "kill", "-TERM", str(supervisor)).returncode != 0
    assert psutil.Process(supervisor).username() == "root" and rt.supervisor_alive("p-meta")
    # Its own tree is its own (so the refusals above are about the manager's files, not a broken user).
    assert as_tenant(rt, "p-meta", "touch", str(rt.tenant_dir("p-meta") / "home" / "mine")).returncode == 0
    # What these files say is never identity or a path to read: instance.json naming root and
    # a log path naming the manager's secret change nothing.
    meta = json.loads((root / "instance.json").read_text())
    (root / "instance.json").write_text(json.dumps({**meta, "user": "root", "uid": 0}))
    rt.restart_app("p-meta")
    app_pid = rt._state("p-meta")["processes"]["app"]["pid"]
    assert psutil.Process(app_pid).username() == rt.user_name("p-meta")
    state = json.loads((root / "state.json").read_text())
    state["processes"]["app"]["log"] = str(rt.data_root / "secrets" / "encryption.key")
    (root / "state.json").write_text(json.dumps(state))
    key = (rt.data_root / "secrets" / "encryption.key").read_text().strip()
    assert key and key not in rt.logs("p-meta", "app")


@pytest.mark.django_db
def test_links_planted_in_an_sqlite_tenant_tree_make_the_manager_touch_nothing_outside(settings, tmp_path):
    """data/db.sqlite3 -> the manager's database: the backup is of an empty database, nothing leaks;
    data -> a folder of root's: the reset deletes nothing there, the removal neither;
    run -> elsewhere: the readiness probe connects to nothing. (With the manager's database on
    PostgreSQL, whose files change whenever its server writes, a file of root's with the
    manager's tables stands for it.)"""
    from django.db import connection

    backends.require("process")
    runtime = ProcessRuntime(manager_id=manager_id(), pg_bin=str(tmp_path / "no-postgres"))
    need_users(runtime)
    name = "p-links"
    outside = Path(tempfile.mkdtemp(prefix="otl-outside-"))  # stands for "/" (a test must not risk /)
    os.chmod(outside, 0o755)
    (outside / "db.sqlite3").write_text("root's file\n")
    (outside / "keep").write_text("root's other file\n")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(outside / "redis.sock"))
    listener.listen(5)
    listener.settimeout(0.2)
    try:
        assert runtime.ensure(spec(name)).services_ready
        data = runtime.tenant_dir(name) / "data"
        manager_db = db_helpers.database_path() if connection.vendor == "sqlite" else stand_in_database(tmp_path)
        before = digest(manager_db)
        assert as_tenant(runtime, name, "ln", "-sf", str(manager_db), str(data / "db.sqlite3")).returncode == 0
        dest = tmp_path / "backup.sqlite3"  # the link is not followed: an empty database, never the manager's
        runtime.backup_database(name, spec(name), dest)
        assert "accounts_user" in connection.introspection.table_names() and b"accounts_user" not in dest.read_bytes()
        with sqlite3.connect(dest) as copy:
            assert copy.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        assert digest(manager_db) == before
        # The reset deletes with the tenant's rights: root's files stay.
        assert as_tenant(runtime, name, "rm", "-rf", str(data)).returncode == 0
        assert as_tenant(runtime, name, "ln", "-s", str(outside), str(data)).returncode == 0
        with pytest.raises(RuntimeError_, match="resetting the database"):
            runtime.reset_database(name, spec(name))
        assert (outside / "db.sqlite3").read_text() == "root's file\n"
        # A socket link: nothing connects to what it names.
        run = runtime.tenant_dir(name) / "run"
        assert as_tenant(runtime, name, "rm", "-f", str(run / "redis.sock")).returncode == 0
        planted = as_tenant(runtime, name, "ln", "-s", str(outside / "redis.sock"), str(run / "redis.sock"))
        assert planted.returncode == 0
        assert runtime._redis_answers(name) is False
        assert as_tenant(runtime, name, "mv", str(run), str(run) + ".old").returncode == 0
        assert as_tenant(runtime, name, "ln", "-s", str(outside), str(run)).returncode == 0
        assert runtime._redis_answers(name) is False and runtime.state(name).redis.health != Health.RUNNING
        with pytest.raises(socket.timeout):
            listener.accept()
        runtime.remove(name)
        assert sorted(p.name for p in outside.iterdir()) == ["db.sqlite3", "keep", "redis.sock"]
        assert digest(manager_db) == before
    finally:
        listener.close()
        runtime.remove(name)
        subprocess.run(["rm", "-rf", str(outside)], check=False)


def stand_in_database(folder: Path) -> Path:
    """An SQLite file of root's (0600) with the manager's tables and a user in them."""
    from django.db import connection

    path = folder / "manager-stand-in.sqlite3"
    with sqlite3.connect(path) as db:
        for table in connection.introspection.table_names():
            db.execute(f'CREATE TABLE "{table}" (id INTEGER PRIMARY KEY, data TEXT)')
        db.execute("INSERT INTO accounts_user (data) VALUES ('boss')")
    db.close()
    os.chmod(path, 0o600)
    return path


def test_links_planted_in_a_postgresql_tenant_tree_reach_no_other_instance(rt, tmp_path):
    """run -> the neighbour's run folder: backups and resets run as the tenant, who cannot
    reach the neighbour's sockets; the neighbour keeps its data."""
    started(rt, "p-pgl-a", app=False)
    started(rt, "p-pgl-b", app=False)
    need_users(rt)
    import psycopg

    with psycopg.connect(host=str(rt.tenant_dir("p-pgl-b") / "run"), user="otree", dbname="otree",
                         password=spec("p-pgl-b").db_password, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('neighbour')")
    run_a = rt.tenant_dir("p-pgl-a") / "run"
    assert as_tenant(rt, "p-pgl-a", "mv", str(run_a), str(run_a) + ".old").returncode == 0
    assert as_tenant(rt, "p-pgl-a", "ln", "-s", str(rt.tenant_dir("p-pgl-b") / "run"), str(run_a)).returncode == 0
    with pytest.raises(RuntimeError_):
        rt.backup_database("p-pgl-a", spec("p-pgl-a"), tmp_path / "a.dump")
    with pytest.raises(RuntimeError_, match="resetting the database"):
        rt.reset_database("p-pgl-a", spec("p-pgl-a"))
    assert not (tmp_path / "a.dump").exists()
    with psycopg.connect(host=str(rt.tenant_dir("p-pgl-b") / "run"), user="otree", dbname="otree",
                         password=spec("p-pgl-b").db_password) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("neighbour",)]
    assert rt.backup_database("p-pgl-b", spec("p-pgl-b"), tmp_path / "b.dump") > 0


# --- environments --------------------------------------------------------------------------------------

DAEMON_SETUP = r'''
import json, os, sys, sysconfig, time
from setuptools import setup

REPORT = {report!r}
MODULE = {module!r}
if not os.path.exists(REPORT + ".daemon"):
    site = sysconfig.get_paths()["purelib"]
    with open(REPORT, "w") as fh:
        json.dump({{"uid": os.getuid(), "cgroup": open("/proc/self/cgroup").read(), "site": site}}, fh)
    os.chmod(REPORT, 0o644)
    if os.fork() == 0:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # a proper daemon: pip does not wait for it
            os.dup2(null, fd)
        if os.fork() == 0:  # the daemon: folders and files opened now, a payload once pip is done
            try:
                folder = os.open(site, os.O_RDONLY | os.O_DIRECTORY)
                early = os.open(os.path.join(site, "zz_early.pth"), os.O_WRONLY | os.O_CREAT, 0o644)
                with open(REPORT + ".daemon", "w") as fh:
                    ticks = open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]
                    json.dump({{"pid": os.getpid(), "ticks": int(ticks)}}, fh)
                os.chmod(REPORT + ".daemon", 0o644)
                venv = os.path.dirname(os.path.dirname(os.path.dirname(site)))
                for _ in range(6000):  # until the environment is finished and in use (at most 10 minutes)
                    if os.path.exists(os.path.join(venv, ".complete")):
                        break
                    time.sleep(0.1)
                payload = b"import os; open(" + repr(REPORT + ".pwned").encode() + b", 'w').write('x')\n"
                os.write(early, payload)
                late = os.open("zz_late.pth", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=folder)
                os.write(late, payload)
            finally:
                os._exit(0)
        os._exit(0)
    os.wait()
setup(name={name!r}, version="1.0", py_modules=[MODULE])
'''


def sdist(folder: Path, name: str, setup_py: str) -> None:
    """`name`-1.0.tar.gz (setup.py, PKG-INFO and the module) in `folder`."""
    module = name.replace("-", "_")
    with tarfile.open(folder / f"{name}-1.0.tar.gz", "w:gz") as tar:
        for rel, text in ((f"{name}-1.0/setup.py", setup_py), (f"{name}-1.0/{module}.py", "VALUE = 1\n"),
                          (f"{name}-1.0/PKG-INFO", f"Metadata-Version: 1.0\nName: {name}\nVersion: 1.0\n")):
            data = text.encode()
            info = tarfile.TarInfo(rel)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


def test_environments_are_built_by_build_users_and_sealed_against_daemons_and_apps(rt, tmp_path, monkeypatch,
                                                                                     settings):
    """A setup.py run by pip leaves a daemon with open files in site-packages, to write a
    .pth once the environment is finished (what it writes during the build is part of
    the build, like any file the package installs): the build ran as a build user (not
    the instance's), the daemon is killed before the environment is sealed, and the .pth
    never gains a line.
    The running app cannot add one either. Another instance with the same requirements
    reuses the environment and runs nothing planted. Requirements with local paths get an
    environment of the instance's own that others cannot read."""
    backends.require("process")
    need_users(rt)
    # pip: its setup.py runs with the target environment's site-packages (uv builds in an
    # isolated environment of the build's private cache; the same kill and seal follow).
    settings.LAB_INSTALLER = "pip"
    marker = uuid.uuid4().hex[:10]
    name = f"otl-daemon-{marker}"
    module = name.replace("-", "_")
    links = Path(tempfile.mkdtemp(prefix="otl-links-"))
    os.chmod(links, 0o755)
    report = f"/tmp/otl-test-{marker}"
    try:
        sdist(links, name, DAEMON_SETUP.format(report=report, module=module, name=name))
        for entry in links.iterdir():
            os.chmod(entry, 0o644)
        monkeypatch.setenv("PIP_FIND_LINKS", f"{links} {os.environ.get('PIP_FIND_LINKS', '')}".strip())
        ctx = tmp_path / "project"
        ctx.mkdir()
        (ctx / "requirements.txt").write_text(f"{name}==1.0\n")
        for instance in ("p-env-a", "p-env-b"):
            rt.ensure(spec(instance))
        log = []
        image = rt.build_release("p-env-a", 1, ctx, out=log.append, timeout=600)
        facts = json.loads(Path(report).read_text())
        venv = rt._venv_of(rt._release_dir(image))
        assert facts["site"].startswith(str(venv) + "/")  # the daemon aimed at the environment itself
        low, high = rt.builder_uids
        instance_uid = pwd.getpwnam(rt.user_name("p-env-a")).pw_uid
        assert low <= facts["uid"] <= high and facts["uid"] != instance_uid
        if rt.limits.kind != "rlimit":
            assert f"build-{facts['uid']}" in facts["cgroup"]
        daemon = json.loads(Path(report + ".daemon").read_text())
        # Killed (it would still be waiting): gone, a zombie, or its number taken by another process.
        assert not alive(daemon["pid"]) or proc_start_ticks(daemon["pid"]) != daemon["ticks"]
        assert processes_of(facts["uid"]) == []
        site = Path(facts["site"])
        assert (site / "zz_early.pth").read_bytes() == b"" and not (site / "zz_late.pth").exists()
        for path in [venv, *venv.rglob("*")]:
            info = os.lstat(path)
            assert info.st_uid == 0 and not (not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o022), path
        # The instance's running code cannot add a .pth.
        planted = site / "zz_app.pth"
        assert as_tenant(rt, "p-env-a", "sh", "-c", f"echo 'import os' > {planted}").returncode != 0
        assert not planted.exists()
        # The neighbour with the same requirements reuses it and runs nothing planted.
        log_b = []
        image_b = rt.build_release("p-env-b", 1, ctx, out=log_b.append, timeout=600)
        assert any("reusing the environment" in line for line in log_b)
        assert rt._venv_of(rt._release_dir(image_b)) == venv
        ran = as_tenant(rt, "p-env-b", str(venv / "bin" / "python"), "-c", f"import {module}; print({module}.VALUE)",
                        cwd="/")
        assert ran.stdout.strip() == b"1" and not Path(report + ".pwned").exists()
        # A local path: an environment of A's own, closed to B.
        (ctx / "localpkg").mkdir()
        (ctx / "localpkg" / "setup.py").write_text("from setuptools import setup\n"
                                                   "setup(name='localpkg', version='1.0', py_modules=['localpkg'])\n")
        (ctx / "localpkg" / "localpkg.py").write_text("SECRET = 'only-a'\n")
        (ctx / "requirements.txt").write_text("./localpkg\n")
        image = rt.build_release("p-env-a", 2, ctx, out=log.append, timeout=600)
        private = rt._venv_of(rt._release_dir(image))
        assert private != venv and "-" in private.name
        assert os.stat(private).st_gid == pwd.getpwnam(rt.user_name("p-env-a")).pw_gid
        assert as_tenant(rt, "p-env-b", "ls", str(private)).returncode != 0
        assert as_tenant(rt, "p-env-a", str(private / "bin" / "python"), "-c", "import localpkg",
                         cwd="/").returncode == 0
        # What settings.py prints is read as a bounded stream: a flood fails the release, and
        # never reaches the manager's memory whole.
        (ctx / "settings.py").write_text("import sys\nfor _ in range(64): sys.stdout.write('x' * 2**20)\n"
                                         "SESSION_CONFIGS = []\n")
        loud = rt.build_release("p-env-a", 3, ctx, out=log.append, timeout=600)
        with pytest.raises(otree_project.BuildFailed, match="printed more than 4 MB"):
            rt.introspect("p-env-a", loud)
    finally:
        subprocess.run(["rm", "-rf", str(links)], check=False)
        for suffix in ("", ".daemon", ".pwned"):
            Path(report + suffix).unlink(missing_ok=True)


# --- limits ---------------------------------------------------------------------------------------------

BOMB = r'''
import os, sys, time
flag = os.path.join(os.environ["TMPDIR"], "stop-bomb")
made = failed = 0
children = []
for _ in range(2000):
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:
        for _ in range(1200):
            if os.path.exists(flag):
                break
            time.sleep(0.1)
        os._exit(0)
    children.append(pid)
    made += 1
print(f"forks made={made} failed={failed}", flush=True)
for pid in children:
    os.waitpid(pid, 0)
for _ in range(2):  # then a busy loop: three processes spinning
    if os.fork() == 0:
        break
print("spinning", flush=True)
while True:
    pass
'''


def check_bomb_and_spin(runtime, name, neighbour_url, flag):
    """While `name` holds as many processes as it may, the neighbour answers; then its
    busy loop runs."""
    wait_until(lambda: "forks made=" in runtime.logs(name, "app"), 180, message="the fork bomb ends")
    line = [ln for ln in runtime.logs(name, "app").splitlines() if "forks made=" in ln][-1]
    made, failed = (int(part.split("=")[1]) for part in line.split()[1:3])
    assert failed > 0 and made < PIDS  # capped: not 2000 forks
    uid = pwd.getpwnam(runtime.user_name(name)).pw_uid
    assert len(processes_of(uid)) <= PIDS
    assert http_get(neighbour_url + "/", timeout=10)[0] == 200  # the neighbour answers meanwhile
    assert as_tenant(runtime, name, "touch", str(flag)).returncode == 0
    wait_until(lambda: "spinning" in runtime.logs(name, "app"), 120, message="the busy loop starts")
    assert http_get(neighbour_url + "/", timeout=10)[0] == 200


def test_a_fork_bomb_and_a_busy_loop_hurt_only_their_instance(rt):
    """cgroups (v2, or v1 as on this machine): the whole instance at most PIDS processes
    and its CPU limit; the neighbour keeps answering."""
    need_users(rt)
    need(rt.limits.kind in ("v1", "v2"), "writable cgroups (root)")
    neighbour = started(rt, "p-calm")
    rt.ensure(spec("p-bomb", cpus=0.5))
    rt.ensure(spec("p-bomb", cpus=0.5, app=script_app(rt, "p-bomb", BOMB)))
    check_bomb_and_spin(rt, "p-bomb", neighbour.app_url, rt.tenant_dir("p-bomb") / "tmp" / "stop-bomb")
    cgroups = rt._meta("p-bomb")["cgroups"]
    app_pid = rt._state("p-bomb")["processes"]["app"]["pid"]
    assert app_pid in rt.limits.members(cgroups)
    wait_until(lambda: (rt.limits.throttled(cgroups) or 0) > 0, 30, message="the CPU limit holds the busy loop back")
    protections = {p.what: p for p in rt.protections("p-bomb")}
    assert protections["CPU"].holds and f"cgroup {rt.limits.kind}" in protections["CPU"].detail
    assert protections["Processes"].holds and str(PIDS) in protections["Processes"].detail


def test_cgroups_are_found_under_the_managers_own_cgroup(tmp_path):
    """Discovery from /proc/self/cgroup and mountinfo as systemd (Delegate=yes) leaves them:
    cgroup v2 with the manager in <unit>/manager (DelegateSubgroup, or its own move), and
    a hybrid v1 host; the limits land in the files the kernel reads. (v2 cannot run here:
    its tree is a plain folder standing in for the delegated subtree.)"""
    from instances.runtime.limits import Amounts, Limits

    need(os.geteuid() == 0, "root (cgroups)")
    unit = tmp_path / "cg2" / "system.slice" / "otree-lab-manager.service"
    (unit / "manager").mkdir(parents=True)
    (unit / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (unit / "cgroup.subtree_control").write_text("")
    proc = {"cgroup": "0::/system.slice/otree-lab-manager.service/manager\n",
            "mountinfo": f"30 23 0:26 / {tmp_path / 'cg2'} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"}
    limits = Limits.detect("m1", proc=proc)
    assert limits.kind == "v2" and limits.bases == {"unified": str(unit / "otree-lab-m1")}
    assert (unit / "cgroup.subtree_control").read_text() == ""  # finding them changes nothing
    dirs = limits.dirs("study")
    limits.apply(dirs, Amounts(pids=PIDS, cpus=0.5, memory_mb=1200))
    assert set((unit / "cgroup.subtree_control").read_text().split()) == {"+cpu", "+pids", "+memory"}
    folder = Path(dirs[0])
    assert folder == unit / "otree-lab-m1" / "study"
    assert (folder / "cpu.max").read_text() == "50000 100000" and (folder / "pids.max").read_text() == str(PIDS)
    assert (folder / "memory.max").read_text() == str(1200 * 2**20)
    assert set((unit / "otree-lab-m1" / "cgroup.subtree_control").read_text().split()) == {"+cpu", "+pids", "+memory"}
    # Without the controllers delegated: not v2, and why.
    (unit / "cgroup.controllers").write_text("memory\n")
    assert Limits.detect("m1", force="v2", proc=proc).kind == "rlimit"
    assert "no cpu, pids controller" in Limits.detect("m1", force="v2", proc=proc).why
    # An older systemd keeps the manager in the unit's cgroup itself: the hierarchy's root, as root.
    (tmp_path / "cg2" / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cg2" / "cgroup.subtree_control").write_text("cpu memory pids\n")
    proc["cgroup"] = "0::/system.slice/otree-lab-manager.service\n"
    top = Limits.detect("m1", force="v2", proc=proc)
    assert top.kind == "v2" and top.bases == {"unified": str(tmp_path / "cg2" / "otree-lab-m1")}
    # This host, as it is. A hybrid v1 host (as the one these tests were written on): each
    # controller's hierarchy under the manager's own cgroup. A host without writable v1
    # hierarchies (pure v2, or not root): v1 is refused with the reason the page shows.
    here = Limits.detect("m1", force="v1")
    if here.kind != "v1":
        assert here.kind == "rlimit" and ("cgroup v1" in here.why), here.why
        return
    assert set(here.bases) == {"cpu", "pids", "memory"}
    for base in here.bases.values():  # beside this process: in the cgroup it runs in
        assert os.path.basename(base) == "otree-lab-m1"
        assert str(os.getpid()) in Path(os.path.dirname(base), "cgroup.procs").read_text().split()


def test_without_cgroups_a_fork_bomb_stops_at_the_users_process_limit(rt):
    """The fallback (no usable cgroups): RLIMIT_NPROC for the instance's user and a lower
    priority; the page says the CPU is not capped."""
    need_users(rt)
    fallback = ProcessRuntime(manager_id=manager_id(), limits="rlimit")
    try:
        neighbour = started(rt, "p-calm2")
        fallback.ensure(spec("p-bomb2"))
        fallback.ensure(spec("p-bomb2", app=script_app(fallback, "p-bomb2", BOMB)))
        app_pid = fallback._state("p-bomb2")["processes"]["app"]["pid"]
        limits = Path(f"/proc/{app_pid}/limits").read_text()
        nproc = [line for line in limits.splitlines() if line.startswith("Max processes")][0].split()
        assert int(nproc[2]) == PIDS
        assert psutil.Process(app_pid).nice() > 0
        check_bomb_and_spin(fallback, "p-bomb2", neighbour.app_url,
                            fallback.tenant_dir("p-bomb2") / "tmp" / "stop-bomb")
        protections = {p.what: p for p in fallback.protections("p-bomb2")}
        assert not protections["CPU"].holds and "nice" in protections["CPU"].detail
        assert protections["Processes"].holds and "RLIMIT_NPROC" in protections["Processes"].detail
    finally:
        fallback.remove("p-bomb2")


# --- removal, SQLite, migration --------------------------------------------------------------------------

def test_remove_leaves_no_process_folder_cgroup_or_user(rt):
    started(rt, "p-gone")
    pids = rt.processes("p-gone")
    user = rt.user_name("p-gone")
    cgroups = rt._meta("p-gone").get("cgroups") or []
    uid = pwd.getpwnam(user).pw_uid if rt.own_users else None
    if uid is not None:  # a daemon of the app, outside its process group
        subprocess.run(["runuser", "-u", user, "--", "setsid", "-f", "sleep", "600"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=True)
        wait_until(lambda: len(processes_of(uid)) > len(pids), 30, message="the daemon runs")
    rt.remove("p-gone")
    assert not any(alive(pid) for pid in pids)
    assert not rt.dir("p-gone").exists() and "p-gone" not in rt.owned_instances()
    assert not any(os.path.exists(path) for path in cgroups)
    if uid is not None:
        assert processes_of(uid) == []
        assert subprocess.run(["id", user], capture_output=True).returncode != 0
    rt.remove("p-gone")  # idempotent
    # A removal killed after the folder went and before the user did: the sweep finds the user.
    started(rt, "p-half", app=False)
    half_cgroups = rt._meta("p-half").get("cgroups") or []
    rt.stop("p-half")
    subprocess.run(["rm", "-rf", str(rt.dir("p-half"))], check=True)
    assert "p-half" in rt.owned_instances()
    rt.remove("p-half")
    if rt.own_users:
        assert subprocess.run(["id", rt.user_name("p-half")], capture_output=True).returncode != 0
    assert "p-half" not in rt.owned_instances()
    assert not any(os.path.exists(path) for path in half_cgroups)


def test_sqlite_when_postgresql_programs_are_missing(settings, tmp_path):
    """No initdb/postgres: the instance gets an SQLite file, a real oTree app uses it across
    releases (from a release folder it cannot change), backups copy it consistently (as
    the tenant), reset empties it."""
    runtime = ProcessRuntime(manager_id=manager_id(), pg_bin=str(tmp_path / "no-postgres"))
    assert runtime.pg_bin is None
    try:
        state = runtime.ensure(spec("p-lite"))
        assert state.services_ready and state.db.detail == "SQLite"
        assert runtime.database_kind("p-lite") == "sqlite" and "SQLite" in runtime.database_label("p-lite")
        ctx = tmp_path / "project"
        for rel, content in otree_projects.valid_project("lite").items():
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            (ctx / rel).write_text(content)
        build.check_project(ctx)
        image = runtime.build_release("p-lite", 1, ctx, out=lambda text: None, timeout=900)
        app = AppSpec(image=image, port=otree_project.APP_PORT, release_id="1",
                      env={"OTREE_PRODUCTION": "1", "OTREE_ADMIN_PASSWORD": "admin-pw-123", "OTREE_REST_KEY": "rk"})
        url = runtime.deploy_app(spec("p-lite", app=app), timeout=120)
        runtime.retire_app("p-lite")
        assert http_get(url + "/", timeout=5)[0] in (200, 302)
        database = runtime.tenant_dir("p-lite") / "data" / "db.sqlite3"
        wait_until(database.exists, 30, message="oTree created its database in the instance's data folder")
        request = urllib.request.Request(f"{url}/api/sessions", method="POST", data=json.dumps(
            {"session_config_name": "hello_game", "num_participants": 2}).encode(),
            headers={"otree-rest-key": "rk", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as made:  # a session: rows in the database
            assert made.status in (200, 201)
        release = runtime._release_dir(image)
        assert os.stat(release).st_uid == 0 and not os.stat(release).st_mode & 0o027
        backup = tmp_path / "backup.sqlite3"
        assert runtime.backup_database("p-lite", spec("p-lite"), backup) > 0
        assert runtime.backup_suffix("p-lite") == ".sqlite3"
        with sqlite3.connect(backup) as copy:
            assert copy.execute("SELECT count(*) FROM otree_session").fetchone()[0] == 1
        runtime.reset_database("p-lite", spec("p-lite"))
        assert not database.exists()
        runtime.restart_app("p-lite")
        wait_until(lambda: http_get(url + "/", timeout=2)[0] in (200, 302), 30,
                   message="the app answers after the reset")
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as fresh:
            assert fresh.execute("SELECT count(*) FROM otree_session").fetchone()[0] == 0
    finally:
        runtime.remove("p-lite")


def test_an_instance_of_the_previous_version_is_migrated_with_its_data(rt):
    """Made by the previous code (tests/legacy_process: a tenant-owned folder, its
    supervisor running as the tenant, a system user): the next ensure stops all of it,
    moves the data to the new layout and a user from the range, and the app runs again
    with the same database rows."""
    need_users(rt)
    import psycopg

    from tests.legacy_process.process import ProcessRuntime as PreviousRuntime

    name = f"p-leg-{manager_id()[-6:]}"
    old = PreviousRuntime(manager_id=rt.manager_id)
    old.ensure(spec(name))
    venv = rt.venvs_root / "testhttp"
    if not (venv / ".complete").exists():
        subprocess.run([rt.python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        (venv / ".complete").write_text("test\n")
    release = old.dir(name) / "releases" / "r1"
    release.mkdir(parents=True)
    (release / ".lab-venv").write_text("testhttp\n")
    old._chown(release, old._ids(name), recursive=True)
    app = AppSpec(image=f"{name}/r1", command=["python", "-m", "http.server", "8000"], port=8000, release_id="t")
    state = old.ensure(spec(name, app=app))
    wait_until(lambda: http_get(state.app_url + "/", timeout=2)[0] == 200, 30, message="the old app answers")
    password = spec(name).db_password
    with psycopg.connect(host=str(old.dir(name) / "run"), user="otree", dbname="otree", password=password,
                         autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('precious')")
    old_user = pwd.getpwnam(old.user_name(name))
    old_supervisor = old._state(name)["supervisor"]
    assert psutil.Process(old_supervisor).username() == old_user.pw_name
    old_processes = {pid: proc_start_ticks(pid) for pid in processes_of(old_user.pw_uid)}
    assert old_supervisor in old_processes and len(old_processes) > 3  # supervisor, PostgreSQL, Redis, app
    assert name in rt.owned_instances()

    migrated = rt.ensure(spec(name, app=app))
    assert migrated.services_ready
    wait_until(lambda: http_get(migrated.app_url + "/", timeout=2)[0] == 200, 30, message="the migrated app answers")
    # (Other test runs on this host may be given the freed uid at once: the old processes are checked by start.)
    assert not [pid for pid, ticks in old_processes.items() if alive(pid) and proc_start_ticks(pid) == ticks]
    with pytest.raises(KeyError):
        pwd.getpwnam(old_user.pw_name)
    entry = pwd.getpwnam(rt.user_name(name))
    assert rt.app_uids[0] <= entry.pw_uid <= rt.app_uids[1]
    root = rt.dir(name)
    assert os.stat(root).st_uid == 0 and os.stat(root / "instance.json").st_uid == 0
    assert os.stat(root / "releases" / "r1").st_uid == 0
    pg = rt.tenant_dir(name) / "pg"
    assert {os.lstat(p).st_uid for p in [pg, *pg.rglob("*")]} == {entry.pw_uid}
    with psycopg.connect(host=str(rt.tenant_dir(name) / "run"), user="otree", dbname="otree",
                         password=password) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("precious",)]
    assert psutil.Process(rt._state(name)["supervisor"]).username() == "root"
    assert not (rt.instances_root / f".migrating-{name}").exists()


# --- refusals and what the page says ------------------------------------------------------------------------

def test_bad_input_gets_clear_errors(rt):
    with pytest.raises(RuntimeError_, match="not DNS-safe"):
        rt.ensure(spec("Bad_Name"))
    with pytest.raises(RuntimeError_, match="not a release of the process runtime"):
        rt._release_dir("otree-lab-x:r1")
    assert rt.release_exists("p-none/r9") is False
    assert rt.release_exists("../../etc/r1") is False
    assert rt.logs("p-none", "app") == ""


def test_a_python_in_a_private_folder_is_not_given_to_the_instances(tmp_path, monkeypatch):
    """As root, the instances' users build environments with a Python they can reach: a
    manager on pyenv under /root gets the system's, and a configured one they cannot
    reach is refused with what to do (found trying `make run` from a clone whose python3
    was pyenv's)."""
    from instances.runtime import process

    need(os.geteuid() == 0, "root (per-instance users)")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    python = private / "python3"
    python.write_text("#!/bin/sh\nexec /usr/bin/python3 \"$@\"\n")
    python.chmod(0o755)
    monkeypatch.setattr(process.sys, "_base_executable", str(python), raising=False)
    assert process.default_python(own_users=True) == "/usr/bin/python3"
    assert process.default_python(own_users=False) == str(python)  # one user for all: any Python will do
    runtime = ProcessRuntime(manager_id=manager_id(), python=str(python))
    with pytest.raises(RuntimeError_, match="cannot run the Python .*set LAB_PROCESS_PYTHON"):
        runtime.ensure(spec("p-private"))
    assert "p-private" not in runtime.owned_instances()


def test_the_supervisor_is_the_managers_and_the_instances_run_as_their_user(rt):
    started(rt, "p-tools")
    need_users(rt)
    argv = {role: p["argv"] for role, p in rt._spec("p-tools")["processes"].items()}
    tools = str(rt.instances_root / ".tools")
    assert argv["redis"][0] == f"{tools}/redis-server"  # a copy the instance's user can reach
    supervisor = psutil.Process(rt._state("p-tools")["supervisor"])
    assert supervisor.username() == "root"
    children = supervisor.children()
    assert children and {child.username() for child in children} == {rt.user_name("p-tools")}
    for child in children:  # no supplementary groups, and the kernel would end it with the supervisor
        status = Path(f"/proc/{child.pid}/status").read_text()
        assert [line.split()[1:] for line in status.splitlines() if line.startswith("Groups:")] == [[]]


def test_the_page_says_what_holds(rt, settings):
    """As root with users: files, processes and builds hold; the instance page's lines
    name the mechanism. With isolation none: it says nothing separates the instance."""
    started(rt, "p-page", app=False)
    need_users(rt)
    lines = {p.what: p for p in rt.protections("p-page")}
    assert set(lines) == {"Files", "Host and other instances", "Outside network", "Memory", "CPU", "Processes",
                          "Builds"}
    assert lines["Files"].holds and rt.user_name("p-page") in lines["Files"].detail
    assert lines["Builds"].holds and lines["Memory"].holds
    settings.LAB_PROCESS_ISOLATION = "none"
    loose = ProcessRuntime(manager_id=manager_id())
    assert not loose.own_users and "nothing separates" in loose.isolation
    files = {p.what: p for p in loose.protections("p-page")}["Files"]
    assert not files.holds and "manager's own user" in files.detail


def test_process_isolation_needs_root_or_an_explicit_none():
    """The decision from the facts: without root, users isolation cannot hold; with root,
    none would run tenants as root."""
    assert process_refusal(is_root=True, isolation="users") is None
    assert process_refusal(is_root=False, isolation="none") is None
    refusal = process_refusal(is_root=False, isolation="users")
    assert "run the manager as root" in refusal and "LAB_PROCESS_ISOLATION=none" in refusal
    assert "Install Docker" in refusal
    assert process_refusal(is_root=False, isolation="users", docker_missing=True).startswith("No Docker engine answers")
    assert "as root" in process_refusal(is_root=True, isolation="none")


UNPRIVILEGED = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
os.environ["DJANGO_SETTINGS_MODULE"] = "manager.settings"
import django
django.setup()
from pathlib import Path
from instances.runtime import process_refusal
from instances.runtime.base import InstanceSpec
from instances.runtime.process import ProcessRuntime
facts = {"euid": os.geteuid(), "refusal": process_refusal()}
rt = ProcessRuntime(manager_id="unpriv")
if not facts["refusal"]:
    spec = InstanceSpec(name="laptop", db_name="otree", db_user="otree", db_password="pw-laptop-1", memory_mb=384, cpus=1)
    try:
        facts["ready"] = rt.ensure(spec).services_ready
        facts["backup"] = rt.backup_database("laptop", spec, Path(os.environ["LAB_DATA_DIR"]) / "b.dump")
        facts["supervisor_uid"] = os.stat(f"/proc/{rt._state('laptop')['supervisor']}").st_uid
        facts["protections"] = {p.what: [p.holds, p.detail] for p in rt.protections("laptop")}
        facts["isolation"] = rt.isolation
    finally:
        rt.remove("laptop")
    facts["left"] = sorted(rt.owned_instances())
else:
    try:
        rt.ensure(InstanceSpec(name="laptop", db_name="otree", db_user="otree", db_password="pw", memory_mb=384, cpus=1))
    except Exception as exc:
        facts["ensure"] = str(exc)
print("@@" + json.dumps(facts))
'''


def run_unprivileged(data_dir: Path, **env) -> dict:
    """UNPRIVILEGED as `nobody` (a real non-root uid; the one capability to read files lets
    it import the manager wherever the checkout lies)."""
    from django.conf import settings

    base = Path(settings.BASE_DIR)
    result = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=+dac_read_search",
         "--ambient-caps=+dac_read_search", "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", f"HOME={data_dir}",
         f"LAB_DATA_DIR={data_dir}", *[f"{k}={v}" for k, v in env.items()], sys.executable, "-c", UNPRIVILEGED,
         str(base)], capture_output=True, text=True, timeout=300, cwd=data_dir)
    lines = [line for line in result.stdout.splitlines() if line.startswith("@@")]
    assert lines, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(lines[-1][2:])


def test_an_unprivileged_manager_refuses_users_isolation_and_runs_with_none(tmp_path):
    """The manager as `nobody`: with the default LAB_PROCESS_ISOLATION=users the process
    runtime refuses (and says what to do); with =none (a single-user laptop) instances run,
    back up and go as the manager's own user, and the page says nothing isolates them."""
    backends.require("process")
    need(os.geteuid() == 0 and shutil.which("setpriv"), "root and setpriv (to become nobody)")
    for mode in ("users", "none"):
        data_dir = Path(tempfile.mkdtemp(prefix=f"otl-nobody-{mode}-"))
        os.chmod(data_dir, 0o755)
        os.chown(data_dir, pwd.getpwnam("nobody").pw_uid, -1)
        try:
            facts = run_unprivileged(data_dir, LAB_PROCESS_ISOLATION=mode)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
        assert facts["euid"] == pwd.getpwnam("nobody").pw_uid
        if mode == "users":
            assert "run the manager as root" in facts["refusal"] and "LAB_PROCESS_ISOLATION=none" in facts["refusal"]
            assert "run the manager as root" in facts["ensure"]
            continue
        assert facts["refusal"] is None and facts["ready"] and facts["backup"] > 0
        assert facts["supervisor_uid"] == facts["euid"] and facts["left"] == []
        assert "nothing separates" in facts["isolation"]
        files = facts["protections"]["Files"]
        assert files[0] is False and "manager's own user" in files[1]


@pytest.mark.django_db
def test_without_root_creating_a_process_instance_is_refused_with_what_to_do(settings, monkeypatch, boss, ann):
    """What a lab manager sees (the form and the API) when the manager is not root and
    the lab did not choose LAB_PROCESS_ISOLATION=none: the refusal and what to do; with
    auto and no Docker engine the same, never an instance without isolation."""
    from django.test import Client

    from instances.models import Instance
    from manager.accounts.services import create_token

    token = create_token(boss, name="t")[1]
    settings.LAB_IS_ROOT = False
    settings.LAB_PROCESS_ISOLATION = "users"
    for runtime, lead in (("process", "The process runtime"), ("auto", "No Docker engine answers")):
        settings.LAB_RUNTIME = runtime
        monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")  # no engine answers
        client = Client()
        answer = client.post("/api/v1/instances", data=json.dumps({"name": "refused", "owner": "ann"}),
                             content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}")
        assert answer.status_code == 422, answer.content
        detail = answer.json()["detail"]
        assert detail.startswith(lead) and "run the manager as root" in detail
        assert "LAB_PROCESS_ISOLATION=none" in detail and "Install Docker" in detail
        client.force_login(boss)
        page = client.post("/instances/new/", {"name": "refused", "owner": boss.pk})
        assert page.status_code == 200 and "run the manager as root" in page.content.decode()
        assert not Instance.objects.filter(name="refused").exists()
    settings.LAB_PROCESS_ISOLATION = "none"  # the lab's explicit choice on a single-user machine
    settings.LAB_RUNTIME = "process"
    answer = Client().post("/api/v1/instances", data=json.dumps({"name": "allowed", "owner": "ann"}),
                           content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert answer.status_code == 201 and Instance.objects.get(name="allowed").runtime == "process"
