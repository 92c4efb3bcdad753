"""The swarm runtime with a real second node (issue 15): a docker-in-docker container joined
to this machine's swarm as a worker (tests/swarm_node.py), its dockerd trusting the lab's
plain-HTTP registry on the manager's node.

1. an instance placed on the second node (its runtime's placement pinned there);
2. `ensure`: PostgreSQL and Redis run there (their images reach it through the lab's
   registry), `state()` says running, `node_of` names the node;
3. `deploy_app`: the app answers HTTP from this machine at the node's address; the node's
   firewall (a global service, instances/node_guard.py) keeps the app from the lab's
   registry, this machine's services, the node's own and metadata addresses; the node runs
   the images by digest, so a tag overwritten in the registry changes nothing;
4. SQL, `backup_database` (a job on the node, the dump back through its logs: a valid
   PGDMP archive with the row), `reset_database`, `logs(..., "db")`;
5. node loss: the node's container stopped, the instance's state says EXITED and names the
   node as down; started again, the instance runs again;
6. placement (the runtime's own `_choose_node`): the node with fewer reservations gets the
   next instance, a drained node none;
7. a move to this machine's node and back keeps the data (the old volume goes each time);
8. `remove` leaves nothing on either node (the PostgreSQL volume on the second node too).

Everything is made under a manager id of its own (`dn...`), instances `dind2-...`, the node
`dind2-node-...`; the fixtures remove the node, purge the manager id and untag what was
pushed. Timings are printed (pytest -s) and kept in TIMINGS.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import secrets
import socket
import subprocess
import time
import types

import pytest
from django.conf import settings

from instances.runtime.base import AppSpec, Health, InstanceSpec, RuntimeError_
from instances.runtime.swarm import LABEL_SWARM, SwarmRuntime
from tests import backends, swarm_node
from tests import docker_helpers as dh
from tests.conftest import need
from tests.waits import wait_until

pytestmark = pytest.mark.docker

PG, REDIS, PY = settings.LAB_IMAGE_POSTGRES, settings.LAB_IMAGE_REDIS, settings.LAB_IMAGE_PYTHON
PASSWORD = "pa'ss wo\"rd$1@:/"  # quoting everywhere: SQL, URL, environment
MID = "dn" + secrets.token_hex(5)  # this module's manager id
A, B, C = "dind2-a", "dind2-b", "dind2-c"  # A on the second node; B and C placed by the runtime
ROW = "row-from-the-second-node"
TIMINGS: dict[str, float] = {}


def timed(key: str, started: float) -> float:
    TIMINGS[key] = round(time.monotonic() - started, 1)
    print(f"[timing] {key}: {TIMINGS[key]} s")
    return TIMINGS[key]


def make_spec(name: str, app: AppSpec | None = None, **kw) -> InstanceSpec:
    kw.setdefault("memory_mb", 128)
    kw.setdefault("cpus", 0.5)
    return InstanceSpec(name=name, db_name="otree", db_user="otree", db_password=PASSWORD, app=app, **kw)


def fake_app_spec(runtime, name: str) -> AppSpec:
    fake = backends.fake_app(runtime, name)
    return AppSpec(image=fake["image"], command=fake["command"], port=fake["port"], release_id=fake["release"])


def host_docker(*args: str, timeout: float = 60, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def job_sql(rt: SwarmRuntime, name: str, statement: str) -> tuple[int | None, str]:
    """SQL in the instance's database through the runtime's job path: psql in a one-off job
    service on the database's node and the instance's network; (exit code, output)."""
    node = backends._task(rt, name, "db").get("NodeID", "")
    code, out = rt._job(name, node, rt.images["db"],
                        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", "db", "-U", "otree", "-d", "otree",
                         "-tAc", statement],
                        env={"PGPASSWORD": PASSWORD}, timeout=60)
    return code, out.strip()


def all_running(rt: SwarmRuntime, name: str, app: bool = True):
    state = rt.state(name)
    healthy = state.db.health == Health.RUNNING and state.redis.health == Health.RUNNING
    if app:
        healthy = healthy and state.app.health == Health.RUNNING
    return state if healthy else None


def http_ok(url: str) -> bytes | None:
    status, body = dh.http_get(url, timeout=3)
    return body if status == 200 else None


def ours_on_node(node: swarm_node.Node) -> dict[str, list[str]]:
    """What of this manager id the second node's own engine still has."""
    label = f"label={LABEL_SWARM}={MID}"
    containers = node.docker("ps", "--all", "--filter", label, "--format",
                             "{{.Names}} {{.Status}} {{.Label \"org.otree-lab.component\"}}").splitlines()
    return {
        "containers": [c for c in containers if not c.endswith(" netguard")],  # the node's firewall stays
        "volumes": node.docker("volume", "ls", "--quiet", "--filter", label).split(),
        "networks": [n for n in node.docker("network", "ls", "--format", "{{.Name}}").split()
                     if n.startswith(f"lab-{MID}-")],
    }


def ours_on_host(rt: SwarmRuntime, name: str) -> dict[str, list[str]]:
    filters = rt._swarm_filters(name)
    return {
        "services": [s["Spec"]["Name"] for s in rt.api.services(filters=filters)],
        "networks": [n["Name"] for n in rt.api.networks(filters=filters)],
        "volumes": [v["Name"] for v in rt.api.volumes(filters=filters).get("Volumes") or []],
    }


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node():
    need(dh.engine_ok() and dh.images_present(PG, REDIS, PY, settings.LAB_IMAGE_REGISTRY, settings.LAB_IMAGE_NETGUARD),
         f"a Docker engine with {PG}, {REDIS}, {PY}, {settings.LAB_IMAGE_REGISTRY}, {settings.LAB_IMAGE_NETGUARD} "
         "(manage.py build_images)")
    from tests.swarm_helpers import ensure_swarm

    need(ensure_swarm(), "a Docker engine in swarm mode (docker swarm init)")
    need(swarm_node.tools_ok(), f"the docker CLI and {swarm_node.BASE} (manage.py build_images) for a second node")
    # The lab's registry is plain HTTP at the manager node's address: the node's dockerd trusts
    # that address's /16 (the registry's port is chosen later, by the runtime).
    manager = swarm_node.manager_address().rpartition(":")[0]
    trusted = ipaddress.ip_network(f"{manager}/16", strict=False)
    started = time.monotonic()
    n = swarm_node.start_node(dockerd_args=(f"--insecure-registry={trusted}",), prefix="dind2-node-",
                               prefer_offline=False)  # pull the tasks' images from the registry
    timed("node start (build check, run, join, Ready)", started)
    print(f"[node] {n.name} {n.node_id} at {n.address}, steps {n.timings}")
    try:
        yield n
    finally:
        try:
            host_docker("node", "update", "--availability", "active", n.node_id, check=False)
            n.remove()
        finally:
            print("[timings]", TIMINGS)


@pytest.fixture(scope="module")
def rt(node):
    runtime = SwarmRuntime(manager_id=MID, images={"db": PG, "redis": REDIS}, ready_timeout=120)
    # Step 1's placement: instance A goes to the second node (the placement itself: step 6).
    runtime._choose_node = lambda memory_mb: node.node_id
    try:
        yield runtime
    finally:
        from tests.swarm_helpers import purge

        try:
            purge(MID)  # services (the registry too), networks, volumes on the manager's node
        finally:
            dh.purge(MID)  # firewall chains, anything labelled for the docker backend
            for ref in host_docker("images", "--format", "{{.Repository}}:{{.Tag}}").split():
                if f"/lab-{MID}/" in ref:  # the tags pushed to the lab's registry
                    host_docker("rmi", ref, check=False)


@pytest.fixture(scope="module")
def spec_a(rt):
    return make_spec(A)


# --- 2. ensure on the second node ----------------------------------------------------------


def test_ensure_runs_db_and_redis_on_the_second_node(rt, node, spec_a):
    started = time.monotonic()
    push, pull = rt._registry()
    timed("the lab's registry up", started)
    assert pull.startswith(f"{swarm_node.manager_address().rpartition(':')[0]}:"), (push, pull)
    for image in (PG, REDIS):
        started = time.monotonic()
        ref = rt._pushed(image)
        timed(f"push {image}", started)
        assert ref.startswith(f"{pull}/lab-{MID}/"), ref
    since = int(time.time()) - 1
    started = time.monotonic()
    state = rt.ensure(spec_a)
    timed("ensure on the second node (pulls from the registry, job probes)", started)
    assert state.db.health == Health.RUNNING, state
    assert state.redis.health == Health.RUNNING, state
    assert rt.node_of(A) == node.node_id
    for component in ("db", "redis"):
        assert backends._task(rt, A, component)["NodeID"] == node.node_id
    pulls = node.docker("events", "--since", str(since), "--until", str(int(time.time()) + 1),
                        "--filter", "type=image", "--filter", "event=pull", "--format", "{{.Time}} {{.ID}}")
    print(f"[pulls on the node, epoch seconds since {since}]\n{pulls}")
    for line in pulls.splitlines():
        stamp, ref = line.split(" ", 1)
        TIMINGS[f"pulled {ref.rsplit('/', 1)[-1]} (s after ensure began)"] = int(stamp) - since
    # Pulled by digest: what the manager pushed, whatever a tag in the registry says later.
    images = node.docker("images", "--digests", "--format", "{{.Repository}}@{{.Digest}}").split()
    for component in ("db", "redis"):
        ref = rt._service(A, component)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
        assert re.fullmatch(rf"{re.escape(pull)}/lab-{MID}/(postgres|redis)@sha256:[0-9a-f]{{64}}", ref), ref
        assert ref in images, (ref, images)
    # The state again, from scratch (the services' tasks, job probes on the node).
    started = time.monotonic()
    again = rt.state(A)
    timed("state() of an instance on the second node", started)
    assert again.db.health == Health.RUNNING and again.redis.health == Health.RUNNING, again


# --- 3. the app ----------------------------------------------------------------------------


def test_deploy_answers_at_the_second_nodes_address(rt, node, spec_a):
    spec = dataclasses.replace(spec_a, app=fake_app_spec(rt, A))
    started = time.monotonic()
    url = rt.deploy_app(spec, timeout=180)
    timed("deploy_app on the second node (python image via the registry)", started)
    rt.retire_app(A)
    assert url.startswith(f"http://{node.address}:"), url
    state = rt.state(A)
    assert state.app.health == Health.RUNNING, state
    assert state.app_url == url
    assert backends._task(rt, A, "app")["NodeID"] == node.node_id
    assert wait_until(lambda: http_ok(state.app_url), timeout=30, interval=0.5,
                      message=f"HTTP 200 from {state.app_url}")
    # A later ensure with the same spec keeps it (same service, same port).
    assert rt.ensure(spec).app_url == url


# --- 3b. what the app on the second node reaches, and what it runs ------------------------------

PROBE = ("import socket,sys\n"
         "for target in sys.argv[1:]:\n"
         "    host, port = target.rsplit(':', 1)\n"
         "    try:\n"
         "        socket.create_connection((host, int(port)), timeout=3).close(); print(target, 'connected')\n"
         "    except OSError as e:\n"
         "        print(target, type(e).__name__, e)\n")


def app_container_on_node(rt: SwarmRuntime, name: str) -> str:
    task = backends._task(rt, name, "app")
    return (task.get("Status") or {}).get("ContainerStatus", {}).get("ContainerID", "")


def test_the_app_on_the_second_node_reaches_nothing_of_the_lab(rt, node):
    """A hostile app on another node than the manager's: the lab's registry (where every
    release image lies), a service of the manager's machine, the services of its own node
    and metadata addresses all refuse it at once; the node itself reaches them (so it is
    the firewall, not the network, that refuses)."""
    ok, why = rt.node_guarded(node.node_id)
    assert ok, why
    page = {p.what: p for p in rt.protections(A)}  # what the instance page says
    assert page["Host and other instances"].holds and node.name in page["Host and other instances"].detail, page
    assert page["Its port"].holds, page["Its port"].detail
    rules = swarm_node._docker("exec", node.name, "iptables-save", "-t", "filter")
    assert f"-j LAB-{MID}-FWD" in rules and f"-A LAB-{MID}-FWD -s {rt.swarm_subnets}" in rules, rules[-3000:]
    _, pull = rt._registry()
    manager = swarm_node.manager_address().rpartition(":")[0]
    with socket.socket() as listener:  # a service of the manager's machine on all its addresses
        listener.bind(("0.0.0.0", 0))
        listener.listen(16)
        service = f"{manager}:{listener.getsockname()[1]}"
        targets = [pull, service, f"{node.address}:7946", "169.254.169.254:80"]
        for target in targets[:2]:  # the node itself (its engine pulls from the registry)
            host, port = target.rsplit(":", 1)
            reached = swarm_node._docker("exec", node.name, "bash", "-c",
                                         f"exec 3<>/dev/tcp/{host}/{port} && echo connected", check=False)
            assert reached == "connected", (target, reached)
        container = app_container_on_node(rt, A)
        assert container, backends._task(rt, A, "app")
        started = time.monotonic()
        out = node.docker("exec", container, "python", "-c", PROBE, *targets, timeout=60)
        timed("the app's probes of 4 lab addresses", started)
        results = dict(line.split(" ", 1) for line in out.splitlines())
        assert set(results) == set(targets), out
        for target, result in results.items():
            assert "No route to host" in result, (target, result)  # refused at once, not timed out

        # Its rules flushed while the guard is paused: the app reaches the registry and the
        # machine's service; the guard, running again, puts the rules back within seconds.
        [guard] = node.docker("ps", "--quiet", "--filter", f"label={LABEL_SWARM}={MID}",
                              "--filter", "label=org.otree-lab.component=netguard").split()
        node.docker("pause", guard)
        try:
            for chain in ("FWD", "IN"):
                swarm_node._docker("exec", node.name, "iptables", "-F", f"LAB-{MID}-{chain}")
            out = node.docker("exec", container, "python", "-c", PROBE, *targets[:2], timeout=60)
            assert out.splitlines() == [f"{t} connected" for t in targets[:2]], out
        finally:
            node.docker("unpause", guard)
        started = time.monotonic()
        wait_until(lambda: "connected" not in node.docker("exec", container, "python", "-c", PROBE, *targets[:2]),
                   timeout=30, interval=0.5, message="the node's rules back after the guard resumed")
        timed("rules flushed on the node -> back (the guard's period is 3 s)", started)


def test_the_registry_wants_its_password_and_an_overwritten_tag_changes_nothing(rt, node, spec_a, tmp_path):
    """The lab's registry serves only with its password (the manager pushes with it, the
    nodes pull with it); and even whoever has it and pushes another image under a release's
    name and tag changes nothing: the node runs what the manager pushed (by digest)."""
    spec = dataclasses.replace(spec_a, app=fake_app_spec(rt, A))
    push, pull = rt._registry()
    for path in ("/v2/_catalog", f"/v2/lab-{MID}/postgres/tags/list"):
        status, _ = dh.http_get(f"http://{push}{path}", timeout=5)
        assert status == 401, (path, status)  # nothing to read without the password
    ref = rt._service(A, "app")["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    repository, tag = PY.rsplit(":", 1)
    assert re.fullmatch(rf"{re.escape(pull)}/lab-{MID}/{re.escape(repository)}@sha256:[0-9a-f]{{64}}", ref), ref
    poisoned = f"{push}/lab-{MID}/{repository}:{tag}"
    host_docker("tag", REDIS, poisoned)
    config = ["--config", str(tmp_path)]  # a docker CLI with no credentials of its own
    refused = subprocess.run(["docker", *config, "push", poisoned], capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0 and "no basic auth credentials" in refused.stdout + refused.stderr, refused
    subprocess.run(["docker", *config, "login", "--username", "lab", "--password-stdin", push],
                   input=rt.registry_password(), capture_output=True, text=True, timeout=60, check=True)
    host_docker(*config, "push", poisoned, timeout=180)
    # The node forgets its copy, so that the app's next start pulls again.
    rt.stop(A)
    wait_until(lambda: not node.docker("ps", "--quiet", "--filter", f"label={LABEL_SWARM}={MID}",
                                       "--filter", f"label=org.otree-lab.instance={A}"),
               timeout=60, interval=0.5, message=f"{A}'s containers stopped on {node.name}")
    for image_id in set(node.docker("images", "--quiet", f"{pull}/lab-{MID}/{repository}").split()):
        node.docker("rmi", "--force", image_id)
    state = rt.ensure(spec)
    assert state.app.health == Health.RUNNING, state
    running = node.docker("inspect", "--format", "{{.Image}}", app_container_on_node(rt, A))
    assert running == host_docker("image", "inspect", "--format", "{{.Id}}", PY)  # the python image, not redis
    assert wait_until(lambda: http_ok(state.app_url), timeout=30, interval=0.5,
                      message=f"HTTP 200 from {state.app_url}")


# --- 4. SQL, backup, reset, logs through the job path ------------------------------------------


def test_backup_reset_and_logs_through_jobs(rt, node, spec_a, tmp_path):
    code, out = job_sql(rt, A, f"CREATE TABLE items (name text); INSERT INTO items VALUES ('{ROW}')")
    assert code == 0, out
    code, out = job_sql(rt, A, "SELECT name FROM items")
    assert (code, out) == (0, ROW)

    dest = tmp_path / "a.dump"
    started = time.monotonic()
    size = rt.backup_database(A, spec_a, dest)
    timed("backup_database via a job (dump through the service's logs)", started)
    data = dest.read_bytes()
    assert size == len(data) > 0 and data[:5] == b"PGDMP"
    # The archive read by pg_restore (in a container of the PostgreSQL image on this machine).
    restore = ["run", "--rm", "--name", f"dind2-restore-{secrets.token_hex(3)}", "--network", "none",
               "-v", f"{tmp_path}:/dump:ro", "--entrypoint", "pg_restore", PG]
    toc = host_docker(*restore, "-l", "/dump/a.dump")
    assert "TABLE public items" in toc, toc
    rows = host_docker(*restore, "--data-only", "-t", "items", "-f", "-", "/dump/a.dump")
    assert ROW in rows, rows

    rt.reset_database(A, spec_a)
    code, out = job_sql(rt, A, "SELECT name FROM items")
    assert code != 0 and 'relation "items" does not exist' in out, (code, out)
    assert job_sql(rt, A, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == (0, "0")

    logs = rt.logs(A, "db")
    assert "database system is ready to accept connections" in logs, logs[-2000:]


# --- 5. node loss ----------------------------------------------------------------------------


def test_node_loss_is_reported_and_the_instance_comes_back(rt, node, spec_a):
    started = time.monotonic()
    node.stop()
    down = wait_until(lambda: (s := rt.state(A)).db.health == Health.EXITED and s, timeout=90, interval=1,
                      message=lambda: f"{A} EXITED after its node stopped (node {node.state()})")
    timed("node stopped -> state() EXITED", started)
    for component in (down.db, down.redis, down.app):
        assert component.health == Health.EXITED, down
        assert f"its node {node.name} is down" in component.detail, down
    assert down.app_url == ""

    started = time.monotonic()
    node.start()
    timed("node started -> Ready", started)
    back = wait_until(lambda: all_running(rt, A), timeout=150, interval=1,
                      message=lambda: f"{A} running again ({rt.state(A)})")
    timed("node started -> instance running", started)
    assert rt.node_of(A) == node.node_id
    assert back.app_url.startswith(f"http://{node.address}:"), (back.app_url, node.address)
    assert wait_until(lambda: http_ok(back.app_url), timeout=60, interval=0.5,
                      message=f"HTTP 200 from {back.app_url} after the node came back")


# --- 6. placement ----------------------------------------------------------------------------


def test_placement_fewer_reservations_and_drained_node(rt, node):
    local = rt.local_node
    real = backends.SWARM_CHOOSE_NODE or SwarmRuntime._choose_node
    placer = SwarmRuntime(manager_id=MID, images={"db": PG, "redis": REDIS}, ready_timeout=120)
    placer._choose_node = types.MethodType(real, placer)
    # Only this machine's node and this test's: another run's node in the same swarm (a
    # developer's tests beside these) has none of this manager id's reservations.
    everything = placer.nodes
    placer.nodes = lambda: [n for n in everything() if n["id"] in (local, node.node_id)]

    def reserved() -> dict[str, int]:
        return {n["id"]: n["reserved_mb"] for n in placer.nodes() if n["id"] in (local, node.node_id)}

    def free() -> dict[str, int]:
        return {n["id"]: n["memory_mb"] - n["reserved_mb"] for n in placer.nodes() if n["id"] in (local, node.node_id)}

    # Now: the registry (32 MB) here, instance A (db 64 + redis 16 + app 64) there.
    before = reserved()
    assert before[local] < before[node.node_id], before
    assert max(free(), key=free().get) == local
    spec_b = make_spec(B, memory_mb=1024)  # its app reserves a quarter: 256 MB
    placer.ensure(dataclasses.replace(spec_b, app=fake_app_spec(placer, B)))
    assert placer.node_of(B) == local, reserved()

    # Now this node has more reserved than the second one: the next instance goes there.
    after = reserved()
    assert after[local] > after[node.node_id], after
    assert placer._choose_node(128 + 256 + 64) == node.node_id, (after, free())

    # ... unless it is drained: then it gets none.
    host_docker("node", "update", "--availability", "drain", node.node_id)
    try:
        assert placer._choose_node(128 + 256 + 64) == local
        state = placer.ensure(make_spec(C))
        assert placer.node_of(C) == local
        assert state.db.health == Health.RUNNING and state.redis.health == Health.RUNNING, state
    finally:
        host_docker("node", "update", "--availability", "active", node.node_id)
    started = time.monotonic()
    wait_until(lambda: all_running(rt, A), timeout=150, interval=1,
               message=lambda: f"{A} running again on the reactivated node ({rt.state(A)})")
    timed("node reactivated -> instance running", started)


def test_an_app_on_this_machine_reaches_no_other_node(rt, node):
    """The manager machine's firewall knows the swarm's nodes (the runtime records their
    addresses): an app here reaches none of them, though this machine does."""
    socket.create_connection((node.address, 7946), timeout=5).close()  # the node's swarm gossip port
    container = backends.container_of(rt, B, "app")
    out = host_docker("exec", container, "python", "-c", PROBE, f"{node.address}:7946")
    assert "No route to host" in out, out


# --- 7. remove -------------------------------------------------------------------------------


# --- 7. moves: to this machine's node and back ---------------------------------------------------


def test_a_move_to_this_node_and_back_keeps_the_data(rt, node, spec_a, tmp_path):
    """The lab manager's move (issue 15 item 3): the app stops, the database is dumped, it
    starts on the target with a new volume and the dump restored, the app starts there, the
    old volume goes — both ways (the way back restores through a job whose image carries the
    dump through the registry)."""
    spec = dataclasses.replace(spec_a, app=fake_app_spec(rt, A))
    assert wait_until(lambda: all_running(rt, A), timeout=120, interval=1, message=f"{A} running on {node.name}")
    assert rt.node_of(A) == node.node_id
    code, out = job_sql(rt, A, "CREATE TABLE moved (name text); INSERT INTO moved VALUES ('travels')")
    assert code == 0, out
    here = rt.local_node
    started = time.monotonic()
    result = rt.move_instance(A, spec, here, dump=tmp_path / "there.dump")
    timed("move from the second node to this machine's", started)
    assert result["source"] == node.node_id and result["target"] == here
    assert rt.node_of(A) == here
    state = all_running(rt, A)
    assert state is not None and state.app_url.startswith("http://127.0.0.1:"), rt.state(A)
    assert wait_until(lambda: http_ok(state.app_url), timeout=30, interval=0.5, message="the app answers here")
    assert backends.sql(rt, A, "SELECT name FROM moved") == (0, "travels")
    assert (tmp_path / "there.dump").read_bytes()[:5] == b"PGDMP"  # the move's backup is kept
    assert rt.volume_name(A) not in node.docker("volume", "ls", "--quiet").split()  # the old volume went

    code, out = backends.sql(rt, A, "INSERT INTO moved VALUES ('and back')")
    assert code == 0, out
    started = time.monotonic()
    rt.move_instance(A, spec, node.node_id, dump=tmp_path / "here.dump")
    timed("move from this machine's node to the second node", started)
    assert rt.node_of(A) == node.node_id
    state = wait_until(lambda: all_running(rt, A), timeout=60, interval=1, message=f"{A} running on {node.name}")
    assert state.app_url.startswith(f"http://{node.address}:")
    assert wait_until(lambda: http_ok(state.app_url), timeout=30, interval=0.5, message="the app answers there")
    assert job_sql(rt, A, "SELECT name FROM moved ORDER BY name") == (0, "and back\ntravels")
    assert rt.api.volumes(filters=rt._swarm_filters(A)).get("Volumes") in (None, [])  # none left here

    # A restore on the other node (issue 16: a job whose image carries the backup, through the
    # registry): a file that is no dump is refused there before anything changes; the dump
    # taken there first (one row) replaces the two rows.
    garbage = tmp_path / "garbage.dump"
    garbage.write_bytes(b"PGDMP" + bytes(range(256)))
    with pytest.raises(RuntimeError_, match="not a backup PostgreSQL can restore"):
        rt.check_restore(A, spec, garbage)
    assert job_sql(rt, A, "SELECT name FROM moved ORDER BY name") == (0, "and back\ntravels")
    rt.restore_database(A, spec, tmp_path / "there.dump")
    assert job_sql(rt, A, "SELECT name FROM moved ORDER BY name") == (0, "travels")


def orphaned_tasks(rt: SwarmRuntime) -> list[str]:
    """The swarm's tasks of this manager id whose service is gone (the swarm keeps a removed
    service's tasks only while their containers stop)."""
    services = {s["ID"] for s in rt.api.services()}
    return [f"{t['ID'][:12]} {t['Status'].get('State')}" for t in rt.api.tasks()
            if t.get("ServiceID") not in services
            and (t["Spec"].get("ContainerSpec", {}).get("Labels") or {}).get(LABEL_SWARM) == MID]


def test_remove_leaves_nothing_on_either_node(rt, node):
    started = time.monotonic()
    rt.remove(A)
    timed("remove of the instance on the second node", started)
    assert ours_on_host(rt, A) == {"services": [], "networks": [], "volumes": []}
    assert rt.node_of(A) == ""

    # The node's engine lets go of the tasks' containers a moment later; the PostgreSQL
    # volume there goes with them; no task of a removed service (a job's) stays in the swarm.
    def left() -> dict[str, list[str]]:
        found = {f"on {node.name}: {kind}": items for kind, items in ours_on_node(node).items()}
        found["tasks of removed services"] = orphaned_tasks(rt)
        return {what: items for what, items in found.items() if items}

    wait_until(lambda: not left(), timeout=30, interval=1,
               message=lambda: f"nothing of {MID} left after remove({A!r}): {left()}")
    assert rt.volume_name(A) not in node.docker("volume", "ls", "--quiet").split()

    for name in (B, C):
        rt.remove(name)
        assert ours_on_host(rt, name) == {"services": [], "networks": [], "volumes": []}
        assert rt.api.containers(all=True, filters=rt._swarm_filters(name)) == []
    assert rt.owned_instances() == set()
    # What is left of this manager id: its registry and the nodes' firewall (the fixture's
    # purge removes them).
    left_services = sorted(s["Spec"]["Name"] for s in rt.api.services(filters=rt._swarm_filters()))
    assert left_services == sorted([rt.registry_service_name(), rt.guard_service_name()]), left_services
