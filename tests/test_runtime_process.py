"""What only the process runtime has: its supervisor (restarts, survives the manager,
re-adopted, takes its processes with it), SQLite when PostgreSQL's programs are missing,
memory caps, per-instance users and removal without leftovers. (Everything the two
backends share is tested on both in test_reconciler.py and test_releases.py.)"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from instances import build
from instances.runtime.base import AppSpec, Health, InstanceSpec, RuntimeError_
from instances.runtime.process import ProcessRuntime
from tests import backends, otree_projects
from tests.conftest import need
from tests.docker_helpers import http_get

pytestmark = pytest.mark.slow


@pytest.fixture
def rt(settings, tmp_path):
    backends.require("process")
    runtime = ProcessRuntime(manager_id="tproc")
    yield runtime
    for name in runtime.owned_instances():
        runtime.remove(name)


def spec(name, app=None, **kw) -> InstanceSpec:
    return InstanceSpec(name=name, db_name="otree", db_user="otree", db_password="pw-" + name * 2, memory_mb=kw.pop(
        "memory_mb", 384), cpus=1, app=app, **kw)


def http_app(runtime, name) -> AppSpec:
    app = backends.fake_app(runtime, name)
    return AppSpec(image=app["image"], command=app["command"], port=app["port"], release_id="t")


def wait_until(predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} (not within {timeout} s)"
        time.sleep(0.1)


def alive(pid) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def started(runtime, name, app=True):
    runtime.ensure(spec(name))  # the folder first: the fake app's release lives in it
    state = runtime.ensure(spec(name, app=http_app(runtime, name) if app else None))
    if app:
        wait_until(lambda: http_get(state.app_url + "/", timeout=2)[0] == 200, "the app answers")
    return state


def test_a_process_that_dies_is_restarted_by_the_supervisor(rt):
    state = started(rt, "p-restart")
    old = rt._state("p-restart")["processes"]["app"]["pid"]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: (rt._state("p-restart")["processes"]["app"].get("pid") not in (None, old)
                        and http_get(state.app_url + "/", timeout=2)[0] == 200), "a new app process answers")
    after = rt.state("p-restart")
    assert after.app.health == Health.RUNNING and "restarted 1x" in after.app.detail
    assert after.app_url == state.app_url  # the same port: the proxy's route still fits
    assert backends.stray_processes(rt, "p-restart") == []


def test_the_supervisor_outlives_the_manager_and_is_re_adopted(rt):
    """A new manager (a new runtime object, e.g. after a restart) finds the running
    supervisor by its lock: no second supervisor, no second set of processes."""
    started(rt, "p-adopt")
    before = sorted(rt.processes("p-adopt"))
    again = ProcessRuntime(manager_id="tproc")
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
    wait_until(lambda: not any(alive(pid) for pid in pids + children), "every process of the instance ends")
    assert rt.state("p-sup").app.health != Health.RUNNING
    restored = rt.ensure(spec("p-sup", app=http_app(rt, "p-sup")))
    assert restored.services_ready and restored.app_url == state.app_url
    wait_until(lambda: http_get(restored.app_url + "/", timeout=2)[0] == 200, "the app answers again")
    assert backends.stray_processes(rt, "p-sup") == []


@pytest.mark.django_db
def test_memory_is_capped_and_each_instance_has_its_own_user(rt):
    started(rt, "p-iso-a")
    started(rt, "p-iso-b", app=False)
    app_pid = rt._state("p-iso-a")["processes"]["app"]["pid"]
    limits = Path(f"/proc/{app_pid}/limits").read_text()
    cap = [line for line in limits.splitlines() if line.startswith("Max address space")][0].split()
    assert int(cap[3]) == 384 * 2**20  # the instance's memory limit, in bytes
    root_a, root_b = rt.dir("p-iso-a"), rt.dir("p-iso-b")
    assert (os.stat(root_a).st_mode & 0o777) == 0o700
    need(rt.own_users, "root (per-instance users)")
    user_a = rt.user_name("p-iso-a")
    assert psutil.Process(app_pid).username() == user_a
    assert os.stat(root_a).st_uid != os.stat(root_b).st_uid
    # A's code cannot read B's files, the manager's secrets or database, or change an environment.
    from django.db import connection

    venv = rt.venvs_root / "testhttp"
    (rt.data_root / "logs").mkdir(exist_ok=True)  # (whatever the manager keeps there)
    rt._prepare_root()
    for target in (root_b / "instance.json", rt.data_root / "secrets" / "encryption.key", rt.data_root / "secrets",
                   Path(connection.settings_dict["NAME"]), rt.data_root / "logs"):
        assert target.exists(), target
        denied = subprocess.run(["runuser", "-u", user_a, "--", "cat" if target.is_file() else "ls", str(target)],
                                capture_output=True, timeout=30)
        assert denied.returncode != 0, target
    write = subprocess.run(["runuser", "-u", user_a, "--", "touch", str(venv / "bin" / "evil")], capture_output=True,
                           timeout=30)
    assert write.returncode != 0 and not (venv / "bin" / "evil").exists()


def test_remove_leaves_no_process_folder_or_user(rt):
    started(rt, "p-gone")
    pids = rt.processes("p-gone")
    user = rt.user_name("p-gone")
    rt.remove("p-gone")
    assert not any(alive(pid) for pid in pids)
    assert not rt.dir("p-gone").exists() and "p-gone" not in rt.owned_instances()
    if rt.own_users:
        assert subprocess.run(["id", user], capture_output=True).returncode != 0
    rt.remove("p-gone")  # idempotent


def test_sqlite_when_postgresql_programs_are_missing(settings, tmp_path):
    """No initdb/postgres: the instance gets an SQLite file, a real oTree app uses it across
    releases, backups copy it consistently, reset empties it."""
    runtime = ProcessRuntime(manager_id="tproc", pg_bin=str(tmp_path / "no-postgres"))
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
        app = AppSpec(image=image, command=list(build.COMMAND), port=build.RELEASE_IMAGE_PORT, release_id="1",
                      env={"OTREE_PRODUCTION": "1", "OTREE_ADMIN_PASSWORD": "admin-pw-123", "OTREE_REST_KEY": "rk"})
        url = runtime.deploy_app(spec("p-lite", app=app), timeout=120)
        runtime.retire_app("p-lite")
        assert http_get(url + "/", timeout=5)[0] in (200, 302)
        database = runtime.dir("p-lite") / "data" / "db.sqlite3"
        wait_until(database.exists, "oTree created its database in the instance's data folder")
        request = urllib.request.Request(f"{url}/api/sessions", method="POST", data=json.dumps(
            {"session_config_name": "hello_game", "num_participants": 2}).encode(),
            headers={"otree-rest-key": "rk", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as made:  # a session: rows in the database
            assert made.status in (200, 201)
        backup = tmp_path / "backup.sqlite3"
        assert runtime.backup_database("p-lite", spec("p-lite"), backup) > 0
        assert runtime.backup_suffix("p-lite") == ".sqlite3"
        with sqlite3.connect(backup) as copy:
            assert copy.execute("SELECT count(*) FROM otree_session").fetchone()[0] == 1
        runtime.reset_database("p-lite", spec("p-lite"))
        assert not database.exists()
        runtime.restart_app("p-lite")
        wait_until(lambda: http_get(url + "/", timeout=2)[0] in (200, 302), "the app answers after the reset")
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as fresh:
            assert fresh.execute("SELECT count(*) FROM otree_session").fetchone()[0] == 0
    finally:
        runtime.remove("p-lite")


def test_bad_input_gets_clear_errors(rt):
    with pytest.raises(RuntimeError_, match="not DNS-safe"):
        rt.ensure(spec("Bad_Name"))
    with pytest.raises(RuntimeError_, match="not a release of the process runtime"):
        rt._release_dir("otree-lab-x:r1")
    assert rt.image_exists("p-none/r9") is False
    assert rt.logs("p-none", "app") == ""


def test_a_python_in_a_private_folder_is_not_given_to_the_instances(tmp_path, monkeypatch):
    """As root, the instances' users run the supervisor and build environments with a
    Python they can reach: a manager on pyenv under /root gets the system's, and a
    configured one they cannot reach is refused with what to do (found trying `make run`
    from a clone whose python3 was pyenv's)."""
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
    runtime = ProcessRuntime(manager_id="tproc", python=str(python))
    with pytest.raises(RuntimeError_, match="cannot run the Python .*set LAB_PROCESS_PYTHON"):
        runtime.ensure(spec("p-private"))
    assert "p-private" not in runtime.owned_instances()


def test_instances_run_the_managers_programs_from_copies_they_can_reach(rt):
    started(rt, "p-tools", app=False)
    need(rt.own_users, "root (per-instance users)")
    argv = {role: p["argv"] for role, p in rt._spec("p-tools")["processes"].items()}
    tools = str(rt.instances_root / ".tools")
    assert argv["redis"][0] == f"{tools}/redis-server"
    supervisor = psutil.Process(rt._state("p-tools")["supervisor"])
    assert f"{tools}/procsup.py" in supervisor.cmdline() and supervisor.username() == rt.user_name("p-tools")
