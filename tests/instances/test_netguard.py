"""The instances' firewall (instances.netguard) with real iptables, real containers, real
processes as tenant uids and real test hosts (tests/netns_helpers.py): what an
instance's app and its build can and cannot reach, on both runtimes.

Each test run makes up its own manager id, Docker pools and tenant uid ranges, so its
rules touch only its own containers and processes (other runs and managers on this
machine keep theirs); every chain, container, network and image is removed at the end.
Each "cannot reach" is paired with a control that reaches the same target without the
rules (or from outside the tenant's identity), so a probe that could not work would fail
the test instead of passing it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from instances import netguard, otree_project
from instances.runtime.base import AppSpec, InstanceSpec
from instances.runtime.docker import APP_USER, LABEL_COMPONENT, LABEL_MANAGER, DockerRuntime
from tests import docker_helpers as dh
from tests.conftest import need
from tests.netns_helpers import host_addresses, host_listener, netns_available, outside_host
from tests.waits import wait_until

PG, REDIS, PY = django_settings.LAB_IMAGE_POSTGRES, django_settings.LAB_IMAGE_REDIS, django_settings.LAB_IMAGE_PYTHON
RNG = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "big"))
_SECOND = RNG.randint(224, 250)  # 10.224-250.x: beside the defaults (10.213.0.0/16, 10.214.0.0/20)
_THIRD = RNG.randrange(0, 256, 2)
APP_POOL, BUILD_POOL = f"10.{_SECOND}.{_THIRD}.0/24", f"10.{_SECOND}.{_THIRD + 1}.0/26"
_UID = 2_100_000_000 + RNG.randrange(0, 40_000) * 1000
APP_UIDS, BUILDER_UIDS = (_UID, _UID + 899), (_UID + 900, _UID + 999)
OTHER_UID = _UID - 1  # in neither range: the control
OUTSIDE = f"198.51.100.{RNG.randint(10, 250)}"  # TEST-NET-2
# A metadata service like 169.254.169.254, at an address of this run's own (the rules close
# all of 169.254.0.0/16; parallel runs, e.g. the acceptance test at .254, keep their routes).
METADATA = f"169.254.{RNG.randint(1, 250)}.{RNG.randint(1, 250)}"
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every uid (the venv's may not be)

# Connects to each host:port ([v6]:port) and sends an HTTP request; prints {target: outcome}.
PROBE = textwrap.dedent(r'''
    import json, socket, sys
    results = {}
    for target in sys.argv[1:]:
        host, _, port = target.rpartition(":")
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)[0]
            with socket.socket(family, kind, proto) as s:
                s.settimeout(4)
                s.connect(addr)
                s.sendall(b"GET /probe HTTP/1.0\r\nHost: probe\r\n\r\n")
                s.recv(64)
            results[target] = "open"
        except OSError as exc:
            results[target] = "closed: " + (exc.strerror or type(exc).__name__)
    print(json.dumps(results))
''')


def firewall_ok() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("iptables-save", "iptables-restore"))


def policy(manager_id: str, egress: str = "open", **kw) -> netguard.Policy:
    kw = {"app_pools": (APP_POOL,), "build_pools": (BUILD_POOL,), "app_uids": APP_UIDS, "builder_uids": BUILDER_UIDS,
          "egress": egress, "data_dir": str(django_settings.DATA_DIR), **kw}
    return netguard.Policy(manager_id=manager_id, **kw)


def saved(version: int = 4) -> str:
    return subprocess.run([f"ip{'6' if version == 6 else ''}tables-save", "-t", "filter"], capture_output=True,
                          text=True, timeout=30, check=True).stdout


def ours(manager_id: str) -> str:
    """Every line of both filter tables that mentions the manager's chains."""
    return "\n".join(line for version in (4, 6) for line in saved(version).splitlines()
                     if f"LAB-{manager_id}-" in line)


def closed(results: dict) -> bool:
    return all(outcome.startswith("closed") for outcome in results.values())


def refused_at_once(results: dict) -> bool:
    """Rejected by the firewall (a clear error) rather than dropped (a timeout)."""
    return not any("timed out" in outcome for outcome in results.values())


@pytest.fixture
def firewall():
    need(firewall_ok(), "root with iptables")
    made = []

    def make(egress: str = "open", **kw) -> netguard.Policy:
        p = policy(dh.new_manager_id(), egress, **kw)
        made.append(p.manager_id)
        return p

    try:
        yield make
    finally:
        for manager_id in made:
            netguard.remove(manager_id)
            assert not ours(manager_id)


# --- the rules themselves -------------------------------------------------------------------------

def test_ensure_is_idempotent_repairs_drift_and_remove_leaves_nothing(firewall):
    p = firewall()
    assert not netguard.status(p).enforced
    first = netguard.ensure(p)
    assert first.enforced and first.changed, first.detail
    before = ours(p.manager_id)
    assert f"-A INPUT -m comment --comment \"otree-lab {p.manager_id} " in before
    again = netguard.ensure(p)
    assert again.enforced and not again.changed  # in place: nothing applied
    assert ours(p.manager_id) == before

    # Drift: the jump deleted by hand, a chain flushed, a jump moved behind another rule.
    subprocess.run(["iptables", "-D", "INPUT", "-m", "comment", "--comment",
                    f"otree-lab {p.manager_id} {p.data_dir}", "-j", p.chain("IN")], check=True)
    assert not netguard.status(p).enforced
    assert netguard.ensure(p).changed and ours(p.manager_id) == before
    subprocess.run(["iptables", "-F", p.chain("FWD")], check=True)
    assert not netguard.status(p).enforced
    assert netguard.ensure(p).changed and ours(p.manager_id) == before
    subprocess.run(["iptables", "-I", "OUTPUT", "1", "-p", "udp", "--dport", "9", "-j", "ACCEPT"], check=True)
    try:
        assert not netguard.status(p).enforced  # ours must come first
        assert netguard.ensure(p).changed
        assert saved().split("-A OUTPUT ")[1].startswith(f"-m comment --comment \"otree-lab {p.manager_id} ")
    finally:
        subprocess.run(["iptables", "-D", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT"], check=True)

    assert netguard.remove(p) and not ours(p.manager_id)
    assert not netguard.remove(p)  # nothing left to remove


def test_a_swarm_nodes_rules_are_in_place_as_iptables_prints_them(firewall, tmp_path):
    """The swarm's rule set (the node guard's: no process users, no registry, the proxy's
    address let through to the published ports; the manager's: the recorded node addresses
    refused) applied for real: in place afterwards, idempotent; junk in the recorded node
    list is ignored."""
    assert netguard.write_lab_hosts(tmp_path, ["172.31.9.9", "172.31.9.8"]) is True
    assert netguard.write_lab_hosts(tmp_path, ["172.31.9.8", "172.31.9.9"]) is False  # the same set
    (tmp_path / netguard.LAB_HOSTS_FILE).write_text("172.31.9.9\nnot-an-address\n;iptables -F\n172.31.9.8\n")
    assert netguard.read_lab_hosts(tmp_path) == ("172.31.9.8", "172.31.9.9")
    from instances import node_guard

    text = json.dumps({"manager_id": "x", "overlays": "10.216.0.0/16", "egress": "deny",
                       "lab_hosts": ["172.31.9.8"], "proxy_from": ["172.31.9.1"]})
    node = node_guard.policy_from_env(text)
    assert node.app_uids == node.builder_uids == () and node.registry_port == 0 and node.egress == "deny"
    p = firewall(app_uids=(), builder_uids=(), swarm_bridge=True, registry_port=0,
                 lab_hosts=netguard.read_lab_hosts(tmp_path), proxy_from=("172.31.9.1",))
    first = netguard.ensure(p)
    assert first.enforced and first.changed, first.detail
    assert netguard.ensure(p).changed is False
    rules = ours(p.manager_id)
    assert f"-A LAB-{p.manager_id}-FWD -s {APP_POOL} -d 172.31.9.8/32 -j REJECT" in rules
    assert f"-A LAB-{p.manager_id}-FWD -s 172.31.9.1/32 -o docker_gwbridge -m conntrack --ctstate DNAT -j RETURN" in rules
    assert f"-A LAB-{p.manager_id}-FWD -o docker_gwbridge -m conntrack --ctstate DNAT -j REJECT" in rules
    assert "--uid-owner" not in rules  # no process users on a node


@pytest.mark.parametrize("policy_text", ["", "{not json", '{"overlays": "10.216.0.0/16"}'])
def test_the_node_guard_refuses_a_policy_it_cannot_read_and_changes_nothing(policy_text, tmp_path):
    """instances/node_guard.py as the swarm runs it (beside netguard.py in a folder of their
    own, python3 node_guard.py): a policy that is not JSON or names no manager stops it at
    once with the reason (exit 2), no rule touched."""
    import sys

    from instances import node_guard

    for module in (node_guard, netguard):
        shutil.copy(module.__file__, tmp_path)
    def rules() -> list[str]:  # (the chains' packet counters move with any traffic)
        return [line for line in saved().splitlines() if line.startswith("-A ")] if firewall_ok() else []

    before = rules()
    proc = subprocess.run([sys.executable, str(tmp_path / "node_guard.py")],
                          env={"LAB_NODE_GUARD": policy_text, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc
    assert proc.stdout.startswith("LAB_NODE_GUARD is not a valid policy: "), proc.stdout
    assert rules() == before


def test_two_managers_coexist_and_a_gone_one_is_cleaned_up(firewall, tmp_path):
    one, two = firewall(), firewall(egress="deny", data_dir=str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    assert netguard.ensure(one).enforced and netguard.ensure(two).enforced
    assert netguard.status(one).enforced and netguard.status(two).enforced
    assert ours(one.manager_id) and ours(two.manager_id)
    netguard.remove(one)
    assert not ours(one.manager_id) and netguard.status(two).enforced
    assert netguard.ensure(one).changed and netguard.status(two).enforced  # neither disturbs the other

    # A manager whose data dir is gone (a finished test run, an uninstalled manager) is
    # cleaned up by the next ensure of any manager; a living one is not.
    (tmp_path / "data").rmdir()
    assert netguard.ensure(one).enforced
    assert not ours(two.manager_id)
    assert netguard.status(one).enforced


def test_a_manager_in_its_image_and_one_on_the_host_keep_each_others_chains(firewall, tmp_path, monkeypatch):
    """The compose install's manager (the manager image, on the host's network) and a
    manager run on the host see different file systems: neither takes the other's data dir
    for gone."""
    monkeypatch.setenv("OTREE_LAB_IMAGE", "manager")
    assert netguard.Policy.from_settings().data_dir == "container:" + str(django_settings.DATA_DIR)
    in_image = firewall(data_dir="container:/var/lib/otree-lab-not-on-this-host")
    on_host = firewall(data_dir=str(tmp_path / "gone"))  # a host path the image cannot see
    assert netguard.ensure(in_image).enforced
    monkeypatch.delenv("OTREE_LAB_IMAGE")
    (tmp_path / "gone").mkdir()
    assert netguard.ensure(on_host).enforced
    (tmp_path / "gone").rmdir()
    monkeypatch.setenv("OTREE_LAB_IMAGE", "manager")
    assert netguard.ensure(in_image).enforced
    assert ours(on_host.manager_id), "the manager in its image removed a host manager's chains"
    monkeypatch.delenv("OTREE_LAB_IMAGE")
    assert netguard.ensure(on_host.__class__(**{**on_host.__dict__, "manager_id": firewall().manager_id,
                                                 "data_dir": str(tmp_path)})).enforced
    assert ours(in_image.manager_id), "a host manager removed the chains of the manager in its image"
    assert not ours(on_host.manager_id)  # its data dir is gone: the host manager cleaned it up, as before


def test_without_root_the_status_says_so_and_what_to_do(firewall):
    """A real unprivileged process (another uid) asks for the firewall."""
    p = firewall()
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from instances import netguard
        p = netguard.Policy(manager_id={p.manager_id!r}, app_pools=({APP_POOL!r},), build_pools=({BUILD_POOL!r},),
                            app_uids={APP_UIDS!r}, builder_uids={BUILDER_UIDS!r})
        print(json.dumps([netguard.ensure(p).__dict__, netguard.status(p).__dict__]))
    """)
    result = subprocess.run([SYSTEM_PYTHON, "-c", script], user=OTHER_UID, group=OTHER_UID, capture_output=True,
                            text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    applied, state = json.loads(result.stdout)
    for outcome in (applied, state):
        assert outcome["enforced"] is False
        assert "without root" in outcome["detail"] and "manage.py firewall" in outcome["detail"]
    assert not ours(p.manager_id)


def test_a_missing_tool_names_the_package():
    with pytest.raises(netguard.NetguardError, match="apt install iptables"):
        netguard._tool("ip6tables-restore-not-installed")


# --- the process runtime's tenants (uids) ---------------------------------------------------------

def probe_as(uid: int, targets: list[str]) -> dict:
    result = subprocess.run([SYSTEM_PYTHON, "-c", PROBE, *targets], user=uid, group=uid, capture_output=True,
                            text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_process_tenants_reach_nothing_of_this_machine(firewall):
    need(netns_available(), "root with iproute2 (ip netns) for the test hosts")
    p = firewall(egress="deny")
    with host_listener("127.0.0.1") as loopback, host_listener("0.0.0.0") as everywhere, \
            host_listener("::") as v6, outside_host(METADATA) as metadata, outside_host(OUTSIDE) as outside:
        local = [f"127.0.0.1:{loopback.port}", f"[::1]:{v6.port}"]
        local += [f"{a}:{everywhere.port}" for a in host_addresses(4, lasting=True)]
        local += [f"[{a}]:{v6.port}" for a in host_addresses(6, lasting=True)]
        away = [f"{METADATA}:80", f"{OUTSIDE}:80"]

        # Control: without the rules all of it answers.
        before = probe_as(APP_UIDS[0], local + away)
        assert all(outcome == "open" for outcome in before.values()), {t: o for t, o in before.items() if o != "open"}

        assert netguard.ensure(p).enforced
        seen = (len(loopback.connections), len(everywhere.connections), len(v6.connections),
                len(metadata.hits()), len(outside.hits()))
        app = probe_as(APP_UIDS[0] + 7, local + away)
        assert closed(app) and refused_at_once(app), app
        builder = probe_as(BUILDER_UIDS[0] + 3, local + away)
        assert closed({t: builder[t] for t in local + [f"{METADATA}:80"]}), builder
        assert builder[f"{OUTSIDE}:80"] == "open"  # pip may reach the outside, even under deny
        assert (len(loopback.connections), len(everywhere.connections), len(v6.connections),
                len(metadata.hits()), len(outside.hits())) == seen[:4] + (seen[4] + 1,)
        other = probe_as(OTHER_UID, local + away)
        assert all(outcome == "open" for outcome in other.values()), other  # only the tenants' uids

        # LAB_EGRESS=open: the apps reach the outside (never this machine or metadata).
        opened = netguard.Policy(**{**p.__dict__, "egress": "open"})
        assert netguard.ensure(opened).changed
        app = probe_as(APP_UIDS[1], local + away)
        assert app.pop(f"{OUTSIDE}:80") == "open" and closed(app), app


def test_process_tenants_may_ask_a_local_resolver(firewall, tmp_path):
    """A resolver on this machine named in resolv.conf (e.g. systemd-resolved's 127.0.0.53)
    takes DNS from builders always, from apps only with LAB_EGRESS=open."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\nnameserver 192.0.2.254\n")
    assert netguard.local_resolvers(str(resolv))[4] == ["127.0.0.53"]
    p = firewall(egress="deny", resolv_conf=str(resolv))
    assert netguard.ensure(p).enforced
    rules = ours(p.manager_id)
    dns = [line for line in rules.splitlines() if "--dport 53" in line and "127.0.0.53" in line]
    assert dns and all(f"{BUILDER_UIDS[0]}-{BUILDER_UIDS[1]}" in line for line in dns)  # deny: builders only
    assert netguard.ensure(netguard.Policy(**{**p.__dict__, "egress": "open"})).changed
    dns = [line for line in ours(p.manager_id).splitlines() if "--dport 53" in line and "127.0.0.53" in line]
    assert any(f"{APP_UIDS[0]}-{APP_UIDS[1]}" in line for line in dns)


# --- Docker: apps and builds ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mid():
    need(firewall_ok(), "root with iptables")
    need(netns_available(), "root with iproute2 (ip netns) for the test hosts")
    need(dh.engine_ok(), "a Docker engine")
    need(dh.images_present(PG, REDIS, PY), f"the images {PG}, {REDIS}, {PY} (python manage.py build_images)")
    manager_id = dh.new_manager_id()
    try:
        yield manager_id
    finally:
        dh.purge(manager_id)  # containers, networks, volumes, images and its firewall chains
        assert not any(dh.labelled(manager_id).values()) and not ours(manager_id)
        assert not dh.api().images(filters={"label": f"{LABEL_MANAGER}={manager_id}"})


@pytest.fixture
def rt(mid, settings) -> DockerRuntime:
    settings.LAB_PROCESS_APP_UIDS, settings.LAB_PROCESS_BUILDER_UIDS = APP_UIDS, BUILDER_UIDS
    settings.LAB_EGRESS = "open"
    return DockerRuntime(manager_id=mid, images={"db": PG, "redis": REDIS}, subnets=APP_POOL,
                         build_subnets=BUILD_POOL, ready_timeout=60)


@pytest.fixture(scope="module")
def api():
    return dh.api()


@pytest.fixture(scope="module")
def hosts():
    need(netns_available(), "root with iproute2 (ip netns) for the test hosts")
    with host_listener("0.0.0.0") as everywhere, outside_host(METADATA) as metadata, \
            outside_host(OUTSIDE) as outside:
        yield everywhere, metadata, outside


def make_spec(name: str, app: AppSpec | None = None, **kw) -> InstanceSpec:
    kw.setdefault("memory_mb", 128)
    kw.setdefault("cpus", 0.5)
    return InstanceSpec(name=name, db_name="otree", db_user="otree", db_password="fw-secret", app=app, **kw)


def http_app() -> AppSpec:
    return AppSpec(image=PY, command=["python", "-m", "http.server", "8000"], port=8000, release_id="r1",
                   user=APP_USER)


def probe_from(api, container: str, targets: list[str]) -> dict:
    code, out = dh.exec_in(api, container, ["python", "-c", PROBE, *targets], user=APP_USER)
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


def addresses(api, container: str) -> list[str]:
    networks = api.inspect_container(container)["NetworkSettings"]["Networks"].values()
    return [n["IPAddress"] for n in networks]


def gateways(api, container: str) -> list[str]:
    networks = api.inspect_container(container)["NetworkSettings"]["Networks"].values()
    return [n["Gateway"] for n in networks if n["Gateway"]]


def build_container(rt: DockerRuntime, name: str, command: list[str] | None = None) -> str:
    """A container made exactly as the instance's builds are (its build network, its
    limits, uid 10001), running `command` (default: sleeping) instead of pip."""
    cid = rt._create_build_container(name, PY, command or ["sleep", "600"], memory_mb=128, cpus=0.5)
    rt.api.start(cid)
    return rt.container_name(name, "build")


def host_targets(port: int, *containers_gateways: list[str]) -> list[str]:
    """This machine's service on every address it has (loopback aside: a container's
    127.0.0.1 is its own) and on the gateways the containers see."""
    found = [a for a in host_addresses(4, lasting=True) if not a.startswith("127.")]
    for more in containers_gateways:
        found += [g for g in more if g not in found]
    return [f"{a}:{port}" for a in found]


@pytest.mark.docker
def test_apps_and_builds_reach_no_service_of_this_machine_nor_metadata(rt, api, hosts):
    everywhere, metadata, _ = hosts
    rt.ensure(make_spec("fw-host", app=http_app()))
    app = rt.container_name("fw-host", "app")
    builder = build_container(rt, "fw-host")
    # A service of this machine in a container of its own, published on all addresses
    # (Docker forwards such ports with DNAT, past the host's INPUT chain).
    other = api.create_container(PY, ["python", "-m", "http.server", "8080"], ports=[8080],
                                 labels={LABEL_MANAGER: rt.manager_id},
                                 host_config=api.create_host_config(port_bindings={8080: ("0.0.0.0", None)}))
    try:
        api.start(other["Id"])
        published = api.inspect_container(other["Id"])["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostPort"]
        wait_until(lambda: dh.http_get(f"http://127.0.0.1:{published}/")[0] == 200, 30, 0.2, "the published service")
        targets = host_targets(everywhere.port, gateways(api, app), gateways(api, builder)) + [f"{METADATA}:80"]
        assert len(targets) >= 5  # eth0, docker0, the app's two gateways, the build's, metadata
        targets += [f"{a}:{published}" for a in host_addresses(4, lasting=True) if not a.startswith("127.")]
        seen = (len(everywhere.connections), len(metadata.hits()))
        for container in (app, builder):
            results = probe_from(api, container, targets)
            assert closed(results) and refused_at_once(results), (container, results)
        assert (len(everywhere.connections), len(metadata.hits())) == seen

        # Control: the same probes without this manager's rules get through.
        netguard.remove(rt.policy)
        results = probe_from(api, app, targets)
        assert results[targets[0]] == "open" and results[f"{METADATA}:80"] == "open", results
        assert results[targets[-1]] == "open", results  # the published service, through DNAT
        assert len(everywhere.connections) > seen[0] and len(metadata.hits()) > seen[1]
    finally:
        api.remove_container(other["Id"], force=True, v=True)
        rt.remove_build_leftovers("fw-host")
        rt._guard()
    assert rt.protections("fw-host")[1].holds


@pytest.mark.docker
def test_other_instances_and_their_builds_are_unreachable(rt, api):
    rt.ensure(make_spec("fw-a", app=http_app()))
    rt.ensure(make_spec("fw-b", app=http_app()))
    build_a = build_container(rt, "fw-a")
    build_b = build_container(rt, "fw-b", ["python", "-m", "http.server", "8080"])  # two builds at the same time
    try:
        (b_build_ip,) = addresses(api, build_b)
        wait_until(lambda: dh.http_get(f"http://{b_build_ip}:8080/")[0] == 200, 30, 0.2, "the second build's server")
        b_targets = [f"{b_build_ip}:8080"]
        b_targets += [f"{ip}:8000" for ip in addresses(api, rt.container_name("fw-b", "app"))]
        b_targets += [f"{ip}:5432" for ip in addresses(api, rt.container_name("fw-b", "db"))]
        b_targets += [f"{ip}:6379" for ip in addresses(api, rt.container_name("fw-b", "redis"))]
        for container in (build_a, rt.container_name("fw-a", "app")):
            results = probe_from(api, container, b_targets)
            assert closed(results), (container, results)
        # Its own services stay reachable from the app (inside its private network).
        own = probe_from(api, rt.container_name("fw-a", "app"), ["db:5432", "redis:6379"])
        assert set(own.values()) == {"open"}, own
    finally:
        rt.remove_build_leftovers("fw-a")
        rt.remove_build_leftovers("fw-b")
    for name in ("fw-a", "fw-b"):
        left = dh.labelled(rt.manager_id, name)
        assert {c["Labels"][LABEL_COMPONENT] for c in left["containers"]} == {"app", "db", "redis"}
        assert {n["Name"] for n in left["networks"]} == {rt.network_name(name, "internal"), rt.network_name(name, "edge")}


@pytest.mark.docker
def test_egress_open_and_deny(rt, api, hosts, settings):
    _, _, outside = hosts
    rt.ensure(make_spec("fw-out", app=http_app()))
    app = rt.container_name("fw-out", "app")
    builder = build_container(rt, "fw-out")
    target = [f"{OUTSIDE}:80"]
    try:
        hits = len(outside.hits())
        assert probe_from(api, app, target) == {target[0]: "open"}  # open: oTree apps call outside APIs
        assert len(outside.hits()) == hits + 1

        settings.LAB_EGRESS = "deny"
        assert rt._guard().changed  # the next ensure applies the new setting
        hits = len(outside.hits())
        results = probe_from(api, app, target)
        assert closed(results) and refused_at_once(results), results
        assert probe_from(api, builder, target) == {target[0]: "open"}  # builds reach the outside (pip)
        assert len(outside.hits()) == hits + 1
        assert [p.holds for p in rt.protections("fw-out") if p.what == "Outside network"] == [True]
    finally:
        rt.remove_build_leftovers("fw-out")
        settings.LAB_EGRESS = "open"
        rt._guard()


# --- Docker: real builds --------------------------------------------------------------------------

@pytest.mark.docker
def test_a_hostile_build_runs_locked_down_and_reaches_only_the_outside(rt, api, hosts, settings, tmp_path):
    everywhere, metadata, outside = hosts
    settings.LAB_EGRESS = "deny"  # the app may not go out; its build still fetches its packages
    rt.ensure(make_spec("fw-victim", app=http_app()))
    victim = rt.container_name("fw-victim", "db")
    targets = host_targets(everywhere.port) + [f"{METADATA}:80"]
    targets += [f"{ip}:5432" for ip in addresses(api, victim)]
    backend = textwrap.dedent(f"""
        import os, subprocess, sys
        PROBE = {PROBE!r}
        found = subprocess.run([sys.executable, "-c", PROBE, *{targets!r}], capture_output=True, text=True).stdout
        sys.stderr.write("@@" + "PROBED@@ " + found.strip() + " @@" + "AS@@ " + str(os.getuid()) + "\\n")
        raise SystemExit(1)
    """)
    filename = dh.sdist(outside.files, "hostile", backend)
    ctx = dh.project(tmp_path, f"hostile @ http://{OUTSIDE}/{filename}\n")
    watch = dh.Watch(api, rt, "fw-hostile")
    hits = len(outside.hits())
    with pytest.raises(otree_project.BuildFailed) as failed:
        rt.build_release("fw-hostile", 1, ctx, out=watch, timeout=300, memory_mb=192, cpus=0.5)
    assert "installing the requirements failed" in str(failed.value)
    assert any(h["path"] == f"/{filename}" for h in outside.hits()[hits:])  # the build reached the outside

    found = re.search(r"@@PROBED@@ (\{.*?\}) @@AS@@ (\d+)", watch.log)
    assert found, watch.log[-3000:]
    probed = json.loads(found.group(1))
    assert set(probed) == set(targets) and closed(probed) and refused_at_once(probed), probed
    assert found.group(2) == "10001"  # the build's code runs unprivileged

    info, host = watch.container, watch.container["HostConfig"]
    assert info["Config"]["User"] == APP_USER
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"] and host["Privileged"] is False
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["Memory"] == host["MemorySwap"] == 192 * 2**20
    assert host["NanoCpus"] == int(0.5e9) and host["PidsLimit"] == rt.build_pids
    # Nothing of the host but the lab's wheel cache, read-only (instances.runtime.uvcache).
    assert (host["Binds"] or []) in ([], [f"{rt.wheel_cache.volume}:/opt/otree-lab-cache:ro"]), host["Binds"]
    assert all(m["Name"] == rt.wheel_cache.volume and m["RW"] is False for m in info["Mounts"]), info["Mounts"]
    assert "/tmp" in host["Tmpfs"]
    assert watch.network["Name"] == rt.network_name("fw-hostile", "build")
    assert watch.network["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    (subnet,) = [c["Subnet"] for c in watch.network["IPAM"]["Config"]]
    assert subnet.startswith(BUILD_POOL.rsplit(".", 1)[0])
    # Nothing of the build is left: no container, no network.
    assert not any(dh.labelled(rt.manager_id, "fw-hostile").values())


@pytest.mark.docker
def test_a_manager_in_a_container_does_not_claim_to_guard_the_host(mid, api):
    """In a container without the host's network, rules would guard that container only."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, "/src")
        from instances import netguard
        p = netguard.Policy(manager_id={mid!r}, app_pools=({APP_POOL!r},), build_pools=({BUILD_POOL!r},),
                            app_uids={APP_UIDS!r}, builder_uids={BUILDER_UIDS!r})
        print(json.dumps(netguard.ensure(p).__dict__))
    """)
    root = str(Path(__file__).resolve().parents[2])
    container = api.create_container(PY, ["python", "-c", script], labels={LABEL_MANAGER: mid},
                                     host_config=api.create_host_config(binds={root: {"bind": "/src", "mode": "ro"}},
                                                                        cap_add=["NET_ADMIN"]))
    try:
        api.start(container["Id"])
        assert api.wait(container["Id"], timeout=60)["StatusCode"] == 0, api.logs(container["Id"])
        state = json.loads(api.logs(container["Id"], stderr=False).decode().strip().splitlines()[-1])
    finally:
        api.remove_container(container["Id"], force=True, v=True)
    assert state["enforced"] is False and "on the host as root" in state["detail"], state


def test_protections_report_the_firewall_as_it_is(firewall, settings):
    settings.LAB_PROCESS_APP_UIDS, settings.LAB_PROCESS_BUILDER_UIDS = APP_UIDS, BUILDER_UIDS
    settings.LAB_EGRESS = "deny"
    p = firewall(egress="deny")
    rt = DockerRuntime(manager_id=p.manager_id, subnets=APP_POOL, build_subnets=BUILD_POOL)
    shown = {item.what: item for item in rt.protections("any")}
    assert set(shown) == {"Files", "Host and other instances", "Outside network", "Memory", "CPU", "Processes", "Builds"}
    for what in ("Host and other instances", "Outside network", "Builds"):
        assert not shown[what].holds and "not enforced" in shown[what].detail, shown[what]
    assert netguard.ensure(rt.policy).enforced
    shown = {item.what: item for item in rt.protections("any")}
    assert all(item.holds for item in shown.values()), shown
    assert "LAB_EGRESS=deny" in shown["Outside network"].detail
