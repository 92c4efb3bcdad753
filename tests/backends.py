"""Backend-neutral helpers, so one behavioural test runs on every runtime (docker, process
and swarm) and a behaviour cannot drift between them."""

from __future__ import annotations

import os
import signal
import subprocess

from django.conf import settings

from instances.runtime import backend_class
from tests.conftest import need
from tests.docker_helpers import engine_ok, images_present

BACKENDS = ["docker", "process", "swarm"]


def require(name: str) -> None:
    """Skip (fail under CI) when backend `name` cannot run here."""
    if name in ("docker", "swarm"):
        need(engine_ok() and images_present(settings.LAB_IMAGE_POSTGRES, settings.LAB_IMAGE_REDIS,
                                            settings.LAB_IMAGE_PYTHON),
             "a Docker engine with the images (python manage.py build_images)")
        if name == "swarm":
            from tests.swarm_helpers import ensure_swarm

            need(ensure_swarm(), "a Docker engine in swarm mode (docker swarm init)")
            place_on_this_node()
    else:
        runtime = backend_class("process")()
        need(runtime.available() and runtime.pg_bin is not None,
             "PostgreSQL's server programs (apt install postgresql) for the process runtime")


def make(name: str, **kwargs):
    return backend_class(name)(**kwargs)


SWARM_CHOOSE_NODE = None  # the swarm runtime's own placement (the placement tests use it)


def place_on_this_node() -> None:
    """The behavioural tests place swarm instances on this machine's node (the one they
    exec into), whatever other node a placement test has joined meanwhile; the placement
    over several nodes has its own tests (SWARM_CHOOSE_NODE)."""
    global SWARM_CHOOSE_NODE
    cls = backend_class("swarm")
    if SWARM_CHOOSE_NODE is None:
        SWARM_CHOOSE_NODE = cls._choose_node
        cls._choose_node = lambda self, memory_mb: self.local_node


def _task(runtime, instance_name: str, component: str) -> dict:
    service = runtime._service(instance_name, component)
    assert service is not None, f"no {component} service of {instance_name}"
    task, _ = runtime._current_task(service["ID"])
    return task or {}


def sql(runtime, instance_name: str, statement: str) -> tuple[int, str]:
    """Run SQL in the instance's own database as the app's user: (0, output) or
    (non-zero, the error)."""
    from instances.models import Instance

    if runtime.name in ("docker", "swarm"):
        container = runtime.api.inspect_container(
            runtime._task_container(_task(runtime, instance_name, "db")) if runtime.name == "swarm"
            else runtime.container_name(instance_name, "db"))
        exec_id = runtime.api.exec_create(container["Id"], ["psql", "-U", "otree", "-d", "otree", "-tAc", statement],
                                          user="postgres")
        out = runtime.api.exec_start(exec_id).decode()
        return runtime.api.exec_inspect(exec_id)["ExitCode"], out.strip()
    import psycopg

    instance = Instance.objects.get(name=instance_name)
    try:
        with psycopg.connect(host=str(runtime.tenant_dir(instance_name) / "run"), user=instance.db_user,
                             password=instance.db_password, dbname=instance.db_name, autocommit=True) as conn:
            cur = conn.execute(statement)
            rows = cur.fetchall() if cur.description else []
        return 0, "\n".join("|".join(str(v) for v in row) for row in rows)
    except psycopg.Error as exc:
        return 1, str(exc)


def app_env(runtime, name: str) -> dict:
    """The environment the instance's app runs with."""
    if runtime.name == "docker":
        info = runtime.api.inspect_container(runtime.container_name(name, "app"))
        return dict(item.split("=", 1) for item in info["Config"]["Env"])
    if runtime.name == "swarm":
        service = runtime._service(name, "app")
        return dict(item.split("=", 1) for item in service["Spec"]["TaskTemplate"]["ContainerSpec"].get("Env") or [])
    return dict(runtime._spec(name)["processes"]["app"]["env"])


def app_identity(runtime, name: str) -> str:
    """Changes whenever the app is restarted or replaced."""
    if runtime.name == "docker":  # a restarted container keeps its id: its start time tells
        info = runtime.api.inspect_container(runtime.container_name(name, "app"))
        return f"{info['Id']}:{info['State']['StartedAt']}"
    if runtime.name == "swarm":  # a restart or a crash makes a new task
        return _task(runtime, name, "app").get("ID", "")
    info = runtime._state(name)["processes"]["app"]
    return f"{info['pid']}:{info['start_ticks']}"


def break_service(runtime, name: str, component: str) -> None:
    """What an admin or a crash might do by hand: the component is gone."""
    if runtime.name == "docker":
        runtime.api.remove_container(runtime.container_name(name, component), force=True, v=True)
        return
    if runtime.name == "swarm":
        runtime.api.remove_service(runtime._service(name, component)["ID"])
        return
    supervisor = runtime._state(name)["supervisor"]
    os.kill(supervisor, signal.SIGKILL)  # and its children die with it


def kill_app(runtime, name: str) -> None:
    """The instance's oTree process dies (SIGKILL), as in a crash."""
    if runtime.name == "docker":
        pid = runtime.api.inspect_container(runtime.container_name(name, "app"))["State"]["Pid"]
    elif runtime.name == "swarm":
        pid = runtime.api.inspect_container(runtime._task_container(_task(runtime, name, "app")))["State"]["Pid"]
    else:
        pid = runtime._state(name)["processes"]["app"]["pid"]
    os.kill(pid, signal.SIGKILL)


def fake_app(runtime, name: str) -> dict:
    """A tiny HTTP app standing in for a release (`reconciler.current_app`'s answer)."""
    if runtime.name in ("docker", "swarm"):
        return {"image": settings.LAB_IMAGE_PYTHON, "port": 8000, "release": "test",
                "command": ["python", "-m", "http.server", "8000"]}
    release = runtime.dir(name) / "releases" / "r1"
    if not release.exists():
        venv = runtime.venvs_root / "testhttp"
        if not (venv / ".complete").exists():  # made by the manager (root): read-only to the instances
            runtime.venvs_root.mkdir(parents=True, exist_ok=True)
            subprocess.run([runtime.python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
            (venv / ".complete").write_text("test\n")
        # A release folder as build_release leaves it: the manager's, readable by the instance's group.
        runtime._create(name)  # (its folders and user, when this comes first)
        tmp = release.with_name(".r1.test")
        tmp.mkdir()
        group = runtime._ids(name)[1] if runtime.own_users else os.getegid()
        runtime._finish_release(name, tmp, "testhttp", group)
        os.rename(tmp, release)
    return {"image": f"{name}/r1", "port": 8000, "release": "test", "command": ["python", "-m", "http.server", "8000"]}


def stray_processes(runtime, name: str) -> list[str]:
    """Processes of the instance (process runtime) that its supervisor does not account
    for: every process whose command line or working directory lies in the instance's
    folder, minus the supervisor and its descendants."""
    import psutil

    root = str(runtime.dir(name))
    state = runtime._state(name)
    accounted = set()
    supervisor = state.get("supervisor")
    if supervisor and runtime.supervisor_alive(name):
        try:
            top = psutil.Process(supervisor)
            accounted = {top.pid} | {child.pid for child in top.children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    strays = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if root not in cmd and not (proc.info["cwd"] or "").startswith(root):
                continue
            if proc.pid in accounted or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            strays.append(f"{proc.pid} {cmd[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return strays


def container_of(runtime, name: str, component: str) -> str:
    """The container (name or id) of an instance's component on this machine (docker, swarm)."""
    if runtime.name == "swarm":
        return runtime._task_container(_task(runtime, name, component))
    return runtime.container_name(name, component)


def swarm_components(runtime, name: str) -> list[str]:
    """The components of a swarm instance's services (app, app-next, app-old, db, redis), sorted."""
    return sorted(svc["Spec"]["Labels"]["org.otree-lab.component"] for svc in runtime._services(name))


def running_release(runtime, name: str) -> str:
    """The release (image or release folder) the instance's app runs now."""
    if runtime.name == "docker":
        return runtime.api.inspect_container(runtime.container_name(name, "app"))["Config"]["Image"]
    if runtime.name == "swarm":
        return runtime._service(name, "app")["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    return runtime._spec(name)["processes"]["app"]["image"]


def app_user(runtime, name: str) -> str:
    """The user the app runs as, as its container (service) says (docker, swarm)."""
    if runtime.name == "swarm":
        return runtime._service(name, "app")["Spec"]["TaskTemplate"]["ContainerSpec"].get("User", "")
    return runtime.api.inspect_container(runtime.container_name(name, "app"))["Config"]["User"]


__all__ = ["BACKENDS", "app_user", "container_of", "running_release", "swarm_components", "app_env", "app_identity", "break_service", "fake_app", "kill_app", "make", "require", "sql",
           "stray_processes"]
