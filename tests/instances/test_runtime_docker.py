"""The Docker runtime against the real engine (no mocks): isolation, limits, labels,
crash-safety, backups.

Each run makes up its own manager id, so it only ever sees, changes and removes its own
resources; whatever a test leaves behind is removed by label at the end of the module.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings

from instances import otree_project
from instances.runtime import get_runtime
from instances.runtime.base import AppSpec, Health, InstanceSpec, RuntimeError_
from instances.runtime.docker import (
    LABEL_COMPONENT,
    LABEL_CONFIG,
    LABEL_INSTANCE,
    LABEL_MANAGER,
    LABEL_NETWORK,
    APP_USER,
    DockerRuntime,
    dockerfile,
)
from tests import docker_helpers as dh
from tests.conftest import need
from tests.netns_helpers import netns_available, outside_host
from tests.waits import wait_until

pytestmark = pytest.mark.docker

BASE_DIR = Path(__file__).resolve().parents[2]
PG, REDIS, PY = settings.LAB_IMAGE_POSTGRES, settings.LAB_IMAGE_REDIS, settings.LAB_IMAGE_PYTHON
PASSWORD = "pa'ss wo\"rd$1@:/"  # quoting everywhere: SQL, URL, environment

PROBE = textwrap.dedent("""
    import socket, sys
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((sys.argv[1], int(sys.argv[2])))
        print("OPEN")
    except Exception as exc:
        print("CLOSED", type(exc).__name__, exc)
""")


@pytest.fixture(scope="module")
def mid():
    need(dh.engine_ok(), "a Docker engine")
    need(dh.images_present(PG, REDIS, PY), f"the images {PG}, {REDIS}, {PY} (python manage.py build_images)")
    manager_id = dh.new_manager_id()
    try:
        yield manager_id
    finally:
        dh.purge(manager_id)
        assert not any(dh.labelled(manager_id).values())


@pytest.fixture
def rt(mid) -> DockerRuntime:
    return DockerRuntime(manager_id=mid, images={"db": PG, "redis": REDIS}, ready_timeout=60)


@pytest.fixture(scope="module")
def api():
    return dh.api()


def make_spec(name: str, app: AppSpec | None = None, **kw) -> InstanceSpec:
    kw.setdefault("memory_mb", 128)
    kw.setdefault("cpus", 0.5)
    return InstanceSpec(name=name, db_name="otree", db_user="otree", db_password=PASSWORD, app=app, **kw)


def http_app(release: str = "r1", **env) -> AppSpec:
    return AppSpec(image=PY, command=["python", "-m", "http.server", "8000"], port=8000, env=env, release_id=release)


def names(found: dict) -> dict:
    return {
        "containers": sorted(c["Names"][0].lstrip("/") for c in found["containers"]),
        "networks": sorted(n["Name"] for n in found["networks"]),
        "volumes": sorted(v["Name"] for v in found["volumes"]),
    }


def expected_names(rt: DockerRuntime, name: str, app: bool) -> dict:
    return {
        "containers": sorted(rt.container_name(name, c) for c in (("app", "db", "redis") if app else ("db", "redis"))),
        "networks": sorted([rt.network_name(name, "edge"), rt.network_name(name, "internal")]),
        "volumes": [rt.volume_name(name)],
    }


def wait_http(url: str, timeout: float = 20) -> bytes:
    def answer():
        status, body = dh.http_get(url)
        return body if status == 200 else None

    return wait_until(answer, timeout, 0.2, f"HTTP 200 from {url}")


def probe(api, container: str, host: str, port: int) -> str:
    code, out = dh.exec_in(api, container, ["python", "-c", PROBE, host, str(port)])
    assert code == 0, out
    return out.strip()


REDIS_TALK = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection(("redis", 6379), timeout=5)
    answers = []
    for command in sys.argv[1:]:
        s.sendall(command.encode() + b"\\r\\n")
        answers.append(s.makefile("rb").readline().decode().strip())
    print(" ".join(answers))
""")


def redis_says(api, container: str, *commands: str) -> str:
    """The first line of Redis's answer to each inline command, sent from `container`."""
    code, out = dh.exec_in(api, container, ["python", "-c", REDIS_TALK, *commands])
    assert code == 0, out
    return out.strip()


def psql(api, rt, name: str, sql: str, *, host: str | None = None, password: str | None = None) -> tuple[int, str]:
    cmd = ["psql", "-v", "ON_ERROR_STOP=1", "-qAt", "-U", "otree", "-d", "otree", "-c", sql]
    if host:
        cmd[1:1] = ["-h", host]
    env = {"PGPASSWORD": password} if password is not None else None
    return dh.exec_in(api, rt.container_name(name, "db"), cmd, env=env, user="postgres")


# --- creation, limits, labels ------------------------------------------------------------


def test_ensure_creates_isolated_limited_labelled_resources(rt, mid, api):
    name = "make"
    state = rt.ensure(make_spec(name, app=http_app(), memory_mb=96, cpus=0.5))
    assert state.services_ready
    assert state.db.health == state.redis.health == state.app.health == Health.RUNNING
    assert state.app_url.startswith("http://127.0.0.1:")
    assert b"Directory listing" in wait_http(state.app_url + "/")

    found = dh.labelled(mid, name)
    assert names(found) == expected_names(rt, name, app=True)
    nets = {n["Name"]: api.inspect_network(n["Id"]) for n in found["networks"]}
    internal, edge = nets[rt.network_name(name, "internal")], nets[rt.network_name(name, "edge")]
    assert internal["Internal"] is True and internal["Labels"][LABEL_NETWORK] == "internal"
    assert edge["Internal"] is False and edge["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    for net in (internal, edge):
        assert net["Labels"][LABEL_MANAGER] == mid and net["Labels"][LABEL_INSTANCE] == name
        assert net["Labels"][LABEL_COMPONENT] == "network"
    (volume,) = found["volumes"]
    assert volume["Labels"] == {LABEL_MANAGER: mid, LABEL_INSTANCE: name, LABEL_COMPONENT: "volume"}

    limits = {"app": (96, 0.5, 512), "db": (256, 1.0, 100), "redis": (64, 0.5, 32)}
    for component, (memory_mb, cpus, pids) in limits.items():
        info = api.inspect_container(rt.container_name(name, component))
        labels, host = info["Config"]["Labels"], info["HostConfig"]
        assert labels[LABEL_MANAGER] == mid and labels[LABEL_INSTANCE] == name
        assert labels[LABEL_COMPONENT] == component and labels[LABEL_CONFIG]
        assert host["Memory"] == memory_mb * 2**20 and host["MemorySwap"] == memory_mb * 2**20
        assert host["NanoCpus"] == int(cpus * 1e9)
        assert host["PidsLimit"] == pids
        assert host["RestartPolicy"]["Name"] == "unless-stopped"
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
        assert host["Privileged"] is False
        assert not host["Binds"] and all(m["Type"] == "volume" for m in info["Mounts"])
        assert "docker.sock" not in str(info["Mounts"]) + str(host)
        attached = set(info["NetworkSettings"]["Networks"])
        if component == "app":
            assert attached == {rt.network_name(name, "internal"), rt.network_name(name, "edge")}
            bindings = host["PortBindings"]["8000/tcp"]
            assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
            published = info["NetworkSettings"]["Ports"]["8000/tcp"]
            assert {b["HostIp"] for b in published} == {"127.0.0.1"}
        else:
            assert attached == {rt.network_name(name, "internal")}
            assert not host["PortBindings"]
            assert not any(info["NetworkSettings"]["Ports"].values())
    db = api.inspect_container(rt.container_name(name, "db"))
    assert db["Config"]["User"] == "postgres"
    assert [m["Name"] for m in db["Mounts"]] == [rt.volume_name(name)]
    assert "shared_buffers=16MB" in db["Config"]["Cmd"]
    redis = api.inspect_container(rt.container_name(name, "redis"))
    assert redis["Config"]["User"] == "redis" and "noeviction" in redis["Config"]["Cmd"]

    # The app finds its services under the names its DATABASE_URL and REDIS_URL use.
    app = rt.container_name(name, "app")
    env = dict(e.split("=", 1) for e in api.inspect_container(app)["Config"]["Env"])
    assert env["DATABASE_URL"].startswith("postgres://otree:") and env["DATABASE_URL"].endswith("@db:5432/otree")
    password = rt.redis_password(make_spec(name))
    assert env["REDIS_URL"] == f"redis://:{password}@redis:6379/0" and len(password) >= 32
    assert probe(api, app, "db", 5432) == "OPEN"
    assert probe(api, app, "redis", 6379) == "OPEN"
    # Redis answers only with the password its REDIS_URL carries.
    assert redis_says(api, app, "PING") == "-NOAUTH Authentication required."
    assert redis_says(api, app, "AUTH wrong-password", "PING").startswith("-WRONGPASS")
    assert redis_says(api, app, f"AUTH {password}", "PING") == "+OK +PONG"
    assert "database system is ready" in rt.logs(name, "db")


def test_ensure_is_idempotent_and_repairs_drift(rt, mid, api):
    name = "drift"
    spec = make_spec(name, app=http_app())
    rt.ensure(spec)

    def ids():
        return {c["Labels"][LABEL_COMPONENT]: c["Id"] for c in dh.labelled(mid, name)["containers"]}

    def network_ids():
        return sorted(n["Id"] for n in dh.labelled(mid, name)["networks"])

    first, nets = ids(), network_ids()
    url = rt.state(name).app_url
    assert rt.ensure(spec).services_ready
    assert ids() == first and network_ids() == nets

    # Stopped by hand: started again, same containers.
    api.stop(rt.container_name(name, "db"), timeout=10)
    api.stop(rt.container_name(name, "app"), timeout=10)
    assert rt.state(name).db.health == Health.EXITED
    state = rt.ensure(spec)
    assert state.services_ready and state.app.health == Health.RUNNING
    assert ids() == first

    # Removed by hand: recreated, exactly one.
    api.remove_container(rt.container_name(name, "redis"), force=True, v=True)
    assert rt.state(name).redis.health == Health.MISSING
    assert rt.ensure(spec).services_ready
    now = ids()
    assert now["db"] == first["db"] and now["app"] == first["app"] and now["redis"] != first["redis"]
    assert names(dh.labelled(mid, name)) == expected_names(rt, name, app=True)

    # A changed app (env, release, limits) replaces the app container only.
    for changed in (make_spec(name, app=http_app(GREETING="hi")),
                    make_spec(name, app=http_app(release="r2", GREETING="hi")),
                    make_spec(name, app=http_app(release="r2", GREETING="hi"), memory_mb=200)):
        before = ids()
        state = rt.ensure(changed)
        after = ids()
        assert after["app"] != before["app"] and after["db"] == before["db"] and after["redis"] == before["redis"]
        assert state.app.health == Health.RUNNING
        assert state.app_url == url  # a replaced app keeps its address
        wait_http(state.app_url + "/")
    info = api.inspect_container(rt.container_name(name, "app"))
    assert "GREETING=hi" in info["Config"]["Env"] and info["HostConfig"]["Memory"] == 200 * 2**20

    # No app in the spec: the app container goes, the rest stays.
    state = rt.ensure(make_spec(name))
    assert state.app.health == Health.MISSING and state.app_url == ""
    assert names(dh.labelled(mid, name)) == expected_names(rt, name, app=False)

    # stop() stops all three and keeps them; ensure() brings them back, app on the same port.
    url = rt.ensure(spec).app_url  # a new app container: a new address
    rt.stop(name)
    state = rt.state(name)
    assert state.db.health == state.redis.health == state.app.health == Health.EXITED
    assert state.app_url == url
    kept = ids()
    state = rt.ensure(spec)
    assert state.services_ready and ids() == kept and state.app_url == url

    # restart_app: same container, restarted, same address.
    started = api.inspect_container(rt.container_name(name, "app"))["State"]["StartedAt"]
    rt.restart_app(name)
    assert api.inspect_container(rt.container_name(name, "app"))["State"]["StartedAt"] != started
    assert rt.state(name).app_url == url
    wait_http(url + "/")

    # Its port taken while the app was down: a new container on a new port.
    rt.stop(name)
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        state = rt.ensure(spec)
        assert state.app.health == Health.RUNNING and state.app_url not in ("", url)
        wait_http(state.app_url + "/")


# --- crash safety -----------------------------------------------------------------------


def _runtime_script(mid: str, call: str) -> str:
    return textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(BASE_DIR)!r})
        from instances.runtime.base import InstanceSpec
        from instances.runtime.docker import DockerRuntime
        rt = DockerRuntime(manager_id={mid!r}, images={{"db": {PG!r}, "redis": {REDIS!r}}},
                           subnets={rt_subnets()!r}, ready_timeout=60)
        spec = InstanceSpec(name="killed", db_name="otree", db_user="otree", db_password={PASSWORD!r},
                            memory_mb=128, cpus=0.5)
        {call}
    """)


def rt_subnets() -> str:
    return settings.LAB_DOCKER_SUBNETS


def _kill_when(script: str, predicate, what: str, *, must_kill: bool = True) -> None:
    """Run `script` in a child process and SIGKILL it as soon as `predicate` holds."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: predicate() or proc.poll() is not None, 60, 0.02, what)
        if must_kill:
            assert proc.poll() is None, f"finished before it could be killed: {proc.stdout.read().decode()}"
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_worker_killed_mid_create_then_ensure_converges(rt, mid, api):
    name = "killed"

    def db_container_exists():
        return any(c["Labels"][LABEL_COMPONENT] == "db" for c in dh.labelled(mid, name, api)["containers"])

    _kill_when(_runtime_script(mid, "rt.ensure(spec)"), db_container_exists, "the db container of the killed ensure")
    partial = names(dh.labelled(mid, name))
    assert rt.volume_name(name) in partial["volumes"]
    assert rt.container_name(name, "redis") not in partial["containers"]  # killed before it
    assert name in rt.owned_instances()

    state = rt.ensure(make_spec(name))
    assert state.services_ready
    assert names(dh.labelled(mid, name)) == expected_names(rt, name, app=False)
    rt.remove(name)
    assert not any(dh.labelled(mid, name).values())


def test_interrupted_at_each_step_then_ensure_converges(rt, mid, api, monkeypatch):
    name = "steps"
    spec = make_spec(name, app=http_app())

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash()

    # 1. after the networks: the volume never came.
    with monkeypatch.context() as m:
        m.setattr(rt, "_ensure_volume", crash)
        with pytest.raises(Crash):
            rt.ensure(spec)
    assert len(dh.labelled(mid, name)["networks"]) == 2 and not dh.labelled(mid, name)["volumes"]

    # 2. the db container created but never started.
    with monkeypatch.context() as m:
        m.setattr(rt.api, "start", crash)
        with pytest.raises(Crash):
            rt.ensure(spec)
    (db,) = dh.labelled(mid, name)["containers"]
    assert db["State"] == "created"

    # 3. the app container created, but killed before it joined its second network.
    with monkeypatch.context() as m:
        m.setattr(rt.api, "connect_container_to_network", crash)
        with pytest.raises(Crash):
            rt.ensure(spec)
    app = api.inspect_container(rt.container_name(name, "app"))
    assert list(app["NetworkSettings"]["Networks"]) == [rt.network_name(name, "edge")]

    # 4. two racing ensures made a second network of the same name.
    duplicate = api.create_network(
        rt.network_name(name, "internal"), driver="bridge", internal=True, check_duplicate=False,
        labels={LABEL_MANAGER: mid, LABEL_INSTANCE: name, LABEL_COMPONENT: "network", LABEL_NETWORK: "internal"},
    )
    assert len(dh.labelled(mid, name)["networks"]) == 3

    state = rt.ensure(spec)
    assert state.services_ready and state.app.health == Health.RUNNING
    found = dh.labelled(mid, name)
    assert names(found) == expected_names(rt, name, app=True)
    assert duplicate["Id"] not in {n["Id"] for n in found["networks"]}
    app = api.inspect_container(rt.container_name(name, "app"))
    assert set(app["NetworkSettings"]["Networks"]) == {rt.network_name(name, "edge"), rt.network_name(name, "internal")}
    assert probe(api, rt.container_name(name, "app"), "db", 5432) == "OPEN"
    wait_http(state.app_url + "/")


def test_racing_ensures_then_one_more_converges(rt, mid):
    """The reconciler serialises work on one instance with a lock; should two ensures
    race anyway (three here), the next one still leaves exactly one of everything."""
    name = "race"
    errors = []

    def run():
        try:
            DockerRuntime(manager_id=mid, images=rt.images, ready_timeout=60).ensure(make_spec(name))
        except RuntimeError_ as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    state = rt.ensure(make_spec(name, app=http_app()))
    assert state.services_ready and state.app.health == Health.RUNNING
    assert names(dh.labelled(mid, name)) == expected_names(rt, name, app=True)
    wait_http(state.app_url + "/")
    rt.remove(name)


def test_interrupted_remove_then_remove_again_leaves_nothing(rt, mid, api, monkeypatch):
    name = "rmint"
    rt.ensure(make_spec(name, app=http_app()))

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash()

    with monkeypatch.context() as m:  # containers gone, then the worker died
        m.setattr(rt, "_remove_network", crash)
        with pytest.raises(Crash):
            rt.remove(name)
    left = dh.labelled(mid, name)
    assert not left["containers"] and left["networks"] and left["volumes"]
    assert name in DockerRuntime(manager_id=mid).owned_instances()  # the sweep still sees it
    rt.remove(name)
    assert not any(dh.labelled(mid, name).values())
    assert name not in rt.owned_instances()
    rt.remove(name)  # idempotent

    # A worker SIGKILLed in the middle of remove().
    rt.ensure(make_spec("killed"))

    def some_container_gone():
        return len(dh.labelled(mid, "killed", api)["containers"]) < 2

    _kill_when(_runtime_script(mid, "rt.remove('killed')"), some_container_gone, "remove() to begin",
               must_kill=False)  # remove() may be quicker than the kill; either way:
    rt.remove("killed")
    assert not any(dh.labelled(mid, "killed").values())


# --- builds --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def package_host():
    """A host outside this machine serving the packages the test projects require (no PyPI)."""
    need(netns_available(), "root with iproute2 (ip netns) for the package host")
    with outside_host(f"198.51.100.{10 + os.getpid() % 200}") as host:
        yield host


def test_builds_install_once_share_and_add_only_the_project(rt, api, package_host, tmp_path):
    outside = package_host
    filename = dh.wheel(outside.files, "fwpkg", "installed")
    requirements = f"fwpkg @ http://{outside.address}/{filename}\n"
    watch = dh.Watch(api, rt, "fw-one")
    tag = rt.build_release("fw-one", 1, dh.project(tmp_path, requirements), out=watch, timeout=300, memory_mb=256,
                           cpus=1)
    assert " + fwpkg==1.0" in watch.log and watch.container is not None  # (uv's words)

    # A code-only push and another instance with the same requirements: no pip at all.
    for name, number in (("fw-one", 2), ("fw-two", 1)):
        again = dh.Watch(api, rt, name)
        ctx = dh.project(tmp_path, requirements, "SESSION_CONFIGS = []\nROOMS = []\nCHANGED = 1\n")
        rt.build_release(name, number, ctx, out=again, timeout=300, memory_mb=256, cpus=1)
        assert "requirements.txt unchanged: reusing" in again.log and again.container is None, again.log

    # The release image: the dependencies image plus one COPY of the project, no RUN.
    history = api.history(tag)
    deps = next(i for i, layer in enumerate(history) if any("--deps:" in t for t in layer.get("Tags") or []))
    assert all("#(nop)" in layer["CreatedBy"] for layer in history[:deps]), [l["CreatedBy"] for l in history[:deps]]
    assert "RUN" not in dockerfile({"a": "b"}, "base")
    spec = make_spec("fw-run", app=AppSpec(image=tag, command=["python", "-c", (
        "import fwpkg, os, http.server; print(fwpkg.VALUE, os.getuid(), os.stat('/app').st_uid, "
        "os.stat('/app/settings.py').st_uid, flush=True); http.server.test(port=8000, bind='0.0.0.0')")],
        release_id="fw", user=APP_USER))
    state = rt.ensure(spec)
    wait_until(lambda: "installed 10001 10001 10001" in rt.logs("fw-run"), 30, 0.2, "the app's output")
    assert state.app_url

    # The introspection container cannot write the image (read-only, no network).
    settings_py = "open('written-by-settings.txt', 'w').write('x')\nSESSION_CONFIGS = []\n"
    ro = rt.build_release("fw-one", 3, dh.project(tmp_path, requirements, settings_py), out=lambda t: None,
                          timeout=300, memory_mb=256, cpus=1)
    with pytest.raises(otree_project.BuildFailed, match="Read-only file system"):
        rt.introspect("fw-one", ro)
    # What settings.py prints is read as a bounded stream: a flood fails the release, and
    # never reaches the manager's memory whole.
    flood = "for _ in range(64): print('x' * 2**20)\nSESSION_CONFIGS = []\n"
    loud = rt.build_release("fw-one", 4, dh.project(tmp_path, requirements, flood), out=lambda t: None,
                            timeout=300, memory_mb=256, cpus=1)
    with pytest.raises(otree_project.BuildFailed, match="printed more than 4 MB"):
        rt.introspect("fw-one", loud)

    # The dependencies image stays while a release image is built on it, and goes with
    # the last one (no build running).
    rt.remove("fw-run")
    rt.remove("fw-one")
    assert api.images(filters={"label": [f"{LABEL_MANAGER}={rt.manager_id}", f"{LABEL_COMPONENT}=deps"]})
    rt.remove("fw-two")
    assert not api.images(filters={"label": [f"{LABEL_MANAGER}={rt.manager_id}", f"{LABEL_COMPONENT}=deps"]})


def test_a_build_out_of_memory_or_time_fails_with_what_to_do(rt, api, package_host, tmp_path):
    outside = package_host
    hog = dh.sdist(outside.files, "memhog", "blocks = [bytearray(2**20) for _ in range(600)]\n")
    with pytest.raises(otree_project.BuildFailed) as failed:
        rt.build_release("fw-oom", 1, dh.project(tmp_path, f"memhog @ http://{outside.address}/{hog}\n"), out=lambda t: None,
                         timeout=300, memory_mb=128, cpus=1)
    assert "ran out of memory" in str(failed.value) and "128 MB" in str(failed.value)
    assert "raise the instance's memory" in str(failed.value)

    slow = dh.sdist(outside.files, "sleeper", "import time\ntime.sleep(600)\n")
    with pytest.raises(otree_project.BuildFailed, match="took longer than"):
        rt.build_release("fw-slow", 1, dh.project(tmp_path, f"sleeper @ http://{outside.address}/{slow}\n"), out=lambda t: None,
                         timeout=15, memory_mb=128, cpus=1)
    for name in ("fw-oom", "fw-slow"):
        assert not any(dh.labelled(rt.manager_id, name).values())  # no container, no network left


# --- isolation ------------------------------------------------------------------------------


def test_instances_cannot_reach_each_other(rt, api):
    rt.ensure(make_spec("iso-a", app=http_app()))
    state_b = rt.ensure(make_spec("iso-b", app=http_app()))
    app_a = rt.container_name("iso-a", "app")

    assert probe(api, app_a, "db", 5432) == "OPEN"  # its own database
    assert probe(api, app_a, "redis", 6379) == "OPEN"
    db_b = api.inspect_container(rt.container_name("iso-b", "db"))
    (ip_b,) = [n["IPAddress"] for n in db_b["NetworkSettings"]["Networks"].values()]
    redis_b = api.inspect_container(rt.container_name("iso-b", "redis"))
    (redis_ip_b,) = [n["IPAddress"] for n in redis_b["NetworkSettings"]["Networks"].values()]
    app_b = api.inspect_container(rt.container_name("iso-b", "app"))
    app_ips_b = [n["IPAddress"] for n in app_b["NetworkSettings"]["Networks"].values()]
    assert probe(api, app_a, ip_b, 5432).startswith("CLOSED")
    assert probe(api, app_a, redis_ip_b, 6379).startswith("CLOSED")
    assert probe(api, app_a, rt.container_name("iso-b", "db"), 5432).startswith("CLOSED")  # no such name here
    for ip in app_ips_b:
        assert probe(api, app_a, ip, 8000).startswith("CLOSED")
    # B is fine and answers on the host.
    wait_http(state_b.app_url + "/")


def test_out_of_memory_app_is_killed_alone(rt, api):
    hog = AppSpec(image=PY, command=["python", "-c", "import time; b = b'x' * (200 * 2**20); time.sleep(600)"],
                  release_id="hog")
    rt.ensure(make_spec("oom-a", app=hog, memory_mb=64))
    neighbour = rt.ensure(make_spec("oom-b", app=http_app(), memory_mb=64))
    wait_http(neighbour.app_url + "/")
    hog_name = rt.container_name("oom-a", "app")

    def oom_seen():
        info = api.inspect_container(hog_name)
        if info["State"]["OOMKilled"] or info["RestartCount"] > 0:
            return True
        assert dh.http_get(neighbour.app_url + "/")[0] == 200  # meanwhile the neighbour answers
        return False

    wait_until(oom_seen, 60, 0.3, "the memory hog killed")
    info = api.inspect_container(hog_name)
    # Killed (137) and restarted by its policy: by now it may be running again (flags reset).
    assert info["State"]["OOMKilled"] or info["State"]["ExitCode"] == 137 or info["RestartCount"] > 0
    state = rt.state("oom-a")
    assert "OOMKilled" in state.app.detail or "restarted" in state.app.detail
    assert state.app_url == rt.ensure(make_spec("oom-a", app=hog, memory_mb=64)).app_url  # same port after restarts
    assert state.services_ready  # its own db and redis are separate containers and live on

    # The neighbour keeps answering and never restarted; the hog keeps being killed.
    for _ in range(10):
        assert dh.http_get(neighbour.app_url + "/")[0] == 200
        time.sleep(0.2)
    assert api.inspect_container(rt.container_name("oom-b", "app"))["RestartCount"] == 0
    assert not api.inspect_container(rt.container_name("oom-b", "app"))["State"]["OOMKilled"]
    rt.remove("oom-a")
    rt.remove("oom-b")


# --- database operations ----------------------------------------------------------------------


def test_backup_reset_and_password(rt, api, tmp_path):
    name = "bk"
    spec = make_spec(name)
    rt.ensure(spec)
    code, out = psql(api, rt, name, "CREATE TABLE marker_table (x int); INSERT INTO marker_table VALUES (42);")
    assert code == 0, out

    dest = tmp_path / "backups" / "bk.dump"
    size = rt.backup_database(name, spec, dest)
    data = dest.read_bytes()
    assert size == len(data) > 100
    assert data.startswith(b"PGDMP") and b"marker_table" in data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bk.dump"]  # no temp file left

    # A failing dump leaves no file, not even a partial one.
    bad = dataclasses.replace(spec, db_name="nosuchdb")
    with pytest.raises(RuntimeError_, match="pg_dump"):
        rt.backup_database(name, bad, tmp_path / "backups" / "bad.dump")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bk.dump"]

    rt.reset_database(name, spec)
    code, out = psql(api, rt, name, "SELECT to_regclass('public.marker_table') IS NULL")
    assert (code, out.strip()) == (0, "t")

    # The role and its password survived: a password login over TCP (SCRAM) works and a
    # wrong password is refused.
    ip = next(iter(api.inspect_container(rt.container_name(name, "db"))["NetworkSettings"]["Networks"].values()))["IPAddress"]
    code, out = psql(api, rt, name, "SELECT current_user", host=ip, password=PASSWORD)
    assert (code, out.strip()) == (0, "otree")
    code, out = psql(api, rt, name, "SELECT 1", host=ip, password="wrong")
    assert code != 0 and "password authentication failed" in out
    assert rt.state(name).services_ready


# --- ownership --------------------------------------------------------------------------------


def test_orphans_are_listed_and_removed_and_other_managers_untouched(rt, mid, api):
    rt.ensure(make_spec("orph"))
    rt._ensure_volume("orph-vol")  # only a volume left of some instance
    forgetful = DockerRuntime(manager_id=mid)  # a fresh object: knows nothing but the labels
    assert {"orph", "orph-vol"} <= forgetful.owned_instances()

    other = DockerRuntime(manager_id=dh.new_manager_id())
    assert other.owned_instances() == set()
    other.remove("orph")  # another manager's remove touches nothing of ours
    assert names(dh.labelled(mid, "orph")) == {**expected_names(rt, "orph", app=False)}

    forgetful.remove("orph")
    forgetful.remove("orph-vol")
    for instance in ("orph", "orph-vol"):
        assert not any(dh.labelled(mid, instance).values())
        assert instance not in rt.owned_instances()


def test_resources_it_did_not_create_are_never_touched(rt, api):
    name = "foreign"
    vname = rt.volume_name(name)
    api.create_volume(vname)  # same name, no labels
    try:
        with pytest.raises(RuntimeError_, match="did not create"):
            rt.ensure(make_spec(name))
        assert name in rt.owned_instances()  # the networks it made before refusing are ours
        rt.remove(name)
        assert api.inspect_volume(vname)["Name"] == vname  # the foreign volume is still there
        assert name not in rt.owned_instances()
    finally:
        rt.remove(name)
        api.remove_volume(vname, force=True)


def test_missing_image_and_unreachable_engine_give_clear_messages(rt):
    missing = DockerRuntime(manager_id=rt.manager_id, images={"db": "lab-no-such/postgres:0", "redis": REDIS})
    with pytest.raises(RuntimeError_, match=r"image lab-no-such/postgres:0 not found: build it with `python manage.py build_images`"):
        missing.ensure(make_spec("noimage"))
    with pytest.raises(RuntimeError_, match="app image lab-no-such/app:1 not found"):
        rt.ensure(make_spec("noimage", app=AppSpec(image="lab-no-such/app:1")))
    with pytest.raises(RuntimeError_, match="not DNS-safe"):
        rt.ensure(make_spec("Bad_Name"))


def test_unreachable_engine(tmp_path):
    dead = DockerRuntime(manager_id="tdead", base_url=f"unix://{tmp_path}/no.sock", images={"db": "x", "redis": "y"})
    assert dead.available() is False
    with pytest.raises(RuntimeError_, match=f"Docker engine not reachable at unix://{tmp_path}/no.sock"):
        dead.ensure(make_spec("x"))


def test_get_runtime_follows_lab_runtime_and_the_instances_own(settings, monkeypatch, tmp_path):
    from types import SimpleNamespace

    settings.LAB_RUNTIME = "docker"
    assert get_runtime().name == "docker"
    settings.LAB_RUNTIME = "process"
    assert get_runtime().name == "process"
    settings.LAB_RUNTIME = "swarm"
    assert get_runtime().name == "swarm"
    settings.LAB_RUNTIME = "kubernetes"
    with pytest.raises(RuntimeError_, match="LAB_RUNTIME=kubernetes: no such runtime here; use auto or one of docker, "
                                            "process, swarm"):
        get_runtime()
    settings.LAB_RUNTIME = "auto"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no.sock")
    assert get_runtime().name == "process"  # no engine answers: the process runtime
    # An instance keeps the backend it was created with, whatever the default is now.
    assert get_runtime(SimpleNamespace(runtime="docker")).name == "docker"
    if dh.engine_ok():
        monkeypatch.delenv("DOCKER_HOST")
        assert get_runtime().name == "docker"
        assert get_runtime(SimpleNamespace(runtime="process")).name == "process"
